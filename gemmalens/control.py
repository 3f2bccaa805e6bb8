"""Live control of a running engine: the request/reply protocol and the ``Controller`` client.

An engine started with ``--control ADDR`` answers JSON requests on a ZeroMQ ROUTER socket there (a ``Controller``
connects a REQ socket). Requests (``{"op": ...}``):

- ``apply`` with ``interventions`` (their JSON forms, arrays inline as lists or as paths on the engine's
  machine): added to those in force; the reply comes once the engine applied them, with the ``batch`` and
  ``step`` (the first forward pass edited).
- ``clear``: no intervention in force from the next step (those of the run's settings too); replied likewise.
- ``list``: the interventions in force, at once.
- ``go``: with ``--control-sync`` the engine waits for a ``go`` before each forward pass after the run's first
  (a decode step, or the next batch's prompt pass), so a subscriber reads step k's frames and decides step k+1;
  the reply names the step it released. Without it, ``go`` is answered at once.

Replies: ``{"ok": true, "batch": B, "step": K, "in_force": [records]}`` or ``{"ok": false, "error": "..."}``
(a bad request is refused, never fatal to the run). docs/interventions.md has an example controller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import zmq

from .curve import CurveClient
from .errors import GemmalensError
from .interventions import Intervention, load_file, parse

OPS = ("apply", "clear", "list", "go")
MAX_REQUEST_BYTES = 256 << 20


class ControlError(GemmalensError):
    """The engine refused a request, or did not answer in time."""


def inline_record(intervention: Intervention) -> dict[str, Any]:
    """An intervention's JSON form with its array inline: the engine may run on another machine."""
    record = intervention.record()
    if intervention.array is not None:
        from .interventions import ARRAY_FIELD

        key = ARRAY_FIELD[intervention.op]
        record[key] = intervention.array.tolist()
        record.pop(key + "_shape", None)
    return record


class Controller:
    """A client of an engine's control socket. Each call waits for the engine's reply (``timeout`` seconds)."""

    def __init__(self, address: str, timeout: float = 60.0, curve: CurveClient | None = None,
                 context: zmq.Context | None = None):
        self.address, self.timeout = address, timeout
        self.socket = (context or zmq.Context.instance()).socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.connect(self.socket)
        self.socket.connect(address)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        self.socket.send(json.dumps(body).encode())
        if not self.socket.poll(self.timeout * 1000):
            self.close()
            raise ControlError(f"no answer from the engine at {self.address} within {self.timeout:g} s (is it "
                               "running with --control there?)")
        reply = json.loads(self.socket.recv())
        if not reply.get("ok"):
            raise ControlError(f"the engine refused the request: {reply.get('error')}")
        return reply

    def apply(self, interventions: Sequence[Intervention | dict] | str | Path) -> dict[str, Any]:
        """Adds interventions (objects, JSON forms, or a file of them); returns the reply with the step."""
        found = load_file(interventions) if isinstance(interventions, (str, Path)) else [
            parse(i) for i in interventions]
        return self.request({"op": "apply", "interventions": [inline_record(i) for i in found]})

    def clear(self) -> dict[str, Any]:
        return self.request({"op": "clear"})

    def list(self) -> dict[str, Any]:
        return self.request({"op": "list"})

    def go(self) -> dict[str, Any]:
        return self.request({"op": "go"})

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> "Controller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
