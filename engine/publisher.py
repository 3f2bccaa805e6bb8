"""The publisher: engine events onto ZeroMQ topics, off the model's critical path.

Two endpoints:

* **reliable** (an XPUB socket with ``XPUB_NODROP``): for archival sinks. When
  a subscriber's queue is full, sending blocks, so a slow sink slows the
  engine down instead of losing frames. Before publishing, the publisher
  waits until the number of sinks it was told to expect have subscribed to
  their ``hello.<sink>`` topic (a sink subscribes to it last, so its other
  subscriptions are in effect too).
* **lossy** (a plain PUB socket): for live views. A slow subscriber loses
  frames; the engine never waits for it.

The engine thread hands events to a bounded queue (it blocks only when the
queue is full), a step's activation frames as one item with the event after
them (the sender wakes once per step, not once per frame); a sender thread
converts, compresses and sends: frames of a megabyte or more are compressed on
a pool of threads (lz4 releases the GIL), smaller ones by the sender itself
(handing them over would cost more than compressing them), and ZeroMQ copies
those smaller payloads rather than tracking them for release (a release
notice per frame wakes pyzmq's collector thread). Frames of one topic go out
in order, and a step's frames before its tokens (sinks complete a step on its
tokens). Every topic has its own sequence numbers; ``run.end`` carries the
count per topic so each sink can check that it has everything, and, with
``stats``, how long the engine waited for the bus and the sender for the sinks
(which says whether a slow sink sets the pace).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from .errors import GemmalensError
from .frames import VERSION, activation_topic, encode_array, message
from .generation import ActivationEvent, BatchEndEvent, ResultEvent, StepEvent

_STOP = object()
INLINE_BYTES = 1 << 20  # activation frames below this size are compressed by the sender thread itself, and copied


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


class PublisherError(GemmalensError):
    """The bus could not be set up (address in use, sinks that never came) or failed."""


class Publisher:
    """Publishes one run's events: ``start``, then ``publish`` each event, then ``finish``."""

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
    ):
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.engine_id = engine_id
        self.expect_names = set(expect_names)
        self._curve = curve
        self.codec = codec
        self.expect = expect
        self.sync_timeout = sync_timeout
        self.context = context or zmq.Context.instance()
        self._queue: queue.Queue = _FrameQueue(maxsize=queue_size)  # frames waiting for the sender, at most
        self._held: list[ActivationEvent] = []  # this step's activation events, queued with the next other event
        self._workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=self._workers)
        self._error: BaseException | None = None
        self.counts: Counter = Counter()
        self.bytes_raw = 0
        self.bytes_wire = 0
        self.engine_waited = 0.0  # seconds the engine thread waited for room in the queue: the bus was behind
        self.sinks_waited = 0.0  # seconds the sender waited for room at the reliable endpoint: a sink was behind
        self.sinks: set[str] = set()
        self._rows: tuple = ((None, None, None), "")  # the last step's row lists and their JSON
        self._reliable = self._bind(zmq.XPUB, reliable, high_water_mark, curve) if reliable else None
        if self._reliable is not None:
            self._reliable.setsockopt(zmq.XPUB_NODROP, 1)
            self._reliable.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._lossy = self._bind(zmq.PUB, lossy, high_water_mark, curve) if lossy else None
        self._thread = threading.Thread(target=self._send_loop, name="gemmalens-publisher", daemon=True)

    def _bind(self, kind, addresses, hwm, curve):
        sock = self.context.socket(kind)
        sock.copy_threshold = INLINE_BYTES  # smaller payloads copied: no release notice to pyzmq's collector
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 5000)
        if curve is not None:
            curve.serve(sock)
        for address in [addresses] if isinstance(addresses, str) else addresses:
            try:
                sock.bind(address)
            except zmq.ZMQError as error:
                sock.close(0)
                reason = ("the port is in use by another process" if error.errno == zmq.EADDRINUSE else
                          error.strerror)
                raise PublisherError(f"cannot bind {address}: {reason}; choose another address or port "
                                     "(tcp://127.0.0.1:0 picks a free one)") from None
        return sock

    @property
    def endpoints(self) -> dict[str, str | None]:
        """The addresses actually bound (a ``tcp://*:0`` bind shows its port here)."""
        def last(sock):
            return sock.getsockopt_string(zmq.LAST_ENDPOINT) if sock is not None else None

        return {"reliable": last(self._reliable), "lossy": last(self._lossy)}

    # engine side -------------------------------------------------------------

    def start(self, run_info: dict[str, Any], should_stop=lambda: False) -> None:
        """Waits for the expected sinks, then publishes ``run.start`` and starts sending."""
        self._wait_for_sinks(should_stop)
        self._thread.start()
        self._put(("json", "run.start", "run_start", {**run_info, "run": self.run_id}))

    def publish(self, event) -> None:
        """Queues one engine event (blocks only while the queue is full). Activation events wait for the next
        event of another kind (the engine follows a step's values with its tokens) and go with it."""
        if isinstance(event, ActivationEvent):
            self._held.append(event)
            return
        self._put_held()
        if isinstance(event, StepEvent):
            self._put(("json", "tokens", "tokens", {"batch": event.batch, "step": event.step, "prompts": event.indices,
                                                    "tokens": event.tokens, "positions": event.positions}))
        elif isinstance(event, ResultEvent):
            self._put(("json", "result", "result", event.result.to_dict()))
        elif isinstance(event, BatchEndEvent):
            self._put(("json", "batch.end", "batch_end", {"batch": event.batch, "prompts": event.indices,
                                                             "steps": event.steps}))

    def stats(self, values: dict[str, Any]) -> None:
        self._put(("json", "stats", "stats", {**values, "queue_depth": self._queue.qsize(), **self._waits()}))

    def _waits(self) -> dict[str, float]:
        return {"engine_waited_seconds": round(self.engine_waited, 3),
                "sinks_waited_seconds": round(self.sinks_waited, 3)}

    def finish(self, complete: bool, reason: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publishes ``run.end`` with the totals, flushes and closes. Returns the totals."""
        totals = {"complete": complete, "reason": reason, **(extra or {})}
        self._put_held()  # a run stopped between a step's values and its tokens: the values still go out
        self._put(("end", totals))
        self._put(_STOP)
        self._thread.join()
        self.close()
        if self._error is not None:
            raise PublisherError(f"publishing failed: {self._error}") from self._error
        return totals

    def close(self) -> None:
        """Closes the sockets (pending messages get the linger time to leave)."""
        self._pool.shutdown()
        for sock in (self._reliable, self._lossy):
            if sock is not None and not sock.closed:
                sock.close()
        if self._curve is not None:
            self._curve.close()

    def _put_held(self) -> None:
        """Queues the activation events held back so far, as one item."""
        if self._held:
            self._put(("arrays", self._held))
            self._held = []

    def _put(self, item) -> None:
        if self._error is not None:
            raise PublisherError(f"publishing failed: {self._error}") from self._error
        try:
            self._queue.put_nowait(item)
        except queue.Full:  # the sender is behind: wait, and count the wait
            started = time.perf_counter()
            self._queue.put(item)
            self.engine_waited += time.perf_counter() - started

    def _wait_for_sinks(self, should_stop) -> None:
        if self._reliable is None or (self.expect <= 0 and not self.expect_names):
            return
        deadline = time.monotonic() + self.sync_timeout
        while len(self.sinks) < self.expect or not self.expect_names <= self.sinks:
            remaining = deadline - time.monotonic()
            if should_stop():
                self.close()
                raise PublisherError("stopped while waiting for the sinks; nothing was published")
            if remaining <= 0:
                absent = sorted(self.expect_names - self.sinks)
                message = (
                    f"waited {self.sync_timeout:.0f} s for {self.expect} sink(s) on {self.endpoints['reliable']}, "
                    f"{len(self.sinks)} came ({', '.join(sorted(self.sinks)) or 'none'})"
                    + (f", not {', '.join(absent)}" if absent else "")
                    + "; start the sinks with --connect to that address, or expect fewer"
                )
                self.close()
                raise PublisherError(message)
            if self._reliable.poll(int(min(remaining, 0.5) * 1000)):
                self._read_subscription()

    def _read_subscription(self) -> None:
        event = self._reliable.recv()
        if event[:1] == b"\x01" and event[1:].startswith(b"hello."):
            self.sinks.add(event[7:].decode(errors="replace"))

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
            while pending:
                self._send(pending.popleft().result())
        except BaseException as error:  # reported to the engine thread on its next call
            self._error = error
            while not self._queue.empty():
                self._queue.get_nowait()

    def _json_message(self, item):
        if item[0] == "end":
            totals = item[1]
            totals.update(topics=dict(self.counts), bytes_raw=self.bytes_raw, bytes_wire=self.bytes_wire,
                          **self._waits())
            return self._frame("run.end", {"kind": "run_end"}, totals)
        _, topic, kind, body = item
        return self._frame(topic, {"kind": kind}, body)

    def _frame(self, topic: str, fields: dict[str, Any], payload) -> list[bytes]:
        return message(topic, self._header(topic, fields), payload)

    def _header(self, topic: str, fields: dict[str, Any]) -> dict[str, Any]:
        """The fields every header has, with the topic's next sequence number, then ``fields``."""
        header = {"v": VERSION, "run": self.run_id, "engine": self.engine_id, "seq": self.counts[topic], **fields}
        self.counts[topic] += 1
        return header

    def _encode(self, event: ActivationEvent):
        array, dtype = event.host()
        payload = encode_array(array, dtype, self.codec)
        fields = {"kind": "activation", "batch": event.batch, "step": event.step, "name": event.name, "dtype": dtype,
                  "shape": list(array.shape), "codec": self.codec, "nbytes": array.nbytes}
        return activation_topic(event.name), fields, self._rows_json(event), payload, array.nbytes

    def _rows_json(self, event: ActivationEvent) -> str:
        """The header's prompts, positions and pads as JSON members: a step's events share these lists (the engine
        builds them once per step), so they are encoded once per step too."""
        lists, cached = (event.indices, event.positions, event.pads), self._rows  # read once: pool threads call it too
        if all(a is b for a, b in zip(lists, cached[0])):
            return cached[1]
        text = json.dumps({"prompts": event.indices, "positions": event.positions, "pads": event.pads})[1:-1]
        self._rows = (lists, text)  # the lists are kept with their text, so their ids cannot be reused meanwhile
        return text

    def _send(self, frame) -> None:
        if isinstance(frame, tuple):  # an encoded activation: its header is completed here, with its sequence number
            topic, fields, rows, payload, raw = frame
            header = json.dumps(self._header(topic, fields))
            parts = [topic.encode(), f"{header[:-1]}, {rows}}}".encode(), payload]
            self.bytes_raw += raw
            self.bytes_wire += len(payload)
        else:
            parts = frame
        if self._reliable is not None and not self._send_parts(self._reliable, parts):
            started = time.perf_counter()
            while not self._send_parts(self._reliable, parts):  # a reliable sink is behind: wait for room
                if self._reliable.poll(50, zmq.POLLIN | zmq.POLLOUT) & zmq.POLLIN:
                    self._read_subscription()
            self.sinks_waited += time.perf_counter() - started
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
