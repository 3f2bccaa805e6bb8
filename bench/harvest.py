"""Harvest speed: a corpus's resid_out at one layer into a dataset on disk, tokens per second, three ways on the
same model (the real Gemma 3 270M, float32) and the same packed windows:

* gemmalens: `gemmalens harvest` (engine, bus, dataset sink in their own processes), its speed from the run's
  summary (prompt tokens over the run's seconds, the dataset's last write and acknowledgement included);
* SAELens: its own `CacheActivationsRunner` on TransformerLens' HookedTransformer (built from the same
  weights; offline), writing its cached-activations dataset; timed from `run()` (model loading excluded);
* transformers: `Gemma3ForCausalLM` with a forward hook at the layer that keeps its output (to numpy) and
  stops the pass there, nothing written (what any torch harvester computes at least); warmed up with one
  batch first.

gemmalens and SAELens both stop the forward pass after the captured layer.

All at the same batch size. The corpus is this repository's documentation, a paragraph per document.

    python bench/harvest.py [--windows 64] [--context 128] [--batch 8] [--layer 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def corpus(path: Path) -> None:
    paragraphs = [p.strip() for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                  for p in doc.read_text().split("\n\n") if len(p.strip()) > 40]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))


def gemmalens_harvest(corpus_file: Path, work: Path, args) -> tuple[float, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gemmalens.cli.main", "harvest", "--corpus", str(corpus_file),
                           "--context", str(args.context), "--max-windows", str(args.windows), "--capture",
                           f"model.layers.{args.layer}.resid_out", "--dataset", str(work / "gemmalens"),
                           "--batch-size", str(args.batch), "--output-dir", str(work / "ledger"), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "GEMMALENS_CACHE": str(work / "cache")})
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    summary = json.loads((work / "ledger" / "summary.json").read_text())
    tokens = args.windows * args.context
    return tokens / summary["wall_seconds"], tokens / wall


def hf_model(folder: Path):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gemmalens.engine.config import config_from_hf
    from gemmalens.engine.loading import hf_config_dict, read_config_json

    config = Gemma3TextConfig(**hf_config_dict(config_from_hf(read_config_json(folder))))
    config._attn_implementation = "eager"
    return Gemma3ForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()


def saelens_harvest(folder: Path, windows: np.ndarray, work: Path, args) -> float:
    import datasets
    import torch
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    from transformers import AutoTokenizer

    config = CacheActivationsRunnerConfig(
        dataset_path="gemmalens-bench-corpus", model_name="google/gemma-3-270m", model_batch_size=args.batch,
        hook_name=f"blocks.{args.layer}.hook_resid_post", d_in=640, training_tokens=windows.size,
        context_size=args.context, new_cached_activations_path=str(work / "saelens"), shuffle=False,
        dtype="float32", device="cpu", prepend_bos=False, streaming=False,
        buffer_size_gb=windows.size * 640 * 4 * 1.01 / 1e9,  # one buffer: the whole corpus, one shard
        model_from_pretrained_kwargs={"hf_model": hf_model(folder), "tokenizer": AutoTokenizer.from_pretrained(folder),
                                      "dtype": torch.float32})
    runner = CacheActivationsRunner(config, override_dataset=datasets.Dataset.from_dict({"input_ids": windows}))
    started = time.perf_counter()
    runner.run()
    seconds = time.perf_counter() - started
    written = datasets.load_from_disk(str(work / "saelens"))
    return written.num_rows * args.context / seconds


def transformers_hook(folder: Path, windows: np.ndarray, args) -> float:
    import torch

    class Enough(Exception):
        """Raised by the hook: the rest of the pass is not wanted."""

    model = hf_model(folder)
    kept = []

    def keep(module, inputs, output):
        kept.append((output[0] if isinstance(output, tuple) else output).numpy().copy())
        raise Enough

    def forward(batch):
        try:
            model(batch)
        except Enough:
            pass

    model.model.layers[args.layer].register_forward_hook(keep)
    batches = [torch.tensor(windows[i:i + args.batch]) for i in range(0, len(windows), args.batch)]
    with torch.inference_mode():
        forward(batches[0])  # warm-up
        kept.clear()
        started = time.perf_counter()
        for batch in batches:
            forward(batch)
    assert sum(len(k) for k in kept) == len(windows)
    return windows.size / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layer", type=int, default=6)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from gemmalens.corpus import pack, read_texts
    from gemmalens.engine.loading import resolve
    from gemmalens.engine.tokenizer import load_tokenizer

    folder = resolve(None)
    work = Path(tempfile.mkdtemp(prefix="gl-harvest-"))
    try:
        corpus(work / "corpus.jsonl")
        windows = pack(read_texts(str(work / "corpus.jsonl")), load_tokenizer(folder), args.context, args.windows)
        assert len(windows) == args.windows, f"the corpus holds only {len(windows)} windows"
        print(f"{os.cpu_count()} cores; Gemma 3 270M float32; {args.windows} windows of {args.context} tokens, "
              f"batch {args.batch}, model.layers.{args.layer}.resid_out")
        ours, wall = gemmalens_harvest(work / "corpus.jsonl", work, args)
        print(f"gemmalens harvest: {ours:.0f} tok/s ({wall:.0f} tok/s counting the command's start and model load)",
              flush=True)
        print(f"transformers forward to the layer + hook (no writing): {transformers_hook(folder, windows, args):.0f} "
              "tok/s",
              flush=True)
        try:
            print(f"SAELens CacheActivationsRunner: {saelens_harvest(folder, windows, work, args):.0f} tok/s",
                  flush=True)
        except ImportError as error:
            print(f"SAELens CacheActivationsRunner: not installed here ({error})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
