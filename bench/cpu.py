"""CPU benchmark: Gemma 3 270M (float32), gemmalens against mlx-lm and transformers.

Each engine runs in its own process on the same prompts, greedy, and reports
generated tokens per second (prompt pass included) at batch 1 and 8, plus the
cached load time of the embedded model. mlx-lm runs with the same OpenBLAS
gemmalens loads, so the comparison is of the engines, not of the BLAS.

    python bench/cpu.py [--max-tokens 32] [--rounds 1]

With ``--rounds N`` the engines run N times each, interleaved (the shared cores' speed drifts), and the median
is reported with every run's figure in brackets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n",
    "In a small village at the edge of the forest there lived",
    "The three laws of thermodynamics state that",
    "Photosynthesis is the process by which plants",
    "Here is a recipe for a simple tomato soup:",
    "The stock market crash of 1929 was caused by",
    "A haiku about the ocean:\n",
]


def run_gemmalens(batch: int, max_tokens: int) -> dict:
    import gemmalens

    started = time.perf_counter()
    model, tokenizer = gemmalens.load(dtype="float32")
    load_seconds = time.perf_counter() - started
    prompts = PROMPTS[:batch]
    gemmalens.batch_generate(model, tokenizer, prompts[:1], max_tokens=2, temperature=0)  # warm-up
    started = time.perf_counter()
    results = gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, temperature=0,
                                       repetition_penalty=1.0, batch_size=batch)
    seconds = time.perf_counter() - started
    return {"tokens": sum(len(r.tokens) for r in results), "seconds": seconds, "load_seconds": load_seconds}


def run_mlx_lm(batch: int, max_tokens: int) -> dict:
    import gemmalens  # noqa: F401  (the same OpenBLAS as gemmalens)
    from gemmalens.engine.loading import embedded_folder
    from mlx_lm import load
    from mlx_lm.generate import batch_generate, stream_generate

    model, tokenizer = load(str(embedded_folder()))
    rows = [tokenizer.encode(p) for p in PROMPTS[:batch]]
    list(stream_generate(model, tokenizer, rows[0], max_tokens=2))  # warm-up
    started = time.perf_counter()
    if batch == 1:
        tokens = sum(1 for _ in stream_generate(model, tokenizer, rows[0], max_tokens=max_tokens))
    else:
        response = batch_generate(model, tokenizer, rows, max_tokens=max_tokens, return_token_ids=True)
        tokens = sum(len(ids) for ids in response.token_ids)
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def run_transformers(batch: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemmalens.engine.loading import embedded_folder

    folder = str(embedded_folder())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    inputs = tokenizer(PROMPTS[:batch], return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             repetition_penalty=1.0)
    seconds = time.perf_counter() - started
    return {"tokens": int((out.shape[1] - inputs["input_ids"].shape[1]) * batch), "seconds": seconds}


ENGINES = {"gemmalens": run_gemmalens, "mlx-lm": run_mlx_lm, "transformers": run_transformers}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine", choices=sorted(ENGINES))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each engine, interleaved (median reported)")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(ENGINES[args.engine](args.batch, args.max_tokens)))
        return
    rates: dict[tuple[str, int], list[float]] = {}
    loads: dict[tuple[str, int], float] = {}
    for batch in (1, 8):
        for _ in range(args.rounds):
            for engine in ENGINES:
                out = subprocess.run([sys.executable, __file__, "--engine", engine, "--batch", str(batch),
                                      "--max-tokens", str(args.max_tokens)], capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                rates.setdefault((engine, batch), []).append(result["tokens"] / result["seconds"])
                if result.get("load_seconds"):
                    loads[engine, batch] = result["load_seconds"]
    print(f"{'engine':<14}{'batch':>6}{'tok/s':>10}")
    for (engine, batch), values in rates.items():
        runs = f" ({' '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""
        load = f"   (cached load {loads[engine, batch]:.1f} s)" if (engine, batch) in loads else ""
        print(f"{engine:<14}{batch:>6}{statistics.median(values):>10.1f}{runs}{load}")


if __name__ == "__main__":
    main()
