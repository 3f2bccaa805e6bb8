"""The base class of every subscriber: connect, filter topics, decode, check completeness.

Subclass ``Subscriber`` and override the callbacks you need::

    class Norms(Subscriber):
        topics = ("act.model.layers.5.resid_out",)

        def on_activation(self, frame):
            print(frame.header["step"], np.linalg.norm(frame.body, axis=-1))

Callbacks receive decoded ``Frame`` objects (frame.topic, frame.header,
frame.body). ``run`` returns when ``run.end`` arrives; ``self.complete`` then
says whether every frame of the subscribed topics arrived (sequence numbers
without gaps, counts equal to the engine's totals).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from gemmalens.engine.frames import Frame, decode

CONTROL = ("run.start", "run.end", "stats", "batch.end")  # every subscriber receives these


# Messages a reliable subscriber holds unread; beyond them the engine waits (back-pressure; nothing is dropped). With
# no bound (0), a sink slower than the engine buffered everything it had not written yet: memory without limit.
RELIABLE_HWM = 256


def message_parts(frames: list[zmq.Frame]) -> list:
    """A received message's frames as ``decode`` takes them: topic and header as bytes, the payload read where
    ZeroMQ received it (not copied)."""
    return [frame.bytes for frame in frames[:2]] + [frame.buffer for frame in frames[2:]]


class SinkError(RuntimeError):
    """A subscriber could not complete its run (no engine came, timed out)."""


class Subscriber:
    """Receives one run from an engine's reliable (default) or lossy endpoint."""

    topics: tuple[str, ...] = ("",)  # topic prefixes; "" is everything
    reliable = True  # subscribers of the lossy endpoint set False

    def __init__(self, connect: str | list[str], name: str | None = None, topics=None, context=None, curve=None,
                 bfloat16_as: str = "float32"):
        self.name = name or f"{type(self).__name__.lower()}-{uuid.uuid4().hex[:6]}"
        self.topics = tuple(topics) if topics is not None else type(self).topics
        self.context = context or zmq.Context.instance()
        self.bfloat16_as = bfloat16_as
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, RELIABLE_HWM if self.reliable else 1000)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.connect(self.socket)
        self.addresses = [connect] if isinstance(connect, str) else list(connect)
        for address in self.addresses:
            self.socket.connect(address)
        prefixes = CONTROL + self.topics if "" not in self.topics else ("",)
        for prefix in prefixes:
            self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.socket.setsockopt(zmq.SUBSCRIBE, f"hello.{self.name}".encode())  # last: tells the engine we are in
        self.expected_seq: dict[tuple[str, str], int] = {}
        self.received: dict[tuple[str, str], int] = {}
        self.gaps: list[str] = []
        self.run_info: dict[str, Any] | None = None
        self.ends: dict[str, dict[str, Any]] = {}  # run.end per engine
        self.summary: dict[str, Any] | None = None
        self.aborted: str | None = None

    # override these ----------------------------------------------------------

    def on_run_start(self, info: dict[str, Any]) -> None: ...

    def on_tokens(self, frame: Frame) -> None: ...

    def on_activation(self, frame: Frame) -> None: ...

    def on_result(self, result: dict[str, Any]) -> None: ...

    def on_batch_end(self, batch: dict[str, Any]) -> None: ...

    def on_stats(self, stats: dict[str, Any]) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None: ...

    # machinery ---------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every frame of the subscribed topics arrived, none missing, none duplicated."""
        if self.summary is None or self.gaps or self.aborted:
            return False
        return not self.missing()

    def missing(self) -> dict[str, int]:
        """Messages the engines sent on subscribed topics that did not arrive, by topic."""
        out: dict[str, int] = {}
        for engine, end in self.ends.items():
            for topic, sent in end.get("topics", {}).items():
                got = self.received.get((engine, topic), 0)
                if self._wants(topic) and got != sent:
                    out[topic] = out.get(topic, 0) + sent - got
        return out

    def _wants(self, topic: str) -> bool:
        return topic in CONTROL or any(topic.startswith(p) for p in self.topics)

    def run(self, timeout: float | None = None, idle_timeout: float | None = None, on_wait=None,
            wait_every: float = 5.0) -> bool:
        """Receives until ``run.end``; returns ``self.complete``.

        ``timeout`` bounds the whole wait for the run to start and end,
        ``idle_timeout`` the silence between messages (waiting for the run to
        start included). Until the run starts, ``on_wait(seconds_waited)`` is
        called every ``wait_every`` seconds.
        """
        started = last = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            while self.summary is None:
                now = time.monotonic()
                waits = [wait_every]
                if idle_timeout is not None:
                    waits.append(last + idle_timeout - now)
                if deadline is not None:
                    waits.append(deadline - now)
                if min(waits) <= 0 or not self.socket.poll(int(max(0.0, min(waits)) * 1000)):
                    now = time.monotonic()
                    if (deadline is not None and now >= deadline) or (idle_timeout is not None
                                                                       and now - last >= idle_timeout):
                        raise SinkError(
                            f"{self.name}: no message for {now - last:.0f} s"
                            + (f" from {', '.join(self.addresses)}; is an engine running there?"
                               if self.run_info is None else " in the middle of the run; the engine stopped or died")
                        )
                    if self.run_info is None and on_wait is not None:
                        on_wait(now - started)
                    continue
                self.receive(self.socket.recv_multipart(copy=False))
                last = time.monotonic()
        finally:
            self.close()
        return self.complete

    def shortfall(self) -> str:
        """What makes the run incomplete, in words."""
        parts = []
        if self.aborted:
            parts.append(self.aborted)
        if self.gaps:
            parts.append(f"{len(self.gaps)} gap(s), first {self.gaps[0]}")
        missing = self.missing()
        if missing:
            parts.append("missing " + ", ".join(f"{n} {topic}" for topic, n in sorted(missing.items())))
        if self.summary is not None and not self.summary.get("complete"):
            parts.append(f"the engine says {self.summary.get('reason') or 'incomplete'}")
        return "; ".join(parts) or "complete"

    def receive(self, frames: list[zmq.Frame]) -> None:
        """One received message as ZeroMQ frames: decoded and handled."""
        self.handle(message_parts(frames))

    def handle(self, parts: list[bytes]) -> None:
        """Checks the sequence of one message and dispatches it to its callback."""
        topic = parts[0].decode()
        if topic.startswith("hello."):
            return
        frame = decode(parts, self.bfloat16_as)
        key = self.count(topic, frame.header)
        kind = frame.header.get("kind")
        if kind == "run_start":
            if self.run_info is None:  # several engines of one run send the same prompt set
                self.run_info = frame.body
                self.on_run_start(frame.body)
        elif kind == "activation":
            self.on_activation(frame)
        elif kind == "tokens":
            self.on_tokens(frame)
        elif kind == "result":
            self.on_result(frame.body)
        elif kind == "batch_end":
            self.on_batch_end(frame.body)
        elif kind == "stats":
            self.on_stats(frame.body)
        elif kind == "run_end":
            self.ends[key[0]] = frame.body
            if len(self.ends) >= int((self.run_info or {}).get("engines", 1)):
                self.summary = _merge_ends(self.ends)
                self.on_run_end(self.summary)

    def count(self, topic: str, header: dict[str, Any]) -> tuple[str, str]:
        """Notes a message of ``topic`` and any gap before it; returns its (engine, topic) key."""
        seq, key = header.get("seq"), (str(header.get("engine", "0")), topic)
        expected = self.expected_seq.get(key, 0)
        if seq != expected:
            self.gaps.append(f"{topic}: expected seq {expected}, got {seq}")
        self.expected_seq[key] = seq + 1
        self.received[key] = self.received.get(key, 0) + 1
        return key

    def abort(self, reason: str) -> None:
        """Ends a run that will not send ``run.end`` (engine gone, sink stopped): finishes as incomplete."""
        self.close()
        if self.summary is None and self.run_info is not None:
            self.aborted = reason
            self.summary = {"complete": False, "reason": reason, "topics": {}}
            self.on_run_end(self.summary)

    def close(self) -> None:
        if not self.socket.closed:
            self.socket.close(0)


