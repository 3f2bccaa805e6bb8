"""The base class of every subscriber: connect, filter topics, decode and check, prove completeness.

Subclass ``Subscriber`` and override the callbacks you need::

    class Norms(Subscriber):
        topics = ("act.model.layers.5.resid_out",)

        def on_activation(self, frame):
            print(frame.header["step"], np.linalg.norm(frame.body, axis=-1))

Callbacks receive decoded ``Frame`` objects (``frame.topic``, ``frame.header``, ``frame.body``). ``run``
returns when the run has ended; ``self.complete`` then says whether every message of the subscribed topics
arrived (sequence numbers without gaps, counts equal to the engine's totals, none refused) and the engine
finished. A reliable subscriber tells the engine who it is (``state``: what it already holds), that it is
alive, and at the end that it has everything (``ack``): the engine's run is complete only then. A message
that breaks the protocol (docs/protocol.md) is counted, reported once per kind, and skipped.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from gemmalens import wire
from gemmalens.errors import GemmalensError, WireError

# Messages a reliable subscriber holds unread; beyond them the engine waits (back-pressure; nothing is dropped).
RELIABLE_HWM = 256
ALIVE_EVERY = 1.0  # seconds between a reliable subscriber's "alive" messages to the engine
RECEIPT_WAIT = 5.0  # seconds a subscriber repeats its ack until the engine's receipt comes (the engine may be gone)


def message_parts(frames: list[zmq.Frame]) -> list:
    """A received message's frames as ``decode`` takes them: topic and header as bytes, the payload read where
    ZeroMQ received it (not copied)."""
    return [frame.bytes for frame in frames[:2]] + [frame.buffer for frame in frames[2:]]


class SinkError(GemmalensError):
    """A subscriber could not complete its run (no engine came, the engine went away)."""


class Subscriber:
    """Receives one run from its engine(s): the reliable endpoint by default, the lossy one for
    ``LossySubscriber``."""

    topics: tuple[str, ...] = ("",)  # topic prefixes; "" is everything
    sparse = "dense"  # SAE features as dense arrays; "sparse": as wire.Sparse (their nonzeros)
    reliable = True

    def __init__(self, connect: str | list[str], name: str | None = None, topics=None, context=None, curve=None,
                 bfloat16_as: str = "float32", limits: wire.Limits = wire.DEFAULT_LIMITS,
                 engine_timeout: float = 30.0, stream=None):
        self.name = name or type(self).__name__.lower()
        if not wire.SINK_NAME.match(self.name):
            raise ValueError(f"sink name {self.name!r}: use letters, digits, '_' and '-' (at most 64)")
        self.instance = uuid.uuid4().hex[:12]
        self.topics = tuple(topics) if topics is not None else type(self).topics
        self.context = context or zmq.Context.instance()
        self.bfloat16_as = bfloat16_as
        self.limits = limits
        self.engine_timeout = engine_timeout
        self.stream = stream or sys.stderr
        self.socket = self.context.socket(zmq.XSUB if self.reliable else zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, RELIABLE_HWM if self.reliable else 1000)
        self.socket.setsockopt(zmq.LINGER, 1000 if self.reliable else 0)  # the ack gets a second to leave
        self.socket.setsockopt(zmq.MAXMSGSIZE, limits.message_bytes)
        # Pings answered by the engine's I/O thread even while the data flow is held back: an engine that died or
        # was stopped drops its link within HEARTBEAT_TIMEOUT.
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        if curve is not None:
            curve.connect(self.socket)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.addresses = [connect] if isinstance(connect, str) else list(connect)
        for address in self.addresses:
            self.socket.connect(address)
        prefixes = wire.CONTROL + self.topics if "" not in self.topics else ("",)
        for prefix in prefixes:
            self._subscribe(prefix)
        self._subscribe(wire.presence_topic(self.name, self.instance))  # last: tells the engine we are in
        self.expected_seq: dict[tuple[str, str], int] = {}
        self.received: dict[tuple[str, str], int] = {}
        self.gaps: list[str] = []
        self.rejected: dict[str, int] = {}  # messages refused, by the rule they broke
        self.run_info: dict[str, Any] | None = None
        self.run_id: str | None = None
        self.ends: dict[str, dict[str, Any]] = {}  # run.end per engine
        self.summary: dict[str, Any] | None = None
        self.aborted: str | None = None
        self.late = False  # messages of a run arrived before its run.start: it began before we subscribed
        self.down_since: dict[str, float] = {}  # engine links that went down (by endpoint), since when
        self.handshake_failures: list[str] = []
        self.stop_requested = False  # set from another thread: run() ends within a second, incomplete
        self._alive = 0.0
        self._ack: bytes | None = None  # sent at the run's end, repeated until the engine's receipt
        self.receipts: set[str] = set()  # engines that confirmed the ack

    def _subscribe(self, prefix: str) -> None:
        if self.reliable:
            self.socket.send(b"\x01" + prefix.encode("utf-8"))
        else:
            self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))

    # override these ----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What this subscriber already holds, told to the engine (``folder``, ``run``, ``complete``, ``have``:
        prompt ids done, ``spec``). A sink without outputs of its own holds nothing."""
        return {}

    def on_run_start(self, info: dict[str, Any]) -> None: ...

    def on_tokens(self, frame: wire.Frame) -> None: ...

    def on_activation(self, frame: wire.Frame) -> None: ...

    def on_result(self, result: dict[str, Any]) -> None: ...

    def on_batch_end(self, batch: dict[str, Any]) -> None: ...

    def on_intervention(self, body: dict[str, Any]) -> None:
        """The interventions in force in ``body["batch"]`` from ``body["step"]`` on (docs/protocol.md)."""

    def on_stats(self, stats: dict[str, Any]) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """The run ended (or was cut short: ``summary["complete"]`` False). Finish writing here: the engine is
        told this subscriber has everything only after this returns."""

    def durable_problem(self) -> str | None:
        """Why what this subscriber wrote is not all on disk, if it is not (checked after ``on_run_end``)."""
        return None

    # machinery ---------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every message of the subscribed topics arrived, none missing, duplicated or refused, the engine
        finished, and (for a sink) everything is on disk."""
        return self.summary is not None and not self.shortfall_parts()

    def missing(self) -> dict[str, int]:
        """Messages the engines sent on subscribed topics that did not arrive, by topic."""
        out: dict[str, int] = {}
        for engine, end in self.ends.items():
            for topic, sent in end.get("topics", {}).items():
                got = self.received.get((engine, topic), 0)
                if self._wants(topic) and got != sent:
                    out[topic] = out.get(topic, 0) + sent - got
        return out

    def shortfall_parts(self, engine: bool = True) -> list[str]:
        """What makes the run incomplete, one phrase each; ``engine=False`` leaves out the engine's own verdict
        (what the ack reports: this subscriber's side alone)."""
        parts = []
        if self.aborted:
            parts.append(self.aborted)
        if self.late:
            parts.append("subscribed after the run had started (run.start missed); nothing it wrote covers the run")
        if self.gaps:
            parts.append(f"{len(self.gaps)} gap(s), first {self.gaps[0]}")
        missing = self.missing()
        if missing:
            parts.append("missing " + ", ".join(f"{n} {topic}" for topic, n in sorted(missing.items())))
        if self.rejected:
            parts.append("refused " + ", ".join(f"{n} ({kind})" for kind, n in sorted(self.rejected.items())))
        if engine and self.summary is not None and not self.summary.get("complete"):
            parts.append(f"the engine says: {self.summary.get('reason') or 'incomplete'}")
        problem = self.durable_problem()
        if problem:
            parts.append(problem)
        return parts

    def shortfall(self) -> str:
        """What makes the run incomplete, in words."""
        return "; ".join(self.shortfall_parts()) or "complete"

    def _wants(self, topic: str) -> bool:
        return topic in wire.CONTROL or any(topic.startswith(p) for p in self.topics)

    def run(self, timeout: float | None = None, idle_timeout: float | None = None, on_wait=None,
            wait_every: float = 5.0) -> bool:
        """Receives until the run ends; returns ``self.complete``.

        ``timeout`` bounds the whole wait; ``idle_timeout`` the silence between messages (waiting for the run
        to start included). Until the run starts, ``on_wait(seconds_waited)`` is called every ``wait_every``
        seconds. An engine that disconnects mid-run and is not back within ``engine_timeout`` seconds ends the
        run, incomplete."""
        started = last = time.monotonic()
        deadline = None if timeout is None else started + timeout
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        waited = started
        try:
            while self.summary is None:
                now = time.monotonic()
                waits = [wait_every, ALIVE_EVERY]
                if idle_timeout is not None:
                    waits.append(last + idle_timeout - now)
                if deadline is not None:
                    waits.append(deadline - now)
                if self.down_since and self.run_info is not None:
                    waits.append(min(self.down_since.values()) + self.engine_timeout - now)
                ready = dict(poller.poll(int(max(0.0, min(waits)) * 1000)))
                if self.monitor in ready:
                    self._read_monitor()
                if self.socket in ready:
                    self.receive(self.socket.recv_multipart(copy=False))
                    last = time.monotonic()
                self._send_alive()
                if self.stop_requested:
                    self.abort("stopped")
                    break
                now = time.monotonic()
                gone = [e for e, since in self.down_since.items() if now - since >= self.engine_timeout]
                if gone and self.run_info is not None:
                    self.abort(f"the engine at {', '.join(gone)} went away mid-run (killed or stopped) and did not "
                               f"come back within {self.engine_timeout:.0f} s")
                    break
                if self.socket in ready:
                    continue
                if (deadline is not None and now >= deadline) or (idle_timeout is not None
                                                                   and now - last >= idle_timeout):
                    raise SinkError(
                        f"{self.name}: no message for {now - last:.0f} s"
                        + (f" from {', '.join(self.addresses)}; is an engine running there?"
                           if self.run_info is None else " in the middle of the run; the engine stopped or died")
                        + self._handshake_note())
                if self.run_info is None and on_wait is not None and now - waited >= wait_every:
                    waited = now
                    on_wait(now - started)
            self._await_receipts()
        finally:
            self.close()
        return self.complete

    def _await_receipts(self) -> None:
        """Repeats the ack until every engine of the run confirmed it (an ack lost as the process exits would
        leave the engine waiting), for a few seconds at most: an engine that is gone confirms nothing."""
        if self._ack is None:
            return
        engines = set(self.ends) or {"0"}
        until, sent = time.monotonic() + RECEIPT_WAIT, time.monotonic()
        while not engines <= self.receipts and time.monotonic() < until:
            if time.monotonic() - sent >= 0.5:
                self._upstream(self._ack)
                sent = time.monotonic()
            if self.socket.poll(100):
                self.receive(self.socket.recv_multipart(copy=False))

    def _handshake_note(self) -> str:
        if not self.handshake_failures:
            return ""
        return (f" (the link to the engine failed its handshake {len(self.handshake_failures)} time(s): "
                f"{self.handshake_failures[-1]}; check the CURVE keys: --curve-server must be the engine's public "
                "key, and this sink's public key must be in the engine's --curve-allow folder)")

    def _read_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, endpoint = event["event"], event["endpoint"].decode(errors="replace")
            if kind == zmq.EVENT_CONNECTED:
                self.down_since.pop(endpoint, None)
            elif kind == zmq.EVENT_DISCONNECTED:
                self.down_since.setdefault(endpoint, time.monotonic())
            else:
                self.handshake_failures.append({zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused",
                                                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error"}.get(
                                                    kind, "no detail"))

    def _send_alive(self) -> None:
        if self.reliable and time.monotonic() - self._alive >= ALIVE_EVERY:
            self._alive = time.monotonic()
            self._upstream(wire.alive(self.name, self.instance))

    def _upstream(self, data: bytes) -> None:
        try:
            self.socket.send(data, zmq.NOBLOCK)
        except zmq.Again:  # no engine connected now: nothing to tell
            pass

    def receive(self, frames: list[zmq.Frame]) -> None:
        """One received message as ZeroMQ frames: decoded and handled."""
        self.handle(message_parts(frames))

    def handle(self, parts: list) -> None:
        """Checks one message, its place in its topic's sequence, and dispatches it to its callback; a message
        that breaks the protocol is refused (counted, reported once per rule)."""
        try:
            frame = wire.decode(parts, self.limits, self.bfloat16_as, self.sparse)
        except WireError as error:
            self.refuse(error)
            return
        self.dispatch(frame)

    def refuse(self, error: WireError) -> None:
        if error.kind not in self.rejected:
            print(f"{self.name}: refused a message ({error}); further ones breaking this rule are counted",
                  file=self.stream, flush=True)
        self.rejected[error.kind] = self.rejected.get(error.kind, 0) + 1

    def dispatch(self, frame: wire.Frame) -> None:
        head, kind = frame.header, frame.header["kind"]
        if kind == "receipt":
            self.receipts.add(head["engine"])
            return
        if kind == "welcome":
            if self.reliable:
                state = self.state()
                if self.run_id is not None and self.summary is None:  # what the folder holds is this run's
                    state = {**state, "run": self.run_id, "complete": False}
                self._upstream(wire.hello(self.name, self.instance, state))
            return
        if kind == "run_start":
            self._start(frame)
            return
        if self.run_id is None:
            self.late = True  # the run started before this subscriber was in: it cannot be complete
            if kind == "run_end":  # and it ends here, for this subscriber too
                self.run_id, self.run_info = head["run"], {}
                self._end(frame.body)
            return
        if head["run"] != self.run_id:
            return
        key = self.count(frame.topic, head)
        if kind == "activation":
            self.on_activation(frame)
        elif kind == "tokens":
            self.on_tokens(frame)
        elif kind == "result":
            self.on_result(frame.body)
        elif kind == "batch_end":
            self.on_batch_end(frame.body)
        elif kind == "intervention":
            self.on_intervention(frame.body)
        elif kind == "stats":
            self.on_stats(frame.body)
        elif kind == "run_end":
            self.ends[key[0]] = frame.body
            if len(self.ends) >= int((self.run_info or {}).get("engines", 1)):
                self._end(_merge_ends(self.ends))

    def _start(self, frame: wire.Frame) -> None:
        """A run starts, or a new segment of it (an engine restarted into this running sink): counts start over,
        what the subscriber holds stays."""
        head = frame.header
        if head["run"] == self.run_id:  # another engine of the same run
            self.count(frame.topic, head)
            return
        self.run_id, self.run_info = head["run"], frame.body
        self.expected_seq, self.received, self.gaps, self.ends, self.late = {}, {}, [], {}, False
        self.count(frame.topic, head)
        self.on_run_start(frame.body)

    def _end(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.on_run_end(summary)
        if self.reliable and self.run_id is not None:
            received: dict[str, dict[str, int]] = {}
            for (engine, topic), n in self.received.items():
                received.setdefault(engine, {})[topic] = n
            parts = self.shortfall_parts(engine=False)
            self._ack = wire.ack(self.name, self.instance, self.run_id, not parts, "; ".join(parts) or "complete",
                                 received, sum(self.rejected.values()))
            self._upstream(self._ack)

    def count(self, topic: str, header: dict[str, Any]) -> tuple[str, str]:
        """Notes a message of ``topic`` and any gap before it; returns its (engine, topic) key."""
        seq, key = header["seq"], (header["engine"], topic)
        expected = self.expected_seq.get(key, 0)
        if seq != expected:
            self.gaps.append(f"{topic} of engine {key[0]}: expected seq {expected}, got {seq}")
        self.expected_seq[key] = seq + 1
        self.received[key] = self.received.get(key, 0) + 1
        return key

    def abort(self, reason: str) -> None:
        """Ends a run that will not send ``run.end`` (engine gone, sink stopped): finishes it as incomplete."""
        if self.summary is None and self.run_info is not None:
            self.aborted = reason
            self.summary = {"complete": False, "reason": reason, "topics": {}}
            self.on_run_end(self.summary)
        self.close()

    def close(self) -> None:
        if not self.monitor.closed:
            self.socket.disable_monitor()
            self.monitor.close(0)
        if not self.socket.closed:
            self.socket.close()


class LossySubscriber(Subscriber):
    """For live views: connects to the lossy endpoint; may miss messages, never slows the engine. Its run is
    complete when the engine says so: what a live view missed is not a loss."""

    reliable = False

    def shortfall_parts(self, engine: bool = True) -> list[str]:
        parts = [self.aborted] if self.aborted else []
        if engine and self.summary is not None and not self.summary.get("complete"):
            parts.append(f"the engine says: {self.summary.get('reason') or 'incomplete'}")
        return parts

    def dispatch(self, frame: wire.Frame) -> None:
        if frame.header["kind"] == "run_start" or self.run_id is not None:
            super().dispatch(frame)
        elif frame.header["kind"] in ("stats", "run_end"):  # joined late: a live view takes what comes
            self.run_id = frame.header["run"]
            self.run_info = {}
            super().dispatch(frame)


def _merge_ends(ends: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One run.end for a run served by several engines: totals added, complete only if all are."""
    merged: dict[str, Any] = {"complete": all(e.get("complete") for e in ends.values()), "engines": sorted(ends)}
    reasons = sorted({e.get("reason") for e in ends.values() if e.get("reason")})
    merged["reason"] = "; ".join(reasons) or None
    for key in ("prompts_done", "tokens", "prompt_tokens", "bytes_raw", "bytes_wire"):
        merged[key] = sum(e.get(key, 0) for e in ends.values())
    merged["max_tokens"] = max((e.get("max_tokens", 0) for e in ends.values()), default=0)
    merged["prompts_total"] = sum(e.get("prompts_total", 0) for e in ends.values())
    merged["seconds"] = max((e.get("seconds", 0) for e in ends.values()), default=0)
    for key in ("engine_waited_seconds", "sinks_waited_seconds"):  # the engine held back longest
        merged[key] = max((e.get(key, 0.0) for e in ends.values()), default=0.0)
    merged["tokens_per_second"] = merged["tokens"] / merged["seconds"] if merged["seconds"] else 0.0
    merged["prompt_tokens_per_second"] = merged["prompt_tokens"] / merged["seconds"] if merged["seconds"] else 0.0
    topics: dict[str, int] = {}
    for end in ends.values():
        for topic, count in end.get("topics", {}).items():
            topics[topic] = topics.get(topic, 0) + count
    merged["topics"] = topics
    merged["notes"] = [note for end in ends.values() for note in end.get("notes") or ()]
    saes: dict[str, dict[str, Any]] = {}
    for end in ends.values():  # each SAE's means over every engine's positions
        for name, sae in (end.get("saes") or {}).items():
            if not isinstance(sae, dict):
                continue
            total = saes.setdefault(name, {"site": sae.get("site"), "positions": 0, "error": 0.0, "l0": 0.0})
            count = sae.get("positions", 0)
            total["positions"] += count
            total["error"] += sae.get("mean_error", 0.0) * count
            total["l0"] += sae.get("mean_l0", 0.0) * count
    merged["saes"] = {name: {"site": t["site"], "positions": t["positions"],
                             "mean_error": t["error"] / max(t["positions"], 1),
                             "mean_l0": t["l0"] / max(t["positions"], 1)} for name, t in saes.items()}
    return merged
