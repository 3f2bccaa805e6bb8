"""Each reliable sink's own limit: MB/s of bfloat16 frames it takes from a sender that is never the limit.

The sender (this process) sends pre-encoded messages of the protocol as fast as ZeroMQ takes them: resid_out
of every layer of Gemma 3 1B shapes (26 frames of [batch, 1, 1152], random bfloat16, lz4) for each step, in
batches of 32 steps; the sink runs in its own process as `gemmalens sink ...` (the command itself): the npz
archiver with 1 and with several processes writing files, stored or deflated; the dataset sink with a row per
token and per context of 128, into a folder, and into a local S3 server (moto, in its own process: what the
object-storage client costs, without a network). Into a folder on the disk and into tmpfs (/dev/shm). No MLX
and no GPU needed: what each sink can take on a machine, apart from the engine.

    python bench/sinks.py [--steps 384] [--batch 64] [--processes 1,4] [--rounds 2] [--folder DIR]
                          [--kinds npz,dataset,s3]
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
STEPS_PER_BATCH = 32


def messages(batch: int, steps: int) -> list[list[bytes]]:
    """One run: run.start; batches of STEPS_PER_BATCH steps, each step its 26 frames and tokens, each batch its
    end; run.end."""
    rng = np.random.default_rng(0)
    payloads = [wire.encode_array((rng.standard_normal(batch * HIDDEN).astype(np.float32).view(np.uint32) >> 16)
                                  .astype(np.uint16), "lz4") for _ in range(LAYERS)]
    seqs = {}
    names = [f"model.layers.{i}.resid_out" for i in range(LAYERS)]

    def message(topic, kind, body, **fields):
        seqs[topic] = seqs.get(topic, -1) + 1
        return wire.message(topic, wire.header(topic, kind, "bench", "0", seqs[topic], **fields), body)

    out = [message(wire.RUN_START, "run_start", {"run": "bench", "spec": {}, "prompts": [], "capture": {},
                                                 "engines": 1, "segment": {"resume": False, "skipped": []}})]
    for first in range(0, steps, STEPS_PER_BATCH):
        number = first // STEPS_PER_BATCH * batch
        rows = list(range(number, number + batch))
        for step in range(min(STEPS_PER_BATCH, steps - first)):
            for name, payload in zip(names, payloads):
                out.append(message(wire.activation_topic(name), "activation", payload, batch=number, step=step,
                                   name=name, dtype="bfloat16", shape=[batch, 1, HIDDEN],
                                   axes=["batch", "seq", "hidden"], codec="lz4", nbytes=batch * HIDDEN * 2,
                                   slot=64 + step, prompts=rows, pads=[0] * batch, live=[True] * batch))
            out.append(message(wire.TOKENS, "tokens", {"batch": number, "step": step, "prompts": rows,
                                                       "tokens": [5] * batch, "positions": [64 + step] * batch,
                                                       "frames": LAYERS}))
        out.append(message(wire.BATCH_END, "batch_end", {"batch": number, "prompts": rows,
                                                         "steps": min(STEPS_PER_BATCH, steps - first)}))
    totals = {topic: count + 1 for topic, count in seqs.items()} | {wire.RUN_END: 1}
    out.append(message(wire.RUN_END, "run_end", {"complete": True, "reason": None, "topics": totals}))
    return out


def sink_limit(run: list[list[bytes]], raw_bytes: int, command: list[str], env=None) -> float:
    """MB/s of bfloat16 frames: from the sink's subscription until it has written everything and exited."""
    context = zmq.Context()
    socket = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.XPUB_NODROP, 1)
    socket.setsockopt(zmq.SNDHWM, 256)
    bus = tempfile.mkdtemp(prefix="gl-bus-")
    address = f"ipc://{bus}/bus"
    socket.bind(address)
    sink = subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "sink", *command, "--connect", address],
                            env=env)
    try:
        while not socket.recv().startswith(b"\x01hello."):
            pass
        started = time.perf_counter()
        for parts in run:
            socket.send_multipart(parts, copy=False)
        while sink.poll() is None:  # the ack and alive messages are read, or the sink waits for its receipt
            if socket.poll(100):
                socket.recv()
        assert sink.returncode == 0, "the sink missed frames"
        return raw_bytes / (time.perf_counter() - started) / 1e6
    finally:
        sink.kill()
        socket.close(0)
        context.term()
        shutil.rmtree(bus, ignore_errors=True)


def s3_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on a free loopback port, a bucket in it, and the environment that points clients there."""
    import socket as sockets

    import boto3

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                         aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
            return server, {**os.environ, **env}
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("the S3 server did not start")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=384)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--processes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="a folder on the disk to measure")
    parser.add_argument("--kinds", type=lambda text: text.split(","), default=["npz", "dataset", "s3"],
                        help="which sinks: npz, dataset (into folders), s3 (the dataset into a local S3 server)")
    args = parser.parse_args()
    run = messages(args.batch, args.steps)
    raw = args.steps * LAYERS * args.batch * HIDDEN * 2
    places = [("disk", args.folder)] + ([("tmpfs", "/dev/shm")] if os.path.isdir("/dev/shm") else [])
    print(f"{os.cpu_count()} cores; {args.steps} steps of batch {args.batch}, {raw / 1e6:.0f} MB of bfloat16 frames")

    def measure(label, command, env=None):
        rates = []
        for _ in range(args.rounds):
            rates.append(sink_limit(run, raw, command(), env))
            for written in os.listdir(work) if os.path.isdir(work) else ():  # each round into an empty folder
                shutil.rmtree(os.path.join(work, written), ignore_errors=True)
        print(f"{label}: " + " / ".join(f"{r:.0f}" for r in rates) + " MB/s", flush=True)

    work = ""
    for place, folder in places:
        work = tempfile.mkdtemp(prefix="gl-sinks-", dir=folder)
        fresh = lambda: tempfile.mkdtemp(dir=work)  # noqa: E731  a new folder each round
        try:
            for storage in ("stored", "deflate") if "npz" in args.kinds else ():
                for processes in args.processes:
                    measure(f"npz {storage}, {processes} process(es), {place}",
                            lambda: ["npz", "--activations-dir", fresh(), "--processes", str(processes)]
                            + (["--no-compress-activations"] if storage == "stored" else []))
            if "dataset" in args.kinds:
                measure(f"dataset per token, {place}", lambda: ["dataset", "--dest", fresh()])
                measure(f"dataset per context of 128, {place}",
                        lambda: ["dataset", "--dest", fresh(), "--rows", "context", "--context", "128"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if "s3" in args.kinds:
        server, env = s3_server()
        try:
            rounds = iter(range(1 << 30))
            measure("dataset per token, local S3 server (moto)",
                    lambda: ["dataset", "--dest", f"s3://bench/run{next(rounds)}"], env)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
