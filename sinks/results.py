"""The results writer: results.json, results.jsonl, prompt_metadata.json and summary.json.

Each finished prompt is appended to ``results.jsonl`` (flushed and synced) the
moment it arrives, so nothing finished is lost if any process dies; at run end
``results.json`` (every result, by prompt id) and ``summary.json`` are written
atomically. On a resumed run the earlier lines are read back and a prompt
never appears twice. Schemas: docs/outputs.md.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .base import Subscriber
from .npz import write_atomic

RESULTS, RESULTS_LINES, METADATA, SUMMARY = "results.json", "results.jsonl", "prompt_metadata.json", "summary.json"


def read_result_lines(path: Path) -> dict[int, dict[str, Any]]:
    """Results already appended to a results.jsonl (a torn last line, from a crash, is skipped)."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        done.setdefault(int(result["index"]), result)
    return done


def dump_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class ResultsWriter(Subscriber):
    """Writes the run's JSON outputs into ``output_dir``."""

    topics = ("result", "tokens")

    def __init__(self, connect, output_dir: str | Path, echo: bool = False, **kwargs):
        super().__init__(connect, **kwargs)
        self.output_dir = Path(output_dir)
        self.echo = echo
        self.results: dict[int, dict[str, Any]] = {}
        self.prompts: dict[int, dict[str, Any]] = {}
        self._lines = None
        self.segments: list[dict[str, Any]] = []  # earlier segments of a resumed run: their tokens and seconds

    def on_run_start(self, info: dict[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.prompts = {p["index"]: p for p in info["prompts"]}
        self.results = read_result_lines(self.output_dir / RESULTS_LINES)
        earlier = self.output_dir / SUMMARY
        if self.results and earlier.exists():  # a resumed run: its earlier segments count in its speed
            previous = json.loads(earlier.read_text())
            self.segments = previous.get("segments") or [{"run": previous.get("run"), "tokens": 0, "seconds": 0.0}]
        metadata_path = self.output_dir / METADATA
        known = json.loads(metadata_path.read_text())["prompts"] if metadata_path.exists() else []
        merged = {p["index"]: p for p in known} | self.prompts
        dump_json(metadata_path, {"prompts": [merged[i] for i in sorted(merged)],
                                  "categories": _categories(merged.values())})
        self._lines = open(self.output_dir / RESULTS_LINES, "a", encoding="utf-8")

    def on_result(self, result: dict[str, Any]) -> None:
        index = int(result["index"])
        if index in self.results:
            return
        prompt = self.prompts.get(index, {})
        result = {"id": index, "category": prompt.get("category"), "subcategory": prompt.get("subcategory"), **result}
        self.results[index] = result
        self._lines.write(json.dumps(result, ensure_ascii=False) + "\n")
        self._lines.flush()
        os.fsync(self._lines.fileno())
        if self.echo:
            print(f"[{index}] {result['prompt']!r} -> {result['text']!r} ({result['finish_reason']})", file=sys.stderr)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self._lines is not None:
            self._lines.close()
        ordered = [self.results[i] for i in sorted(self.results)]
        dump_json(self.output_dir / RESULTS, ordered)
        dump_json(self.output_dir / SUMMARY, self.summary_body(summary, ordered))

    def summary_body(self, end: dict[str, Any], ordered: list[dict[str, Any]]) -> dict[str, Any]:
        info = self.run_info or {}
        expected = set(self.prompts)
        missing = sorted(expected - set(self.results))
        per_category = Counter(r.get("category") or "uncategorized" for r in ordered)
        tokens = sum(len(r["tokens"]) for r in ordered)
        segments = self.segments + [{"run": info.get("run"), "tokens": end.get("tokens", 0),
                                     "seconds": end.get("seconds", 0.0)}]
        seconds = sum(s["seconds"] for s in segments)
        return {
            "complete": bool(end.get("complete")) and not missing and self.complete,
            "engine_complete": bool(end.get("complete")),
            "reason": end.get("reason"),
            "prompts_total": len(expected),
            "prompts_done": len(expected) - len(missing),
            "missing_prompts": missing,
            "per_category": dict(per_category),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in ordered)),
            "tokens_generated": tokens,
            "prompt_tokens": sum(len(r["prompt_tokens"]) for r in ordered),
            "tokens_per_second": sum(s["tokens"] for s in segments) / seconds if seconds else 0.0,
            "wall_seconds": seconds,
            "segments": segments,
            "run": info.get("run"),
            "model": info.get("model"),
            "generation": info.get("generation"),
            "capture": info.get("capture"),
            "versions": info.get("versions"),
            "device": info.get("device"),
            "stream": {"gaps": self.gaps, "missing": self.missing()},
        }


def _categories(prompts) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for p in prompts:
        category = out.setdefault(p.get("category") or "uncategorized", {})
        sub = p.get("subcategory") or "-"
        category[sub] = category.get(sub, 0) + 1
    return out
