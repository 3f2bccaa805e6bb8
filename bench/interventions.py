"""The cost of an intervention on the CPU: steering one site (model.layers.6.resid_out) at every step, against
plain generation. Gemma 3 270M, float32, greedy, batch 8; rounds alternate the two, medians reported.

    python bench/interventions.py [--max-tokens 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import gemmalens

from cpu import PROMPTS


def timed(model, tokenizer, batch, max_tokens, interventions=()):
    started = time.perf_counter()
    results = gemmalens.batch_generate(model, tokenizer, PROMPTS[:batch], max_tokens=max_tokens, temperature=0,
                                       repetition_penalty=1.0, batch_size=batch, interventions=interventions)
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = gemmalens.load(dtype="float32")
    vector = np.random.default_rng(0).standard_normal(model.config.hidden_size).astype(np.float32)
    steer = [gemmalens.steer("model.layers.6.resid_out", vector, scale=0.1)]
    timed(model, tokenizer, args.batch, 4)  # warm-up
    timed(model, tokenizer, args.batch, 4, steer)
    plain, steered = [], []
    for _ in range(args.rounds):
        plain.append(timed(model, tokenizer, args.batch, args.max_tokens))
        steered.append(timed(model, tokenizer, args.batch, args.max_tokens, steer))
    p, s = statistics.median(plain), statistics.median(steered)
    print(f"{'batch':>6}{'plain tok/s':>14}{'steered tok/s':>16}{'ratio':>8}")
    print(f"{args.batch:>6}{p:>14.1f}{s:>16.1f}{s / p:>8.1%}")


if __name__ == "__main__":
    main()
