"""The results writer: results.json, results.jsonl, prompt_metadata.json, summary.json and run_config.json.

Each finished prompt is appended to ``results.jsonl`` (flushed and synced) the moment it arrives, so nothing
finished is lost if any process dies; at run end ``results.json`` (every result, by prompt id) and
``summary.json`` are written atomically. A resumed run reads the earlier lines back (a torn last line is cut
off) and a prompt never appears twice. A new run into a folder that holds a complete earlier run moves that
run's files into ``.replaced/<run>`` first and removes them once the new run is complete. Schemas:
docs/outputs.md.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from gemmalens.files import ASIDE, FolderLock, JsonLines, drop_aside, dump_json, read_json_lines, set_aside
from gemmalens.spec import RUN_CONFIG

from .base import Subscriber

RESULTS, RESULTS_LINES, METADATA, SUMMARY = "results.json", "results.jsonl", "prompt_metadata.json", "summary.json"
OUTPUTS = [RESULTS, RESULTS_LINES, METADATA, SUMMARY, RUN_CONFIG]


def read_result_lines(path: Path) -> dict[int, dict[str, Any]]:
    """Results already appended to a results.jsonl, by prompt id (a torn last line, from a crash, is not one)."""
    rows, _ = read_json_lines(path)
    done: dict[int, dict[str, Any]] = {}
    for row in rows:
        done.setdefault(int(row["id"]), row)
    return done


def folder_state(folder: Path) -> dict[str, Any]:
    """What a results folder holds: the run, whether it is complete, the prompts done and the settings."""
    if not (folder / RESULTS_LINES).exists() and not (folder / SUMMARY).exists():
        return {}
    summary = json.loads((folder / SUMMARY).read_text()) if (folder / SUMMARY).exists() else {}
    spec = json.loads((folder / RUN_CONFIG).read_text()) if (folder / RUN_CONFIG).exists() else None
    return {"folder": str(folder), "run": summary.get("run") or "unfinished", "complete": bool(summary.get("complete")),
            "have": sorted(read_result_lines(folder / RESULTS_LINES)), "spec": spec}


class ResultsWriter(Subscriber):
    """Writes the run's JSON outputs into ``output_dir`` (locked for this process unless ``locked``: a parent
    holds the lock)."""

    topics = ("result", "tokens")

    def __init__(self, connect, output_dir: str | Path, echo: bool = False, locked: bool = False, **kwargs):
        self.output_dir = Path(output_dir)
        self.lock = None if locked else FolderLock(self.output_dir).acquire()
        super().__init__(connect, **kwargs)
        self.echo = echo
        self.results: dict[int, dict[str, Any]] = {}
        self.prompts: dict[int, dict[str, Any]] = {}
        self._lines: JsonLines | None = None
        self.segments: list[dict[str, Any]] = []  # earlier segments of a resumed run: their tokens and seconds
        self.aside: Path | None = None  # where an earlier complete run's files wait until this one completes
        self.error: Exception | None = None
        self.interventions: dict[str, dict[str, Any]] = {}  # by id: each one's record and the prompts it edited

    def state(self) -> dict[str, Any]:
        return folder_state(self.output_dir)

    def on_stats(self, stats: dict[str, Any]) -> None:
        self._last_stats = stats

    def on_run_start(self, info: dict[str, Any]) -> None:
        if self._lines is not None:  # a new segment into this running sink: the results so far stay, and the
            self._lines.close()  # cut segment counts in the speed as far as its last stats went
            stats = getattr(self, "_last_stats", {})
            self.segments.append({"run": self._segment_run, "tokens": stats.get("tokens", 0),
                                  "seconds": stats.get("seconds", 0.0)})
            self._last_stats = {}
        self._segment_run = info.get("run")
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            earlier = folder_state(self.output_dir)
            if earlier and not info["segment"].get("resume"):
                self.aside = set_aside(self.output_dir, OUTPUTS, earlier.get("run"))
                print(f"{self.name}: the earlier run's files in {self.output_dir} are kept in {self.aside} until this "
                      "run is complete", file=self.stream, flush=True)
            self.prompts = {p["index"]: p for p in info["prompts"]}
            self.results = read_result_lines(self.output_dir / RESULTS_LINES)
            if info["segment"].get("resume") and not self.segments and (self.output_dir / SUMMARY).exists():
                previous = json.loads((self.output_dir / SUMMARY).read_text())
                self.segments = previous.get("segments") or []
                self.interventions = {i["id"]: i for i in previous.get("interventions") or ()}
            dump_json(self.output_dir / RUN_CONFIG, info["spec"])
            dump_json(self.output_dir / METADATA, {"run": info.get("run"),
                                                   "prompts": [self.prompts[i] for i in sorted(self.prompts)],
                                                   "categories": _categories(self.prompts.values())})
            self._lines = JsonLines(self.output_dir / RESULTS_LINES)
        except Exception as error:
            self.error = error
            raise

    def on_result(self, result: dict[str, Any]) -> None:
        index = int(result["id"])
        if index in self.results:
            return
        self.results[index] = result
        try:
            self._lines.append(result)
        except Exception as error:
            self.error = error
            raise
        if self.echo:
            print(f"[{index}] {result['prompt']!r} -> {result['text']!r} ({result['finish_reason']})",
                  file=self.stream)

    def on_intervention(self, body: dict[str, Any]) -> None:
        for record in body["interventions"]:
            known = self.interventions.setdefault(record["id"], {**record, "rows": []})
            known["rows"] = sorted(set(known["rows"]) | set(record["rows"]))

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self._lines is not None:
            self._lines.close()
        if self.run_info is None or self.error is not None:
            return
        ordered = [self.results[i] for i in sorted(self.results)]
        try:
            dump_json(self.output_dir / RESULTS, ordered)
            body = self.summary_body(summary, ordered)
            dump_json(self.output_dir / SUMMARY, body)
        except Exception as error:
            self.error = error
            raise
        if body["complete"]:  # an earlier run's files kept aside (by this segment or an earlier one) go
            drop_aside(self.output_dir)

    def durable_problem(self) -> str | None:
        if self.error is not None:
            return f"writing failed: {self.error}"
        missing = sorted(set(self.prompts) - set(self.results))
        if self.summary is not None and self.summary.get("complete") and missing:
            return f"{len(missing)} prompt(s) without a result: {missing[:10]}"
        return None

    def summary_body(self, end: dict[str, Any], ordered: list[dict[str, Any]]) -> dict[str, Any]:
        info = self.run_info or {}
        expected = set(self.prompts)
        missing = sorted(expected - set(self.results))
        per_category = Counter(r.get("category") or "uncategorized" for r in ordered)
        segments = self.segments + [{"run": info.get("run"), "tokens": end.get("tokens", 0),
                                     "seconds": end.get("seconds", 0.0)}]
        seconds = sum(s["seconds"] for s in segments)
        complete = bool(end.get("complete")) and not missing and not self.shortfall_parts(engine=False)
        return {
            "complete": complete,
            "engine_complete": bool(end.get("complete")),
            "reason": end.get("reason") or (None if complete else self.shortfall()),
            "prompts_total": len(expected),
            "prompts_done": len(expected) - len(missing),
            "missing_prompts": missing,
            "per_category": dict(per_category),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in ordered)),
            "tokens_generated": sum(len(r["tokens"]) for r in ordered),
            "prompt_tokens": sum(len(r["prompt_tokens"]) for r in ordered),
            "tokens_per_second": sum(s["tokens"] for s in segments) / seconds if seconds else 0.0,
            "wall_seconds": seconds,
            "segments": segments,
            "run": info.get("run"),
            "model": info.get("model"),
            "generation": info.get("generation"),
            "capture": info.get("capture"),
            "interventions": [self.interventions[k] for k in sorted(self.interventions)],
            "notes": end.get("notes") or [],
            "saes": end.get("saes") or {},
            "versions": info.get("versions"),
            "device": info.get("device"),
            "stream": {"gaps": self.gaps, "missing": self.missing(), "rejected": self.rejected},
            "replaced_outputs": (str(self.output_dir / ASIDE) if (self.output_dir / ASIDE).exists() and not complete
                                 else None),
        }

    def close(self) -> None:
        super().close()
        if self.lock is not None:
            self.lock.release()


def _categories(prompts) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for p in prompts:
        category = out.setdefault(p.get("category") or "uncategorized", {})
        sub = p.get("subcategory") or "-"
        category[sub] = category.get(sub, 0) + 1
    return out
