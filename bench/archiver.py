"""The npz archiver's own limit: MB/s of bfloat16 frames it takes from a sender that is never the limit.

The sender (this process) sends pre-encoded messages of the protocol as fast as ZeroMQ takes them: resid_out
of every layer of Gemma 3 1B shapes (26 frames of [batch, 1, 1152], random bfloat16, lz4) for each step; the
archiver runs in its own process as `gemmalens sink npz` would, with 1 and with several processes writing
files, stored or deflated, into a folder on the disk and into tmpfs (/dev/shm, where it exists). No MLX and
no GPU needed: what the archiver can take on a machine, apart from the engine.

    python bench/archiver.py [--steps 400] [--batch 64] [--processes 1,4] [--rounds 2] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

from gemmalens import wire

LAYERS, HIDDEN = 26, 1152
SINK = ("import sys\nfrom gemmalens.sinks.npz import NpzArchiver\n"
        "sink = NpzArchiver(sys.argv[1], sys.argv[2], compress=sys.argv[3] == 'deflate', processes=int(sys.argv[4]), "
        "name='npz')\nsys.exit(0 if sink.run() else 1)")


def messages(batch: int, steps: int) -> list[list[bytes]]:
    """One run of one batch: run.start, per step the 26 frames and the tokens, batch.end, run.end."""
    rng = np.random.default_rng(0)
    payloads = [wire.encode_array((rng.standard_normal(batch * HIDDEN).astype(np.float32).view(np.uint32) >> 16)
                                  .astype(np.uint16), "lz4") for _ in range(LAYERS)]
    rows, seqs = list(range(batch)), {}
    names = [f"model.layers.{i}.resid_out" for i in range(LAYERS)]

    def message(topic, kind, body, **fields):
        seqs[topic] = seqs.get(topic, -1) + 1
        return wire.message(topic, wire.header(topic, kind, "bench", "0", seqs[topic], **fields), body)

    out = [message(wire.RUN_START, "run_start", {"run": "bench", "spec": {}, "prompts": [], "capture": {},
                                                 "engines": 1, "segment": {"resume": False, "skipped": []}})]
    for step in range(steps):
        for name, payload in zip(names, payloads):
            out.append(message(wire.activation_topic(name), "activation", payload, batch=0, step=step, name=name,
                               dtype="bfloat16", shape=[batch, 1, HIDDEN], axes=["batch", "seq", "hidden"],
                               codec="lz4", nbytes=batch * HIDDEN * 2, slot=64 + step, prompts=rows,
                               pads=[0] * batch, live=[True] * batch))
        out.append(message(wire.TOKENS, "tokens", {"batch": 0, "step": step, "prompts": rows, "tokens": [5] * batch,
                                                   "positions": [64 + step] * batch, "frames": LAYERS}))
    out.append(message(wire.BATCH_END, "batch_end", {"batch": 0, "prompts": rows, "steps": steps}))
    totals = {topic: count + 1 for topic, count in seqs.items()} | {wire.RUN_END: 1}
    out.append(message(wire.RUN_END, "run_end", {"complete": True, "reason": None, "topics": totals}))
    return out


def archiver_limit(run: list[list[bytes]], raw_bytes: int, folder: str, storage: str, processes: int) -> float:
    """MB/s of bfloat16 frames: from the sink's subscription until it has written everything and exited."""
    work = tempfile.mkdtemp(prefix="gl-archiver-", dir=folder)
    context = zmq.Context()
    socket = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.XPUB_NODROP, 1)
    socket.setsockopt(zmq.SNDHWM, 256)
    address = f"ipc://{tempfile.mkdtemp(prefix='gl-bus-')}/bus"
    socket.bind(address)
    sink = subprocess.Popen([sys.executable, "-c", SINK, address, work, storage, str(processes)])
    try:
        while not socket.recv().startswith(b"\x01hello."):
            pass
        started = time.perf_counter()
        for parts in run:
            socket.send_multipart(parts, copy=False)
        assert sink.wait() == 0, "the archiver missed frames"
        return raw_bytes / (time.perf_counter() - started) / 1e6
    finally:
        sink.kill()
        socket.close(0)
        context.term()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(address[len("ipc://"):].rsplit("/", 1)[0], ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--processes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="a folder on the disk to measure")
    args = parser.parse_args()
    run = messages(args.batch, args.steps)
    raw = args.steps * LAYERS * args.batch * HIDDEN * 2
    places = [("disk", args.folder, "stored"), ("disk", args.folder, "deflate")]
    if os.path.isdir("/dev/shm"):
        places.insert(1, ("tmpfs", "/dev/shm", "stored"))
    print(f"{os.cpu_count()} cores; {args.steps} steps of batch {args.batch}, {raw / 1e6:.0f} MB of bfloat16 frames")
    for label, folder, storage in places:
        for processes in args.processes:
            rates = [archiver_limit(run, raw, folder, storage, processes) for _ in range(args.rounds)]
            print(f"{label:>5} {storage:>7}, {processes} process(es): "
                  + " / ".join(f"{r:.0f}" for r in rates) + " MB/s", flush=True)


if __name__ == "__main__":
    main()
