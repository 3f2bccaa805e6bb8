"""Capture overhead on the CPU: generation publishing resid_out of every layer to an archival (npz) sink,
against generation without capture. Gemma 3 270M, float32, greedy, one run each, same prompts.

    python bench/capture.py [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import gemmalens

from cpu import PROMPTS


def timed(model, tokenizer, batch, max_tokens, save_dir=None):
    started = time.perf_counter()
    kwargs = dict(save_activations_dir=save_dir, capture=["model.layers.*.resid_out"]) if save_dir else {}
    results = gemmalens.batch_generate(model, tokenizer, PROMPTS[:batch], max_tokens=max_tokens, temperature=0,
                                       repetition_penalty=1.0, batch_size=batch, **kwargs)
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer = gemmalens.load(dtype="float32")
    timed(model, tokenizer, 1, 2)  # warm-up
    print(f"{'batch':>6}{'no capture tok/s':>18}{'resid_out -> npz tok/s':>24}{'ratio':>8}")
    for batch in (1, 8):
        plain = timed(model, tokenizer, batch, args.max_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            captured = timed(model, tokenizer, batch, args.max_tokens, tmp)
        print(f"{batch:>6}{plain:>18.1f}{captured:>24.1f}{captured / plain:>8.0%}")


if __name__ == "__main__":
    main()
