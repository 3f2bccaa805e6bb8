"""The npz archiver's work on files: a step's frames assembled and written, in its process or in helper processes.

``StepFiles`` collects the frames of each (batch, step) and, on the step's
tokens, hands the step's file to writer threads (sinks/npzfile.py). Each write
ends in an outcome, ``{"batch", "step", "file", "damaged", "error"}``, that the
archiver reads to build its index.

``Helpers`` spreads that work over helper processes, each with its own
``StepFiles`` and its own GIL: the archiver's receiving thread then only reads
each frame's header and forwards the message (ZeroMQ copies it without the GIL),
and every step goes whole to one helper. Where one process's GIL is the limit
(many cores, a fast disk), helpers multiply what the archiver takes
(bench/sinks.py measures it).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from gemmalens.wire import Sparse, decode, positions_of

from .base import message_parts
from .npzfile import write_npz
from .reader import step_file

BACKLOG_BYTES = 1 << 30  # received arrays waiting for the writers, at most (beyond one step)
START_TIMEOUT = 120.0  # seconds for a helper process to start (it imports numpy, zmq, lz4 and isal only)


def _positions(pending: dict[str, Any], header: dict[str, Any]) -> np.ndarray:
    """A frame's positions ``[rows, seq]`` (from its first slot, its length and the rows' pads). A step's frames
    mostly share them: computed once per (slot, length) per step."""
    seq = header["shape"][header["axes"].index("seq")]
    key = (header["slot"], seq)
    if key not in pending["positions"]:
        pending["positions"][key] = positions_of(header["slot"], seq, header["pads"])
    return pending["positions"][key]


class StepFiles:
    """Writes each step's frames as one file on ``writers`` threads (checksums, deflate and disk writes run outside
    the GIL); at most ``2 * writers`` steps (and 1 GiB) wait to be written, beyond that ``finish_step`` waits, and
    the engine with it."""

    def __init__(self, directory: str | Path, compress: bool, writers: int):
        self.directory = Path(directory)
        self.compress = compress
        self.pool = ThreadPoolExecutor(writers, thread_name_prefix="npz-writer")
        self.backlog = 2 * writers
        self.writing: deque[tuple[Future, int]] = deque()  # step files not yet on disk and their bytes, oldest first
        self.writing_bytes = 0
        self.pending: dict[tuple[int, int], dict[str, Any]] = {}  # (batch, step) -> frames received so far
        self.done: queue.SimpleQueue = queue.SimpleQueue()  # outcomes not yet read

    def add(self, header: dict[str, Any], body: np.ndarray) -> None:
        """One activation frame (bfloat16 as its uint16 patterns, widened to float32 by the writers)."""
        pending = self.pending.setdefault((header["batch"], header["step"]), {
            "prompts": header["prompts"], "pad": header["pads"], "arrays": {}, "bfloat16": set(), "positions": {},
            "frames": 0})
        name = header["name"]
        if isinstance(body, Sparse):  # SAE features: their nonzeros (docs/outputs.md)
            pending["arrays"].update({name + ".sparse_counts": body.counts.reshape(body.shape[:-1]),
                                      name + ".sparse_indices": body.indices, name + ".sparse_values": body.values,
                                      name + ".sparse_width": np.array(body.shape[-1], dtype=np.int64)})
            stored = name + ".sparse_values"
        else:
            pending["arrays"][name] = body
            stored = name
        pending["arrays"][name + ".positions"] = _positions(pending, header)
        pending["frames"] += 1
        if header["dtype"] == "bfloat16":
            pending["bfloat16"].add(stored)

    def finish_step(self, tokens: dict[str, Any]) -> None:
        """The step's tokens (the body of its ``tokens`` message, which counts the step's frames): its file goes
        to the writers; a step with fewer frames than counted is damaged."""
        batch, step = tokens["batch"], tokens["step"]
        pending = self.pending.pop((batch, step), None)
        if pending is None:  # no frame: none captured at this step (positions), or every one lost
            self.done.put({"batch": batch, "step": step, "file": None, "damaged": tokens["frames"] > 0, "error": None})
            return
        chosen = dict(zip(tokens["prompts"], tokens["tokens"]))
        arrays = {
            "prompts": np.array(pending["prompts"], dtype=np.int64),
            "step": np.array(step),
            "tokens": np.array([chosen.get(p, -1) for p in pending["prompts"]], dtype=np.int64),
            "pad": np.array(pending["pad"], dtype=np.int64),
            **pending["arrays"],
        }
        outcome = {"batch": batch, "step": step, "file": step_file(step, batch), "error": None,
                   "damaged": pending["frames"] != tokens["frames"]}  # a frame was lost
        write = self.pool.submit(write_npz, self.directory / outcome["file"], arrays, self.compress,
                                 frozenset(pending["bfloat16"]))
        write.add_done_callback(lambda done: self.done.put({**outcome, "error": done.exception()}))
        self.writing.append((write, sum(a.nbytes for a in arrays.values())))
        self.writing_bytes += self.writing[-1][1]
        while self.writing and (self.writing[0][0].done() or len(self.writing) > self.backlog
                                or self.writing_bytes > BACKLOG_BYTES):
            write, size = self.writing.popleft()
            self.writing_bytes -= size
            write.exception()  # waits; a failure arrives as its outcome

    def outcomes(self) -> list[dict[str, Any]]:
        """The outcomes of the steps finished since the last call."""
        out = []
        while not self.done.empty():
            out.append(self.done.get())
        return out

    def finish(self) -> list[dict[str, Any]]:
        """Waits for every file handed to the writers (never cut short); returns the outcomes not yet read."""
        self.pool.shutdown(wait=True)
        self.writing.clear()
        self.writing_bytes = 0
        return self.outcomes()


class HelperError(RuntimeError):
    """A helper process failed or stopped: the archive is incomplete."""


class Helpers:
    """``count`` helper processes writing step files into ``directory``, each with ``writers`` threads.

    ``send(step, frames)`` forwards a received activation message to the helper of its step; ``finish_step`` sends
    it the step's tokens; ``outcomes`` reads what they report. A helper that fails makes the next call raise
    ``HelperError``. Sends wait while a helper is behind (its queue holds ``QUEUE`` messages), so the engine is
    slowed rather than anything dropped.
    """

    QUEUE = 256

    def __init__(self, count: int, directory: str | Path, compress: bool, writers: int, context: zmq.Context):
        self.folder = tempfile.mkdtemp(prefix="gl-npz-")
        self.inbox = context.socket(zmq.PULL)  # outcomes of every helper
        self.inbox.setsockopt(zmq.RCVHWM, 0)  # small, and never to block a helper
        self.inbox.bind(f"ipc://{self.folder}/outcomes")
        self.outboxes: list[zmq.Socket] = []
        self.processes: list[subprocess.Popen] = []
        for k in range(count):
            outbox = context.socket(zmq.PUSH)
            outbox.setsockopt(zmq.SNDHWM, self.QUEUE)
            outbox.setsockopt(zmq.LINGER, 0)
            outbox.bind(f"ipc://{self.folder}/helper{k}")
            self.outboxes.append(outbox)
            arguments = (f"ipc://{self.folder}/helper{k}", f"ipc://{self.folder}/outcomes", str(directory), compress,
                         writers, os.getpid())
            self.processes.append(subprocess.Popen([
                sys.executable, "-c", f"from gemmalens.sinks.npzsteps import serve; serve(*{arguments!r})"]))
        self.closed: set[str] = set()
        self.ready = 0
        self.held: list[dict[str, Any]] = []  # outcomes read while waiting to send, not yet returned
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while self.ready < count:
                if time.monotonic() > deadline:
                    raise HelperError(f"npz helpers: {self.ready} of {count} started within {START_TIMEOUT:.0f} s")
                self._read(wait_ms=100)
        except BaseException:
            self.close()
            raise

    def send(self, step: int, frames: list) -> None:
        self._send(step % len(self.outboxes), frames)

    def finish_step(self, tokens: dict[str, Any]) -> None:
        self._send(tokens["step"] % len(self.outboxes), [b"tokens", json.dumps(tokens).encode()])

    def outcomes(self) -> list[dict[str, Any]]:
        return self._read(wait_ms=0)

    def finish(self) -> list[dict[str, Any]]:
        """Tells every helper to finish its files and waits for them; returns the outcomes not yet read."""
        out = []
        for k in range(len(self.outboxes)):
            self._send(k, [b"end"])
        while len(self.closed) < len(self.outboxes):
            out += self._read(wait_ms=100)
        return out

    def close(self) -> None:
        """Stops the helpers (after ``finish``, they have already exited) and removes the sockets' folder."""
        for outbox in self.outboxes:
            outbox.close(0)
        self.inbox.close(0)
        for process in self.processes:
            try:
                process.wait(timeout=30 if len(self.closed) == len(self.processes) else 0)  # finished: exiting
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _send(self, k: int, parts: list) -> None:
        """Sends without blocking for good: while helper ``k`` is behind, reads outcomes and checks it still runs."""
        while True:
            try:
                self.outboxes[k].send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                read = self._read(wait_ms=0)  # empties self.held first
                self.held += read
                self.outboxes[k].poll(100, zmq.POLLOUT)

    def _read(self, wait_ms: int) -> list[dict[str, Any]]:
        """Outcomes reported so far (waiting ``wait_ms`` for the first); raises if a helper failed or died."""
        out, self.held = self.held, []
        while self.inbox.poll(wait_ms):
            wait_ms = 0
            report = json.loads(self.inbox.recv())
            if "ready" in report:
                self.ready += 1
            elif "closed" in report:
                self.closed.add(report["closed"])
            elif "failed" in report:
                raise HelperError(f"npz helper {report['helper']} failed: {report['failed']}")
            else:
                out.append(report)
        for k, process in enumerate(self.processes):
            if process.poll() is not None and process.returncode != 0:
                raise HelperError(f"npz helper {k} exited with code {process.returncode}")
        return out


