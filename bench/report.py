"""How fast the report page opens for a large run: 64 prompts x 128 new tokens of the embedded 270M with
resid_out of every layer and the attention of two layers captured (and what the page shows of the tokens: each
chosen token's probability, the last layer's logit lens for the alternatives; the whole softmax would be
67 MB a step), opened in headless Chromium (Debian's chromium through Playwright).

    python bench/report.py [--prompts 64] [--max-tokens 128] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpu import PROMPTS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--keep", default=None, help="Keep the run in this folder.")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="gemmalens-report-"))
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(args.prompts)]
    (folder / "prompts.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gemmalens.cli.main", "run", "--prompts-file", str(folder / "prompts.json"),
                    "--max-tokens", str(args.max_tokens), "--temperature", "0.8", "--seed", "1", "--batch-size",
                    str(args.prompts), "--capture", "model.layers.*.resid_out", "--capture",
                    "model.layers.5.self_attn.attn_weights", "--capture", "model.layers.11.self_attn.attn_weights",
                    "--capture", "generate.*.sample.token_prob", "--capture", "model.layers.17.logit_lens.*",
                    "--output-dir", str(folder / "run"), "--quiet"], check=True)
    generated = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gemmalens.cli.main", "report", str(folder / "run")], check=True)
    built = time.perf_counter() - started
    page_file = folder / "run" / "report.html"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        started = time.perf_counter()
        page.goto(page_file.as_uri(), wait_until="load")
        page.wait_for_selector("#heads canvas")
        loaded = time.perf_counter() - started
        started = time.perf_counter()
        page.locator("nav .prompt").nth(args.prompts - 1).click()
        page.wait_for_function("document.querySelector('#big-title').textContent === 'layer 5 head 0'")
        switched = time.perf_counter() - started
        browser.close()
    print(f"run: {args.prompts} prompts x {args.max_tokens} tokens in {generated:.0f} s; report built in {built:.1f} s, "
          f"{page_file.stat().st_size / 1e6:.1f} MB")
    print(f"page: loaded and drawn in {loaded:.2f} s; another prompt shown in {switched:.2f} s")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
