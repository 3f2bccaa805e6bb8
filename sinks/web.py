"""``gemmalens sink web``: a live page of a running generation, served from a sink on the engine's lossy endpoint.

The sink keeps the run's state (every row's tokens as they come, the latest stats: tokens/s, the bus and sink
counters, each SAE's L0 and error, and the latest logit lens) and serves it with the standard library's
threaded HTTP server: the page (sinks/web.html) and a server-sent event stream of that state, twice a
second when it changed. It binds to loopback unless told otherwise; then every request needs the secret token
that the printed URL carries.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from gemmalens.wire import is_loopback

from .base import LossySubscriber
from .report import token_pieces

PAGE = Path(__file__).with_name("web.html")
LENS_LAYERS = 128  # logit-lens topics subscribed per layer index, up to this many layers


class LiveWeb(LossySubscriber):
    """The live page's sink. ``host``/``port`` where it serves; beyond loopback, ``token`` guards it."""

    topics = ("tokens", "result", *(f"act.model.layers.{i}.logit_lens.tokens" for i in range(LENS_LAYERS)))

    def __init__(self, connect, host: str = "127.0.0.1", port: int = 8765, **kwargs):
        super().__init__(connect, **kwargs)
        self.token = None if is_loopback(f"tcp://{host}:{port}") else secrets.token_urlsafe(16)
        self.state: dict[str, Any] = {"run": None, "rows": {}, "stats": {}, "lens": {}, "done": False, "version": 0}
        self.lock = threading.Condition()
        self.piece = lambda i: f"#{i}"
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/" + (f"?token={self.token}" if self.token else "")
        threading.Thread(target=self.server.serve_forever, name="gemmalens-web", daemon=True).start()

    def _change(self, **values) -> None:
        with self.lock:
            self.state.update(values)
            self.state["version"] += 1
            self.lock.notify_all()

    def on_run_start(self, info: dict[str, Any]) -> None:
        self.piece = token_pieces(info.get("model"))
        rows = {p["index"]: {"prompt": p["text"], "tokens": [], "finish": None} for p in info.get("prompts", [])}
        self._change(run=info.get("run"), rows=rows)

    def on_tokens(self, frame) -> None:
        body = frame.body
        with self.lock:
            for prompt, token in zip(body["prompts"], body["tokens"]):
                row = self.state["rows"].setdefault(prompt, {"prompt": "", "tokens": [], "finish": None})
                row["tokens"].append(self.piece(token))
        self._change()

    def on_result(self, result: dict[str, Any]) -> None:
        with self.lock:
            row = self.state["rows"].setdefault(int(result["id"]), {"prompt": result["prompt"], "tokens": []})
            row["finish"] = result["finish_reason"]
        self._change()

    def on_stats(self, stats: dict[str, Any]) -> None:
        self._change(stats=stats)

    def on_activation(self, frame) -> None:  # the logit lens: the last position's top token, first row
        layer = frame.header["name"].split(".")[2]
        tokens = frame.body[0, -1].tolist()
        with self.lock:
            self.state["lens"][layer] = [self.piece(t) for t in tokens[:5]]
        self._change()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._change(done=True, summary={k: summary.get(k) for k in ("complete", "reason", "prompts_done",
                                                                     "tokens", "tokens_per_second")})

    def snapshot(self, after: int, wait: float) -> dict[str, Any] | None:
        """The state once its version passes ``after`` (None if it did not within ``wait`` seconds)."""
        with self.lock:
            if self.state["version"] <= after:
                self.lock.wait(wait)
            if self.state["version"] <= after:
                return None
            return json.loads(json.dumps(self.state))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        super().close()


def _handler(sink: LiveWeb):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the page polls nothing, the stream is one request
            pass

        def do_GET(self) -> None:
            url = urlparse(self.path)
            given = parse_qs(url.query).get("token", [""])[0]
            if sink.token is not None and not hmac.compare_digest(given, sink.token):
                self.send_error(403, "this page needs the token its URL was printed with")
                return
            if url.path == "/":
                body = PAGE.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif url.path == "/events":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                version = -1
                try:
                    while True:
                        state = sink.snapshot(version, 15.0)
                        if state is None:
                            self.wfile.write(b": keep-alive\n\n")
                        else:
                            version = state["version"]
                            self.wfile.write(b"data: " + json.dumps(state).encode() + b"\n\n")
                        self.wfile.flush()
                        time.sleep(0.5)  # at most twice a second, however fast tokens come
                except (BrokenPipeError, ConnectionResetError):
                    return
            else:
                self.send_error(404)

    return Handler
