"""The engine's side of live control (gemmalens/control.py has the protocol): a ROUTER socket served by its own
thread, so a controller is answered while a forward pass runs, and after generation ended.

Generation asks ``changes(batch, step)`` before each forward pass: the ``apply`` and ``clear`` requests that
arrived since take effect there (each is answered with that batch and step) and the new set in force is
returned. With ``sync``, ``wait(batch, step)`` first holds that pass until a controller's ``go`` (changes that
arrive meanwhile take effect at that pass; changes that arrive after it, at the next). A controller silent for
``timeout`` seconds either releases the run from waiting (``on_timeout="continue"``, noted in the run's end) or
stops it (``"stop"``). ``ended()`` says generation is over: later requests, and a ``go`` waiting for a pass
that will not come, are answered so.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import Any, Callable, Sequence

import zmq

from gemmalens.control import MAX_REQUEST_BYTES, OPS
from gemmalens.errors import ConfigError
from gemmalens.interventions import parse_all

from .config import Gemma3Config
from .editing import Prepared, prepare
from .publisher import Stopped

POLL_MS = 20


class ControlTimeout(Stopped):
    """No controller's go within the timeout, with ``on_timeout="stop"``."""


class ControlServer:
    def __init__(self, address: str | Sequence[str], config: Gemma3Config, initial: Sequence[Prepared] = (),
                 sync: bool = False, timeout: float = 60.0, on_timeout: str = "continue", curve=None,
                 context: zmq.Context | None = None, should_stop: Callable[[], bool] = lambda: False):
        self.config, self.sync, self.timeout, self.on_timeout = config, sync, timeout, on_timeout
        self.current: list[Prepared] = list(initial)
        self.should_stop = should_stop
        self.notes: list[str] = []  # what the run's end should say (a controller that went silent)
        self._lock = threading.Condition()
        self._pending: list[tuple[bytes, str, list[Prepared]]] = []  # (who, op, prepared) not yet in force
        self._go: list[bytes] = []  # go requests not yet used
        self._position = (0, 0)  # the batch and step generation last reached
        self._ended = False
        self._held: list[Prepared] | None = None  # the set a released pass starts with, if changed
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # replies from generation's thread
        self._closing = threading.Event()
        self.socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if curve is not None:
            curve.serve(self.socket)
        try:
            for one in [address] if isinstance(address, str) else address:
                self.socket.bind(one)
        except zmq.ZMQError as error:
            self.socket.close(linger=0)
            raise ConfigError(f"--control {address}: cannot bind ({error.strerror}); choose another address") from None
        self.endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._thread = threading.Thread(target=self._serve, name="gemmalens-control", daemon=True)
        self._thread.start()

    # Generation's side.

    def changes(self, batch: int, step: int) -> list[Prepared] | None:
        """The new set in force from ``step`` of ``batch`` if requests changed it (they are answered), else None."""
        with self._lock:
            self._position = (batch, step)
            if self.sync:  # what wait() put in force when it released this pass; later changes wait for the next
                held, self._held = self._held, None
                return held
            return self._apply_pending()

    def wait(self, batch: int, step: int) -> None:
        """With ``sync``: holds until a controller says go."""
        if not self.sync:
            return
        deadline = time.monotonic() + self.timeout
        with self._lock:
            self._position = (batch, step)
            while True:
                changed = self._apply_pending()  # changes sent while waiting take effect at this pass
                if changed is not None:
                    self._held = changed
                if self._go:
                    break
                if self.should_stop():
                    raise Stopped("stopped while waiting for a controller's go")
                left = deadline - time.monotonic()
                if left <= 0:
                    note = f"no controller's go within {self.timeout:g} s at batch {batch} step {step}"
                    if self.on_timeout == "stop":
                        raise ControlTimeout(note)
                    self.sync = False
                    self.notes.append(note + "; the run went on without waiting")
                    print(f"engine: {self.notes[-1]}", file=sys.stderr, flush=True)
                    return
                self._lock.wait(min(left, 0.1))
            self._reply(self._go.pop(0), self._answer(batch, step))

    def ended(self) -> None:
        """Generation is over: waiting requests are answered so, and later ones at once."""
        with self._lock:
            self._ended = True
            for who, _, _ in self._pending:
                self._reply(who, {"ok": False, "error": "the run ended before the change could take effect"})
            for who in self._go:
                self._reply(who, {"ok": True, "ended": True})
            self._pending, self._go = [], []

    def close(self) -> None:
        self.ended()
        self._closing.set()
        self._thread.join()
        self.socket.close(linger=0)

    def _apply_pending(self) -> list[Prepared] | None:
        """Puts the pending changes in force at the current position (the lock held); the new set, or None."""
        if not self._pending:
            return None
        batch, step = self._position
        for who, op, prepared in self._pending:
            self.current = list(prepared) if op == "clear" else self.current + list(prepared)
            self._reply(who, self._answer(batch, step))
        self._pending = []
        return self.current

    def _answer(self, batch: int, step: int) -> dict[str, Any]:
        return {"ok": True, "batch": batch, "step": step, "sync": self.sync,
                "in_force": [{**p.intervention.record(), "id": p.intervention.id} for p in self.current]}

    def _reply(self, who: bytes, body: dict[str, Any]) -> None:
        self._outbox.put((who, body))

    # The socket's thread.

    def _serve(self) -> None:
        while not self._closing.is_set() or not self._outbox.empty():
            while not self._outbox.empty():
                who, body = self._outbox.get()
                try:
                    self.socket.send_multipart([who, b"", json.dumps(body).encode()], flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the controller went away: nothing to tell
            if self._closing.is_set() or not self.socket.poll(POLL_MS):
                continue
            frames = self.socket.recv_multipart()
            who = frames[0]
            try:
                self._handle(who, json.loads(frames[-1]) if len(frames) >= 2 else None)
            except Exception as error:  # a bad request is refused, whatever it is; the run goes on
                self._reply(who, {"ok": False, "error": f"{type(error).__name__}: {error}" if not isinstance(
                    error, ConfigError) else str(error)})

    def _handle(self, who: bytes, body: Any) -> None:
        if not isinstance(body, dict) or body.get("op") not in OPS:
            raise ConfigError(f"expected a JSON object with 'op' one of {', '.join(OPS)}")
        op = body["op"]
        found = prepare(parse_all(body.get("interventions"), None, "apply: interventions"), self.config) if (
            op == "apply") else []
        with self._lock:
            if op == "list" or (op == "go" and not self.sync) or (self._ended and op == "go"):
                self._reply(who, {**self._answer(*self._position), "ended": self._ended})
            elif self._ended:
                self._reply(who, {"ok": False, "error": "the run has ended"})
            elif op == "go":
                self._go.append(who)
            else:
                self._pending.append((who, op, found))
            self._lock.notify_all()
