"""Where the start-up of `gemmalens run` goes, on the embedded model already converted.

Times, each in a fresh process (median of --repeats): importing the CLI, a sink's modules and the engine's;
setting up the fast BLAS; the phases of `load()` (resolving the folder, reading config and weights, building
the model, the tokenizer); the first prompt pass; and the README's main command end to end with one new token
(its wall time bounds the time to the first token). Prints a table.

    python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

PHASES = r"""
import json, time
t0 = time.perf_counter()
import gemmalens.engine
t1 = time.perf_counter()
import mlx.core as mx
t2 = time.perf_counter()
from gemmalens.engine import loading
from gemmalens.engine.checkpoint import read_safetensors
from gemmalens.engine.config import config_from_hf
t3 = time.perf_counter()
folder = loading.resolve(None)
raw = loading.read_config_json(folder)
config = config_from_hf(raw)
weights = read_safetensors(folder)
t4 = time.perf_counter()
model = loading.build(config, None, weights, folder, None)
t5 = time.perf_counter()
tokenizer = loading.load_tokenizer(folder)
t6 = time.perf_counter()
ids, pad = tokenizer.pad_batch([tokenizer.encode(p) for p in ["Explain why the sky is blue in two sentences."] * 4])
mx.eval(model(ids, pad, last_only=True))
t7 = time.perf_counter()
print(json.dumps({"import gemmalens.engine (BLAS set-up)": t1 - t0, "import mlx.core": t2 - t1,
                  "import the engine's modules": t3 - t2, "read config and weights": t4 - t3,
                  "build the model": t5 - t4, "tokenizer": t6 - t5, "first prompt pass (4 prompts)": t7 - t6}))
"""

IMPORTS = {
    "CLI (gemmalens.cli.main)": "import gemmalens.cli.main",
    "results sink's modules": "import gemmalens.sinks.results",
    "npz sink's modules": "import gemmalens.sinks.npz",
}


def timed(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-c", "import gemmalens; gemmalens.load()"], check=True)  # converted, cached
    rows = {}
    for label, code in IMPORTS.items():
        rows[f"process + {label}"] = statistics.median(timed(code) for _ in range(args.repeats))
    rows["process + nothing"] = statistics.median(timed("pass") for _ in range(args.repeats))
    phases = [json.loads(subprocess.run([sys.executable, "-c", PHASES], check=True, capture_output=True,
                                        text=True).stdout) for _ in range(args.repeats)]
    for key in phases[0]:
        rows[key] = statistics.median(p[key] for p in phases)
    ends = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gemmalens.cli.main", "run", "--max-tokens", "1", "--quiet",
                            "--save-activations", "--capture", "model.layers.*.resid_out", "--output-dir", folder],
                           check=True, capture_output=True)
            ends.append(time.perf_counter() - started)
    rows["README main command, 1 new token, end to end"] = statistics.median(ends)
    width = max(map(len, rows))
    for label, seconds in rows.items():
        print(f"{label:<{width}}  {seconds:6.2f} s")


if __name__ == "__main__":
    main()
