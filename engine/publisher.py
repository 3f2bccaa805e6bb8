"""The publisher: engine events onto ZeroMQ topics, off the model's critical path, and the run's end proven.

Two endpoints:

* **reliable** (an XPUB socket with ``XPUB_NODROP``): for archival sinks. When a subscriber's queue is full,
  sending waits, so a slow sink slows the engine down instead of losing frames. Subscribers talk back on it
  (they connect XSUB sockets): a presence subscription ``hello.<sink>.<instance>`` (subscribed last, so its
  other subscriptions are in effect), answered by the engine's welcome and the sink's ``hello`` (what it
  already holds); an ``alive`` every second; at the end an ``ack`` (everything it received is on disk).
* **lossy** (a plain PUB socket): for live views. A slow subscriber loses frames; the engine never waits.

``wait_for_sinks`` holds the run until the expected sinks have said hello; they, and every reliable sink
present then, are the run's participants. ``finish`` publishes ``run.end`` and returns only when every
participant still connected has acknowledged it (or the wait ran out): a run is complete only if each says it
has everything. A participant that disconnects, or stays silent for ``sink_timeout`` seconds while the
engine waits on it, is lost: the next ``publish`` raises ``SinkLost`` naming it.

The engine thread hands events to a bounded queue (waiting only while it is full, and checking for a stop
request meanwhile), a step's activation frames as one item with the event after them; a sender thread
converts, compresses and sends. Frames of a megabyte or more are compressed on a pool of threads (lz4
releases the GIL), smaller ones by the sender itself; ZeroMQ copies those smaller payloads rather than
tracking them for release. Frames of one topic go out in order, and a step's frames before its tokens.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from gemmalens import wire
from gemmalens.errors import GemmalensError, SinkLost

from .events import ActivationEvent, BatchEndEvent, InterventionEvent, ResultEvent, StepEvent

_STOP = object()
INLINE_BYTES = 1 << 20  # activation frames below this size are compressed by the sender thread itself, and copied


class PublisherError(GemmalensError):
    """The bus could not be set up (address in use, sinks that never came), or it failed."""


class Stopped(GemmalensError):
    """A stop was requested while the engine waited for the bus."""


class _FrameQueue(queue.Queue):
    """A queue whose size counts frames: an item holding n activation frames counts n (any other item 1)."""

    def _init(self, maxsize):
        super()._init(maxsize)
        self.frames = 0

    def _qsize(self):
        return self.frames

    def _put(self, item):
        super()._put(item)
        self.frames += _weight(item)

    def _get(self):
        item = super()._get()
        self.frames -= _weight(item)
        return item


def _weight(item) -> int:
    return len(item[1]) if isinstance(item, tuple) and item[0] == "arrays" else 1


@dataclass
class Sink:
    """A reliable subscriber as the engine knows it."""

    name: str
    instance: str
    state: dict[str, Any] | None = None  # from its hello; None until it said hello
    seen: float = field(default_factory=time.monotonic)  # its last message
    connected: bool = True
    gone_since: float | None = None  # when its connection ended (it may come back)
    participant: bool = False  # present when the run started: the run waits for its ack
    ack: dict[str, Any] | None = None
    lost: bool = False


class Publisher:
    """Publishes one run's events: ``wait_for_sinks``, ``start``, ``publish`` each event, then ``finish``."""

    def __init__(
        self,
        reliable: str | list[str] | None = None,
        lossy: str | list[str] | None = None,
        expect: int = 0,
        codec: str = "lz4",
        queue_size: int = 64,
        workers: int = 2,
        context: zmq.Context | None = None,
        run_id: str | None = None,
        sync_timeout: float = 60.0,
        high_water_mark: int = 256,
        curve=None,
        engine_id: str = "0",
        expect_names: tuple[str, ...] = (),
        sink_timeout: float = 120.0,
        reconnect_grace: float = 10.0,
    ):
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.engine_id = engine_id
        self.expect = expect
        self.expect_names = set(expect_names)
        self.sync_timeout = sync_timeout
        self.sink_timeout = sink_timeout
        self.reconnect_grace = reconnect_grace
        self.codec = codec
        self._curve = curve
        self.context = context or zmq.Context.instance()
        self._queue: queue.Queue = _FrameQueue(maxsize=queue_size)  # frames waiting for the sender, at most
        self._held: list[ActivationEvent] = []  # this step's activation events, queued with the next other event
        self._workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=self._workers)
        self._rows = wire.RowsEncoder()
        self._error: BaseException | None = None
        self._should_stop: Callable[[], bool] = lambda: False
        self.counts: Counter = Counter()
        self.bytes_raw = 0
        self.bytes_wire = 0
        self.engine_waited = 0.0  # seconds the engine thread waited for room in the queue: the bus was behind
        self.sinks_waited = 0.0  # seconds the sender waited for room at the reliable endpoint: a sink was behind
        self.sinks: dict[str, Sink] = {}  # by instance
        self.lost: list[str] = []  # what went wrong with participants, in words
        self.rejected: list[str] = []  # upstream messages that made no sense
        self._reliable = self._bind(zmq.XPUB, reliable, high_water_mark, curve) if reliable else None
        if self._reliable is not None:
            self._reliable.setsockopt(zmq.XPUB_NODROP, 1)
            self._reliable.setsockopt(zmq.XPUB_VERBOSER, 1)
        self._lossy = self._bind(zmq.PUB, lossy, high_water_mark, curve) if lossy else None
        self._thread = threading.Thread(target=self._send_loop, name="gemmalens-publisher", daemon=True)

    def _bind(self, kind, addresses, hwm, curve):
        sock = self.context.socket(kind)
        sock.copy_threshold = INLINE_BYTES  # smaller payloads copied: no release notice to pyzmq's collector
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)  # what matters has been acknowledged before closing
        if curve is not None:
            curve.serve(sock)
        for address in [addresses] if isinstance(addresses, str) else addresses:
            try:
                sock.bind(address)
            except zmq.ZMQError as error:
                sock.close(0)
                reason = "the port is in use by another process" if error.errno == zmq.EADDRINUSE else error.strerror
                raise PublisherError(f"cannot bind {address}: {reason}; choose another address or port "
                                     "(tcp://127.0.0.1:0 picks a free one)") from None
        return sock

    @property
    def endpoints(self) -> dict[str, str | None]:
        """The addresses actually bound (a ``tcp://*:0`` bind shows its port here)."""
        def last(sock):
            return sock.getsockopt_string(zmq.LAST_ENDPOINT) if sock is not None else None

        return {"reliable": last(self._reliable), "lossy": last(self._lossy)}

    @property
    def participants(self) -> list[Sink]:
        return [s for s in self.sinks.values() if s.participant]

    # engine side -------------------------------------------------------------

    def wait_for_sinks(self, should_stop: Callable[[], bool] = lambda: False) -> list[Sink]:
        """Waits until the expected sinks have said hello (at most ``sync_timeout`` seconds); returns every
        reliable sink that has, with what each already holds. They become the run's participants."""
        self._should_stop = should_stop
        if self._reliable is None:
            return []
        deadline = time.monotonic() + self.sync_timeout
        while True:
            ready = [s for s in self.sinks.values() if s.state is not None and s.connected]
            names = {s.name for s in ready}
            if len(ready) >= self.expect and self.expect_names <= names:
                break
            remaining = deadline - time.monotonic()
            if should_stop():
                self.close()
                raise Stopped("stopped while waiting for the sinks; nothing was published")
            if remaining <= 0:
                absent = sorted(self.expect_names - names)
                message = (
                    f"waited {self.sync_timeout:.0f} s for {max(self.expect, len(self.expect_names))} sink(s) on "
                    f"{self.endpoints['reliable']}, {len(ready)} came ({', '.join(sorted(names)) or 'none'})"
                    + (f", not {', '.join(absent)}" if absent else "")
                    + "; start the sinks with --connect to that address, or expect fewer"
                )
                self.close()
                raise PublisherError(message)
            if self._reliable.poll(int(min(remaining, 0.2) * 1000)):
                self._read_upstream()
        for sink in ready:
            sink.participant = True
        return ready

    def start(self, run_info: dict[str, Any]) -> None:
        """Publishes ``run.start`` and starts sending (after ``wait_for_sinks``)."""
        self._thread.start()
        self._put(("json", wire.RUN_START, {**run_info, "run": self.run_id}))

    def publish(self, event) -> None:
        """Queues one engine event (waits only while the queue is full). Activation events wait for the next
        event of another kind (the engine follows a step's values with its tokens) and go with it. Raises
        ``SinkLost`` once a participant is lost."""
        if self.lost:
            raise SinkLost("; ".join(self.lost))
        if isinstance(event, ActivationEvent):
            self._held.append(event)
            return
        self._put_held()
        if isinstance(event, StepEvent):
            self._put(("json", wire.TOKENS, {"batch": event.batch, "step": event.step, "prompts": event.indices,
                                             "tokens": event.tokens, "positions": event.positions,
                                             "frames": event.frames}))
        elif isinstance(event, ResultEvent):
            self._put(("json", wire.RESULT, event.result.to_dict()))
        elif isinstance(event, BatchEndEvent):
            self._put(("json", wire.BATCH_END, {"batch": event.batch, "prompts": event.indices,
                                                "steps": event.steps}))
        elif isinstance(event, InterventionEvent):
            self._put(("json", wire.INTERVENTION, {"batch": event.batch, "step": event.step,
                                                   "interventions": event.interventions}))

    def stats(self, values: dict[str, Any]) -> None:
        self._put(("json", wire.STATS, {**values, "queue_depth": self._queue.qsize(), **self._waits()}))

    def _waits(self) -> dict[str, float]:
        return {"engine_waited_seconds": round(self.engine_waited, 3),
                "sinks_waited_seconds": round(self.sinks_waited, 3)}

    def finish(self, complete: bool, reason: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publishes ``run.end`` with the totals, waits for every participant's ``ack`` and closes. Returns the
        totals with ``sinks`` (each participant's ack, or what became of it); ``complete`` is true only if the
        engine finished and every participant has everything."""
        totals = {"complete": complete, "reason": reason, **(extra or {})}
        if self._thread.is_alive():
            try:
                self._put_held()  # a run stopped between a step's values and its tokens: the values still go out
                self._put(("end", totals))
                self._put(_STOP)
            except (Stopped, PublisherError, SinkLost):
                pass  # the sender stopped or gave up: nothing more can go out
            self._thread.join()
        self.close()
        totals["sinks"] = {s.name: (s.ack or {"complete": False, "detail": "lost" if s.lost else "no acknowledgement"})
                           for s in self.participants}
        shortfalls = [f"sink {s.name}: {s.ack.get('detail')}" for s in self.participants
                      if s.ack is not None and not s.ack.get("complete")]
        unanswered = [f"sink {s.name} did not acknowledge the run's end" for s in self.participants
                      if s.ack is None and not s.lost]
        if self.lost or shortfalls or unanswered:
            totals["complete"] = False
            totals["reason"] = "; ".join(filter(None, [reason, *self.lost, *shortfalls, *unanswered]))
        if self._error is not None and not isinstance(self._error, (Stopped, SinkLost)):
            raise PublisherError(f"publishing failed: {self._error}") from self._error
        return totals

    def close(self) -> None:
        self._pool.shutdown()
        for sock in (self._reliable, self._lossy):
            if sock is not None and not sock.closed:
                sock.close(0)
        if self._curve is not None:
            self._curve.close()

    def _put_held(self) -> None:
        if self._held:
            self._put(("arrays", self._held))
            self._held = []

    def _put(self, item) -> None:
        """Queues an item; while the queue is full, waits in short slices so that a stop request or a failed
        sender ends the wait."""
        if isinstance(self._error, (SinkLost, Stopped)):
            raise self._error
        if self._error is not None:
            raise PublisherError(f"publishing failed: {self._error}") from self._error
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:  # the sender is behind: wait, and count the wait
            pass
        started = time.perf_counter()
        try:
            while True:
                try:
                    self._queue.put(item, timeout=0.1)
                    return
                except queue.Full:
                    if self._should_stop():
                        raise Stopped("stopped while the bus was behind") from None
                    if isinstance(self._error, (SinkLost, Stopped)):
                        raise self._error
                    if self._error is not None or not self._thread.is_alive():
                        raise PublisherError(f"publishing failed: {self._error}") from self._error
        finally:
            self.engine_waited += time.perf_counter() - started

    # sinks talking back -----------------------------------------------------

    def _read_upstream(self) -> None:
        """Reads what subscribers sent on the reliable endpoint (the caller polled it)."""
        while True:
            try:
                data = self._reliable.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, body = wire.parse_upstream(data)
            if kind in ("subscribe", "unsubscribe"):
                found = wire.presence(body)
                if found is not None:
                    self._presence(*found, kind == "subscribe")
            elif kind == "invalid":
                if len(self.rejected) < 100:
                    self.rejected.append(body)
            else:
                self._from_sink(kind, body)

    def _presence(self, name: str, instance: str, arrived: bool) -> None:
        sink = self.sinks.get(instance)
        if arrived:
            if sink is None:
                sink = self.sinks[instance] = Sink(name, instance)
            sink.connected, sink.gone_since, sink.seen = True, None, time.monotonic()
            topic = wire.presence_topic(name, instance)  # the welcome: answered by the sink's hello
            head = wire.header(topic, "welcome", self.run_id, self.engine_id, 0)
            self._send_parts(self._reliable, wire.message(topic, head, {"engine": self.engine_id}))
        elif sink is not None:
            sink.connected, sink.gone_since = False, time.monotonic()

    def _from_sink(self, kind: str, body: dict[str, Any]) -> None:
        sink = self.sinks.get(body["instance"])
        if sink is None:
            sink = self.sinks[body["instance"]] = Sink(body["sink"], body["instance"])
        sink.seen = time.monotonic()
        if kind == "hello":
            sink.state = body.get("state") if isinstance(body.get("state"), dict) else {}
        elif kind == "ack" and body.get("run") == self.run_id:
            sink.ack = body
            topic = wire.presence_topic(sink.name, sink.instance)  # the receipt: the sink may go now
            head = wire.header(topic, "receipt", self.run_id, self.engine_id, 0)
            self._send_parts(self._reliable, wire.message(topic, head, {"run": self.run_id}))

    def check_sinks(self) -> None:
        """Notes participants lost: disconnected for ``reconnect_grace`` seconds without coming back, or silent
        for ``sink_timeout`` seconds while they owe something (the engine waits on them, or on their ack)."""
        now = time.monotonic()
        for sink in self.participants:
            if sink.lost or sink.ack is not None:
                continue
            if not sink.connected and now - sink.gone_since > self.reconnect_grace:
                reason = f"sink {sink.name} disconnected and did not come back within {self.reconnect_grace:.0f} s"
            elif sink.connected and now - sink.seen > self.sink_timeout:
                reason = f"sink {sink.name} stopped answering for {self.sink_timeout:.0f} s (stopped or hung?)"
            else:
                continue
            sink.lost = True
            self.lost.append(reason + "; what it had not written is missing")

    # sender thread -----------------------------------------------------------

    def _send_loop(self) -> None:
        pending: deque = deque()
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                if item[0] == "arrays":
                    for event in item[1]:
                        if event.nbytes >= INLINE_BYTES:  # large: compressed in parallel on the pool
                            pending.append(self._pool.submit(self._encode, event))
                        else:  # small: a hand-off to the pool would cost more than compressing it here
                            self._send(self._encode(event))  # may pass large ones: order holds per topic
                        while len(pending) > 2 * self._workers:
                            self._send(pending.popleft().result())
                    continue
                while pending:
                    self._send(pending.popleft().result())
                self._send(self._json_message(item))
                if item[0] == "end":
                    self._wait_for_acks()
            while pending:
                self._send(pending.popleft().result())
        except BaseException as error:  # reported to the engine thread on its next call
            self._error = error
            while not self._queue.empty():
                self._queue.get_nowait()

    def _wait_for_acks(self) -> None:
        """After ``run.end``: until every participant has acknowledged or is lost, or a stop."""
        if self._reliable is None:
            return
        while any(s.ack is None and not s.lost for s in self.participants):
            if self._should_stop():
                return
            self.check_sinks()
            if self._reliable.poll(100):
                self._read_upstream()

    def _json_message(self, item) -> list:
        if item[0] == "end":
            totals = item[1]
            self.counts[wire.RUN_END] += 1  # run.end counts itself
            totals.update(topics=dict(self.counts), bytes_raw=self.bytes_raw, bytes_wire=self.bytes_wire,
                          **self._waits())
            self.counts[wire.RUN_END] -= 1
            topic, body = wire.RUN_END, totals
        else:
            _, topic, body = item
        return wire.message(topic, self._header(topic, wire.KINDS[topic]), body)

    def _header(self, topic: str, kind: str, **fields) -> dict[str, Any]:
        """The fields every header has, with the topic's next sequence number, then ``fields``."""
        head = wire.header(topic, kind, self.run_id, self.engine_id, self.counts[topic], **fields)
        self.counts[topic] += 1
        return head

    def _encode(self, event: ActivationEvent):
        array, dtype = event.host()
        fields = {"batch": event.batch, "step": event.step, "name": event.name, "dtype": dtype,
                  "shape": list(array.shape), "axes": list(event.axes), "codec": self.codec, "nbytes": array.nbytes,
                  "slot": event.slot}
        if event.axes[-1] == "latents":  # SAE features: mostly zeros, sent as their nonzeros
            sparse = wire.Sparse.of(array)
            bytes_ = sparse.payload()
            codec = "raw" if self.codec == "raw" else "lz4"  # the shuffle is for arrays of one dtype
            fields.update(layout="sparse", nnz=len(sparse.indices), nbytes=bytes_.nbytes, codec=codec)
            payload = wire.encode_array(bytes_, codec)
        else:
            payload = wire.encode_array(array, self.codec)
        return wire.activation_topic(event.name), fields, self._rows.encode(event.indices, event.pads, event.live), \
            payload, array.nbytes

    def _send(self, frame) -> None:
        if isinstance(frame, tuple):  # an encoded activation: its header is completed here, with its sequence number
            topic, fields, rows, payload, raw = frame
            parts = [topic.encode(), wire.activation_header(self._header(topic, "activation", **fields), rows), payload]
            self.bytes_raw += raw
            self.bytes_wire += len(payload)
        else:
            parts = frame
        if self._reliable is not None:
            if not self._send_parts(self._reliable, parts):
                started = time.perf_counter()
                while not self._send_parts(self._reliable, parts):  # a reliable sink is behind: wait for room
                    if self._reliable.poll(50, zmq.POLLIN | zmq.POLLOUT) & zmq.POLLIN:
                        self._read_upstream()
                    if self._should_stop():
                        raise Stopped("stopped while a sink was behind")
                    self.check_sinks()
                    if any(s.lost and s.connected for s in self.participants):  # it holds the pipe full
                        raise SinkLost("; ".join(self.lost))
                self.sinks_waited += time.perf_counter() - started
            elif self._reliable.poll(0, zmq.POLLIN):
                self._read_upstream()
                self.check_sinks()
        if self._lossy is not None:
            self._send_parts(self._lossy, parts)  # PUB drops for slow subscribers, never blocks

    @staticmethod
    def _send_parts(sock: zmq.Socket, parts: list) -> bool:
        """Sends a message without blocking; False if the socket has no room. Topic and header are copied (cheaper
        for small parts), the payload only below the socket's copy threshold. A message is accepted whole or not at
        all, at its first part."""
        try:
            sock.send(parts[0], zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.Again:
            return False
        sock.send(parts[1], zmq.SNDMORE)
        sock.send(parts[2], copy=False)
        return True
