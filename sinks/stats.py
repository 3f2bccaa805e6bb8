"""Live progress: a bar on a terminal, a plain line every few seconds elsewhere.

``ProgressView`` renders the engine's ``stats`` (prompts done, batch and step,
tokens/s, an ETA) and the bytes written into the folders it watches;
``LiveStats`` feeds it from the engine's lossy endpoint, so it never slows the
engine down. The in-process API feeds it directly.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .base import LossySubscriber


def folder_bytes(folders: Sequence[str | Path]) -> int:
    """Bytes of the files in ``folders`` and their subfolders (what the sinks have written so far)."""
    total = 0
    pending = [str(f) for f in folders]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def eta_seconds(stats: dict[str, Any]) -> float | None:
    """Seconds left, from the share of decode steps done (every batch counted at its ``max_tokens`` steps; a
    batch as one pass when there is no decoding)."""
    steps = stats.get("max_tokens", 0) or 1
    total = stats.get("batches_total", 0) * steps
    done = stats.get("batches_done", 0) * steps
    if stats.get("max_tokens") and stats.get("batch") is not None and \
            stats.get("batches_done", 0) < stats.get("batches_total", 0):
        done += stats.get("step", 0) + 1
    seconds = stats.get("seconds") or 0.0
    if not done or not total or not seconds:
        return None
    return max(0.0, seconds * (total - done) / done)


def describe(stats: dict[str, Any], written: int | None = None) -> str:
    """One line: prompts done, the batch and step in progress, tokens/s, bytes written, ETA."""
    parts = [f"prompts {stats.get('prompts_done', 0)}/{stats.get('prompts_total', 0)}"]
    if stats.get("batches_total"):
        batch = min(stats.get("batches_done", 0) + 1, stats["batches_total"])
        parts.append(f"batch {batch}/{stats['batches_total']} step {stats.get('step', 0) + 1}/"
                     f"{stats.get('max_tokens', 0)}")
    parts.append(f"{stats.get('tokens_per_second') or 0.0:.1f} tok/s")
    if stats.get("max_tokens") == 0:  # prompt passes only (gemmalens harvest): the tokens read are the work
        parts.append(f"{stats.get('prompt_tokens_per_second') or 0.0:.0f} prompt tok/s")
    if written is not None:
        parts.append(f"{human_bytes(written)} written")
    seconds = stats.get("seconds") or 0.0
    if seconds and "engine_waited_seconds" in stats:
        # shares of the run so far: the engine held back by the bus, the bus held back by a reliable sink
        parts.append(f"engine waited {stats['engine_waited_seconds'] / seconds:.0%}, sinks behind "
                     f"{stats['sinks_waited_seconds'] / seconds:.0%}")
    for name, sae in (stats.get("saes") or {}).items():  # each attached SAE: mean L0 and reconstruction error
        if isinstance(sae, dict) and sae.get("positions"):
            top = ", ".join(f"{f} ({a:.1f})" for f, a in sae.get("top_features") or [])
            parts.append(f"{name}: L0 {sae.get('mean_l0', 0):.0f}, error {sae.get('mean_error', 0):.2f}"
                         + (f", last token's top features {top}" if top else ""))
    eta = eta_seconds(stats)
    if stats.get("prompts_total") and stats.get("prompts_done", 0) >= stats["prompts_total"]:
        parts.append("done")
    else:
        parts.append(f"ETA {eta:.0f} s" if eta is not None else "ETA ?")
    return " | ".join(parts)


class ProgressView:
    """Shows a run's progress on ``stream``: a tqdm bar when it is a terminal, else a line every ``every`` s."""

    def __init__(self, stream=None, every: float = 5.0, folders: Sequence[str | Path] = (), live: bool | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every = every
        self.folders = list(folders)
        self.last: float | None = None  # when the last plain line was written
        self.bar = None

    def update(self, stats: dict[str, Any]) -> None:
        written = folder_bytes(self.folders) if self.folders else None
        if self.live:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=stats.get("prompts_total", 0), file=self.stream, unit="prompt",
                                bar_format="|{bar:20}| {desc}", dynamic_ncols=True, leave=True)
            self.bar.n = stats.get("prompts_done", 0)
            self.bar.set_description_str(describe(stats, written), refresh=True)
        elif self.last is None or time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(f"progress: {describe(stats, written)}", file=self.stream, flush=True)

    def close(self, stats: dict[str, Any] | None = None) -> None:
        if stats is not None:
            self.last = None
            self.update(stats)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LiveStats(LossySubscriber):
    """Progress from the engine's lossy endpoint (``gemmalens sink stats``; ``gemmalens run`` starts one)."""

    topics = ("stats",)

    def __init__(self, connect, stream=None, every: float = 5.0, folders: Sequence[str | Path] = (), **kwargs):
        super().__init__(connect, **kwargs)
        self.view = ProgressView(stream, every, folders)

    def on_stats(self, stats: dict[str, Any]) -> None:
        self.view.update(stats)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self.view.close(summary)