def serve(inbox: str, outbox: str, directory: str, compress: bool, writers: int, parent: int) -> None:
    """A helper process: step files from the messages its archiver forwards, outcomes reported back."""
    context = zmq.Context()
    receive, report = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    report.setsockopt(zmq.SNDHWM, 0)
    receive.connect(inbox)
    report.connect(outbox)
    name = inbox.rsplit("helper", 1)[-1]
    files = StepFiles(directory, compress, writers)

    def send_outcomes(outcomes):
        for outcome in outcomes:
            error = outcome["error"]
            report.send(json.dumps({**outcome, "error": error and f"{type(error).__name__}: {error}"}).encode())

    report.send(json.dumps({"ready": name}).encode())
    try:
        while True:
            send_outcomes(files.outcomes())
            if not receive.poll(1000):
                if os.getppid() != parent:  # the archiver is gone: nobody reads what we write
                    break
                continue
            parts = receive.recv_multipart(copy=False)
            kind = parts[0].bytes
            if kind == b"end":
                break
            if kind == b"tokens":
                files.finish_step(json.loads(parts[1].bytes))
            else:
                frame = decode(message_parts(parts), bfloat16_as="uint16", sparse="sparse")
                files.add(frame.header, frame.body)
        send_outcomes(files.finish())
        report.send(json.dumps({"closed": name}).encode())
    except Exception:
        report.send(json.dumps({"helper": name, "failed": traceback.format_exc(limit=3)}).encode())
        raise
    finally:
        report.close(linger=5000)
        receive.close(0)
        context.term()

