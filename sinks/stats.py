"""Live stats: one terminal line while the run goes; quiet when stderr is not a terminal.

Reads the lossy endpoint, so it never slows the engine down.
"""

from __future__ import annotations

import sys
from typing import Any

from .base import LossySubscriber


def format_line(stats: dict[str, Any]) -> str:
    done, total = stats.get("prompts_done", 0), stats.get("prompts_total", 0)
    rate = stats.get("tokens_per_second") or 0.0
    seconds = stats.get("seconds") or 0.0
    frames_rate = stats.get("frames", 0) / seconds if seconds else 0.0
    per_prompt = seconds / done if done else None
    eta = f"{per_prompt * (total - done):.0f}s" if per_prompt else "?"
    line = (f"prompts {done}/{total} | {rate:.1f} tok/s | {frames_rate:.1f} frames/s | "
            f"queue {stats.get('queue_depth', 0)} | ETA {eta}")
    if seconds and "engine_waited_seconds" in stats:
        # shares of the run so far: the engine held back by the bus, the bus held back by a reliable sink
        waited, behind = stats["engine_waited_seconds"] / seconds, stats["sinks_waited_seconds"] / seconds
        line += f" | engine waited {waited:.0%} | sinks behind {behind:.0%}"
    return line


class LiveStats(LossySubscriber):
    topics = ("stats",)

    def __init__(self, connect, stream=None, **kwargs):
        super().__init__(connect, **kwargs)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def on_stats(self, stats: dict[str, Any]) -> None:
        if self.live:
            self.stream.write("\r" + format_line(stats).ljust(100))
            self.stream.flush()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.live:
            self.stream.write("\r" + format_line(summary).ljust(100) + "\n")
            self.stream.flush()
