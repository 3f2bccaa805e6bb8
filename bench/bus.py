"""Bus throughput: realistic activation frames through lz4 and ZeroMQ, against memcpy and lz4 alone.

Frames are real Gemma 3 270M activations (layer 8 of a 400-token prompt, float32), published by
``Publisher`` and received and decoded by a subscriber in another process, over ipc:// and tcp://
loopback. Also prints bytes on the wire per generated token for resid-only and full capture.

    python bench/bus.py [--frames 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import gemmalens.engine  # noqa: F401  (fast BLAS before MLX)
import lz4.block
import mlx.core as mx
import numpy as np

import gemmalens
from gemmalens.engine.events import ActivationEvent
from gemmalens.engine.publisher import Publisher
from gemmalens.engine.run import publish_run
from gemmalens.engine.transfer import StepValues, host_copier
from gemmalens.sinks.base import Subscriber
from gemmalens.wire import shuffle

RUN_INFO = {"spec": {}, "prompts": [], "capture": {}, "engines": 1, "segment": {"resume": False, "skipped": []}}
POINTS = ["self_attn.q_proj_out", "mlp.gate_proj_out", "mlp.act_out", "resid_out", "self_attn.attn_weights"]


def real_activations() -> dict[str, np.ndarray]:
    model, tokenizer = gemmalens.load(dtype="float32")
    text = " ".join(f"Paragraph {i}: the committee discussed budgets, rivers and the history of printing." for i in range(30))
    ids = tokenizer.encode(text)[:400]
    _, acts = gemmalens.run_with_capture(model, tokenizer, [ids], [f"model.layers.8.{p}" for p in POINTS])
    return {k: np.array(v) for k, v in acts.items()}


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def single_core(arrays) -> dict[str, float]:
    big = np.concatenate([a.ravel() for a in arrays.values()])[: 4 << 20]
    started = time.perf_counter()
    for _ in range(5):
        big.copy()
    memcpy = rate(5 * big.nbytes, time.perf_counter() - started)
    data = big.tobytes()
    out = {"memcpy": memcpy}
    for label, payload in (("lz4", data), ("lz4+shuffle", shuffle(data, 4))):
        started = time.perf_counter()
        for _ in range(3):
            lz4.block.compress(payload, store_size=True)
        out[label] = rate(3 * len(data), time.perf_counter() - started)
    return out


class Counter(Subscriber):
    topics = ("act.",)

    def on_activation(self, frame):
        pass


def receive(address, name, ready):
    sink = Counter(address, name=name)
    ready.set()
    sink.run(timeout=300)
    os._exit(0 if sink.complete else 1)


def through_bus(arrays, address, codec, workers, frames) -> float:
    publisher = Publisher(reliable=address, expect=1, codec=codec, workers=workers)
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=receive, args=(publisher.endpoints["reliable"], "bench", ready))
    proc.start()
    values = StepValues({name: mx.array(a) for name, a in arrays.items()}, host_copier())
    events = [ActivationEvent(0, 0, name, ("batch", "heads", "seq", "keys") if a.ndim == 4 else
                              ("batch", "seq", "features"), [0], [0], [True], 0, values) for name, a in arrays.items()]
    values.fetch(next(iter(arrays)))  # on the host before the clock starts: this measures the bus alone
    raw = 0
    publisher.wait_for_sinks()
    started = time.perf_counter()
    publisher.start(RUN_INFO)
    for i in range(frames):
        event = events[i % len(events)]
        publisher.publish(event)
        raw += arrays[event.name].nbytes
    publisher.finish(True)
    proc.join()
    seconds = time.perf_counter() - started
    assert proc.exitcode == 0, "the subscriber missed frames"
    return rate(raw, seconds)


def wire_bytes_per_token(patterns) -> dict[str, float]:
    model, tokenizer = gemmalens.load(dtype="float32")
    from gemmalens.engine.generation import GenerationConfig
    from gemmalens.engine.sampling import SamplingParams
    from gemmalens.engine.selection import select
    from gemmalens.prompts import Prompt

    out = {}
    for codec in ("lz4", "lz4+shuffle"):
        for label, capture, exclude in patterns:
            publisher = Publisher(reliable="inproc://bytes", codec=codec)
            prompts = [Prompt(0, "The history of the printing press begins in")]
            config = GenerationConfig(max_tokens=16, sampling=SamplingParams(0, 1, None, 1), batch_size=1)
            selection = select(model.config, capture, exclude, positions="generated")
            publisher.start(RUN_INFO)
            _, totals = publish_run(model, tokenizer, prompts, config, selection, publisher)
            out[f"{label}, {codec}"] = (totals["bytes_raw"] / 15, totals["bytes_wire"] / 15)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    arrays = real_activations()
    base = single_core(arrays)
    print(f"memcpy {base['memcpy']:.0f} MB/s; lz4 one core {base['lz4']:.0f} MB/s; "
          f"lz4 after shuffle one core {base['lz4+shuffle']:.0f} MB/s")
    print(f"{'transport':<10}{'codec':<13}{'threads':>8}{'MB/s raw':>10}{'vs lz4 x threads':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for transport, address in (("ipc", f"ipc://{tmp}/bus"), ("tcp", "tcp://127.0.0.1:0")):
            for codec in ("raw", "lz4", "lz4+shuffle"):
                for workers in (1, 2):
                    if codec == "raw" and workers == 2:
                        continue
                    speed = through_bus(arrays, address, codec, workers, args.frames)
                    reference = base.get(codec, base["memcpy"]) * (workers if codec != "raw" else 1)
                    print(f"{transport:<10}{codec:<13}{workers:>8}{speed:>10.0f}{speed / reference:>17.0%}")
    print("bytes per generated token (raw -> on the wire), decode steps only:")
    everything_but = ["*.attn_scores", "*.attn_weights", "model.logits", "generate.*"]
    for label, (raw, wire) in wire_bytes_per_token([
        ("resid_out of every layer", ["model.layers.*.resid_out"], []),
        ("every point but attention and logits", ["*"], everything_but),
    ]).items():
        print(f"  {label}: {raw / 1e3:.1f} kB -> {wire / 1e3:.1f} kB ({raw / wire:.2f}x)")


if __name__ == "__main__":
    main()
