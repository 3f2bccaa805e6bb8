"""The engine's side of live control (gemmalens/control.py has the protocol): a ROUTER socket polled by
generation between forward passes.

Generation asks ``changes(batch, step)`` before each forward pass: requests that arrived since are answered
(``list`` at once; ``apply`` and ``clear`` with the step they take effect) and the new set in force is returned.
With ``sync``, ``wait(batch, step)`` first holds that pass until a controller's ``go`` (changes sent meanwhile
take effect at that pass); a controller silent for
``timeout`` seconds either releases the run from waiting (``on_timeout="continue"``, noted in the run's end) or
stops it (``"stop"``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Sequence

import zmq

from gemmalens.control import MAX_REQUEST_BYTES, OPS
from gemmalens.errors import ConfigError
from gemmalens.interventions import parse_all

from .config import Gemma3Config
from .editing import Prepared, prepare
from .publisher import Stopped

POLL_MS = 100


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
        self._pending: list[tuple[bytes, str, list[Prepared]]] = []  # (who, op, prepared) not yet applied
        self._go: list[bytes] = []
        self._changed = False
        self._position = (0, 0)  # the batch and step last asked about
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

    def changes(self, batch: int, step: int) -> list[Prepared] | None:
        """The new set in force from ``step`` of ``batch`` if requests changed it (they are answered), else None."""
        self._position = (batch, step)
        if not self.sync:  # in sync mode, requests are taken while waiting: those after a go wait for the next
            self._receive(block_ms=0)
        self._apply_pending()
        changed, self._changed = self._changed, False
        return self.current if changed else None

    def _apply_pending(self) -> None:
        batch, step = self._position
        for who, op, prepared in self._pending:
            self.current = list(prepared) if op == "clear" else self.current + list(prepared)
            self._changed = True
            self._reply(who, {"ok": True, "batch": batch, "step": step, "in_force": self._records()})
        self._pending = []

    def wait(self, batch: int, step: int) -> None:
        """With ``sync``: holds until a controller says go (requests before it are taken by ``changes``)."""
        self._position = (batch, step)
        if not self.sync:
            return
        deadline = time.monotonic() + self.timeout
        while not self._go:
            if self.should_stop():
                raise Stopped("stopped while waiting for a controller's go")
            if time.monotonic() >= deadline:
                note = f"no controller's go within {self.timeout:g} s at batch {batch} step {step}"
                if self.on_timeout == "stop":
                    raise ControlTimeout(note)
                self.sync = False
                self.notes.append(note + "; the run went on without waiting")
                print(f"engine: {self.notes[-1]}", file=sys.stderr, flush=True)
                return
            self._receive(block_ms=POLL_MS)
            self._apply_pending()  # they take effect at the pass this go releases
        for who in self._go:
            self._reply(who, {"ok": True, "batch": batch, "step": step, "in_force": self._records()})
        self._go = []

    def close(self) -> None:
        for who, _, _ in self._pending:
            self._reply(who, {"ok": False, "error": "the run ended before the change could take effect"})
        for who in self._go:
            self._reply(who, {"ok": False, "error": "the run ended"})
        self._pending, self._go = [], []
        self.socket.close(linger=0)

    def _receive(self, block_ms: int) -> None:
        while self.socket.poll(block_ms):
            block_ms = 0
            frames = self.socket.recv_multipart()
            who = frames[0]
            try:
                self._handle(who, json.loads(frames[-1]) if len(frames) >= 2 else None)
            except (ConfigError, ValueError, TypeError, KeyError) as error:
                self._reply(who, {"ok": False, "error": str(error)})

    def _handle(self, who: bytes, body: Any) -> None:
        if not isinstance(body, dict) or body.get("op") not in OPS:
            raise ConfigError(f"expected a JSON object with 'op' one of {', '.join(OPS)}")
        op = body["op"]
        if op == "list":
            batch, step = self._position
            self._reply(who, {"ok": True, "batch": batch, "step": step, "in_force": self._records(),
                              "sync": self.sync})
        elif op == "go":
            if self.sync:
                self._go.append(who)
            else:
                batch, step = self._position
                self._reply(who, {"ok": True, "batch": batch, "step": step, "sync": False,
                                  "in_force": self._records()})
        elif op == "clear":
            self._pending.append((who, "clear", []))
        else:
            found = parse_all(body.get("interventions"), None, "apply: interventions")
            self._pending.append((who, "apply", prepare(found, self.config)))

    def _records(self) -> list[dict[str, Any]]:
        return [{**p.intervention.record(), "id": p.intervention.id} for p in self.current]

    def _reply(self, who: bytes, body: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([who, b"", json.dumps(body).encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the controller went away: nothing to tell