class LossySubscriber(Subscriber):
    """For live views: connects to the lossy endpoint; may miss frames, never slows the engine. Its run is
    complete when the engine says so: what a live view missed is not a loss."""

    reliable = False

    @property
    def complete(self) -> bool:
        return self.summary is not None and not self.aborted and bool(self.summary.get("complete"))

    def missing(self) -> dict[str, int]:
        return {}


def _merge_ends(ends: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One run.end for a run served by several engines: totals added, complete only if all are."""
    merged: dict[str, Any] = {"complete": all(e.get("complete") for e in ends.values()), "engines": sorted(ends)}
    reasons = sorted({e.get("reason") for e in ends.values() if e.get("reason")})
    merged["reason"] = "; ".join(reasons) or None
    for key in ("prompts_done", "tokens", "bytes_raw", "bytes_wire"):
        merged[key] = sum(e.get(key, 0) for e in ends.values())
    merged["prompts_total"] = max((e.get("prompts_total", 0) for e in ends.values()), default=0)
    merged["seconds"] = max((e.get("seconds", 0) for e in ends.values()), default=0)
    for key in ("engine_waited_seconds", "sinks_waited_seconds"):  # the engine held back longest
        merged[key] = max((e.get(key, 0.0) for e in ends.values()), default=0.0)
    merged["tokens_per_second"] = merged["tokens"] / merged["seconds"] if merged["seconds"] else 0.0
    topics: dict[str, int] = {}
    for end in ends.values():
        for topic, count in end.get("topics", {}).items():
            topics[topic] = topics.get(topic, 0) + count
    merged["topics"] = topics
    return merged
