"""SAE features against dense activations on the CPU: bus bytes per generated token for resid_out of four layers
dense vs their SAE features (16k wide, L0 about 60), and the cost of encoding four SAEs at batch 1 and 8.

Gemma 3 270M float32, greedy, the same 8 prompts. The SAEs are random, in Gemma Scope 2's layout, with each
layer's threshold set from the model's own activations so that about 60 features fire per position. Bytes are
those the publisher sends (lz4 payloads; sparse frames for features), counted from the engine's events.

    python bench/saes.py [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import gemmalens
import gemmalens.engine  # noqa: F401  the fast BLAS before MLX loads
import mlx.core as mx
from gemmalens import wire
from gemmalens.engine.events import ActivationEvent, StepEvent
from gemmalens.engine.generation import GenerationConfig, generate
from gemmalens.engine.sampling import SamplingParams
from gemmalens.engine.selection import select
from gemmalens.prompts import Prompt

from cpu import PROMPTS

LAYERS = (3, 6, 9, 12)
WIDTH, L0 = 16384, 60


def write_saes(model, tokenizer, folder: Path) -> list:
    """Random SAEs whose thresholds let about L0 features fire on the model's own resid_out."""
    names = [f"model.layers.{layer}.resid_out" for layer in LAYERS]
    rows = [tokenizer.encode(p) for p in PROMPTS]
    _, values = gemmalens.run_with_capture(model, tokenizer, rows, names)
    rng = np.random.default_rng(0)
    saes = []
    for layer, name in zip(LAYERS, names):
        x = np.concatenate([np.array(values[name][r, values.pad[r] + 1:]) for r in range(len(rows))])  # no bos
        w_enc = (rng.standard_normal((x.shape[1], WIDTH)) / np.sqrt(x.shape[1])).astype(np.float32)
        pre = x @ w_enc
        threshold = np.full(WIDTH, np.quantile(pre, 1 - L0 / WIDTH), np.float32)
        path = folder / "resid_post" / f"layer_{layer}_width_16k_l0_small"
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"hf_hook_point_in": f"model.layers.{layer}.output",
                                                      "architecture": "jump_relu", "width": WIDTH, "type": "sae"}))
        weights = {"w_enc": w_enc, "b_enc": np.zeros(WIDTH, np.float32), "threshold": threshold,
                   "w_dec": np.ascontiguousarray(w_enc.T), "b_dec": np.zeros(x.shape[1], np.float32)}
        mx.save_safetensors(str(path / "params.safetensors"), {k: mx.array(v) for k, v in weights.items()})
        saes.append(gemmalens.load_sae(path))
    return saes


def bus_bytes(model, tokenizer, saes, patterns, max_tokens) -> tuple[float, float]:
    """Bytes per generated token of the frames ``patterns`` select, and the features' mean L0 if any."""
    config = GenerationConfig(max_tokens=max_tokens, sampling=SamplingParams(0.0, 1.0, None, 1.0), seed=1,
                              batch_size=8)
    selection = select(model.config, patterns, saes=saes)
    total, tokens, nonzeros, entries = 0, 0, 0, 0
    for event in generate(model, tokenizer, [Prompt(i, t) for i, t in enumerate(PROMPTS)], config, selection,
                          saes=saes):
        if isinstance(event, ActivationEvent):
            array, _ = event.host()
            if event.axes[-1] == "latents":
                sparse = wire.Sparse.of(array)
                total += len(wire.encode_array(sparse.payload(), "lz4"))
                nonzeros, entries = nonzeros + len(sparse.indices), entries + len(sparse.counts)
            else:
                total += len(wire.encode_array(array, "lz4"))
        elif isinstance(event, StepEvent):
            tokens += len(event.tokens)
    return total / tokens, nonzeros / entries if entries else 0.0


def speed(model, tokenizer, batch, max_tokens, saes) -> float:
    started = time.perf_counter()
    results = gemmalens.batch_generate(model, tokenizer, PROMPTS[:batch], max_tokens=max_tokens, temperature=0,
                                       repetition_penalty=1.0, batch_size=batch, saes=saes)
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = gemmalens.load(dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        saes = write_saes(model, tokenizer, Path(tmp))
        dense, _ = bus_bytes(model, tokenizer, saes, [f"model.layers.{i}.resid_out" for i in LAYERS], args.max_tokens)
        features, l0 = bus_bytes(model, tokenizer, saes, ["sae.*.features"], args.max_tokens)
        print(f"bus bytes per generated token, batch 8, {args.max_tokens} tokens, prompt pass included:")
        print(f"  resid_out of layers {LAYERS} dense (lz4): {dense:,.0f}")
        print(f"  their SAE features (16k wide, mean L0 {l0:.1f}, sparse, lz4): {features:,.0f} ({dense / features:.1f}x "
              "fewer)")
        print(f"{'batch':>6}{'plain tok/s':>14}{'4 SAEs tok/s':>15}{'of plain':>10}")
        for batch in (1, 8):
            speed(model, tokenizer, batch, 4, [])  # warm-up
            speed(model, tokenizer, batch, 4, saes)
            plain, encoded = [], []
            for _ in range(args.rounds):
                plain.append(speed(model, tokenizer, batch, args.max_tokens, []))
                encoded.append(speed(model, tokenizer, batch, args.max_tokens, saes))
            p, e = statistics.median(plain), statistics.median(encoded)
            print(f"{batch:>6}{p:>14.1f}{e:>15.1f}{e / p:>10.0%}")


if __name__ == "__main__":
    main()
