"""The dataset sink: captured per-token values as a Hugging Face ``datasets`` dataset that SAE trainers read.

One column per capture point whose value is per token (every point with a ``seq`` axis but the attention
scores and weights, whose key axis grows), ``token_ids`` (the token at that position: the model's input
there), and tags: ``prompt_id``, ``position``, ``step`` (0: the prompt pass), ``is_generated`` (the token was
sampled, not part of the prompt), ``category`` and ``intervention`` (the ids of the interventions in force for
that prompt at that step, comma-separated; empty: none). SAE features are stored as their nonzeros, two
columns ``NAME.indices`` and ``NAME.values``.

Rows are either one per token (``rows="token"``), ordered by prompt and position, or one per window of
``context_size`` consecutive tokens (``rows="context"``, what SAELens' cached-activations loader takes: a point's
column is ``Array2D(context, d)``, ``token_ids`` a list of ``context``): each batch's tokens in prompt and
position order, cut into windows; a batch's last partial window is dropped (``dropped_tokens`` in
``gemmalens-dataset.json`` counts them; harvest windows fit exactly).

A batch is written once it has ended, whole; sinks/arrowdata.py writes the shards, to a folder or any fsspec
URL. Resuming follows the npz archiver's rules: the prompts of listed shards are kept, the rest regenerated.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import numpy as np

from gemmalens import wire
from gemmalens.files import FolderLock
from gemmalens.spec import DATASET_ROWS

from .arrowdata import DatasetWriter, Sparse1D
from .base import Subscriber
from .store import open_store

TAGS = ("prompt_id", "position", "step", "is_generated", "token_ids", "category", "intervention")


def per_token(axes: list[str]) -> bool:
    """A point the dataset takes: rows and sequence first, then axes of fixed size (not attention's keys)."""
    return list(axes[:2]) == ["batch", "seq"] and "keys" not in axes


def _select_sparse(body: wire.Sparse, entries: np.ndarray) -> Sparse1D:
    """The nonzeros of the (flat, C-order) leading ``entries`` of a sparse array, in that order."""
    starts = np.concatenate([[0], np.cumsum(body.counts, dtype=np.int64)])[:-1][entries]
    counts = body.counts[entries].astype(np.int64)
    total = int(counts.sum())
    out_starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    gather = np.arange(total, dtype=np.int64) - np.repeat(out_starts, counts) + np.repeat(starts, counts)
    return Sparse1D(counts.astype(np.int32), body.indices[gather], body.values[gather])


def _concat(chunks: list) -> np.ndarray | Sparse1D:
    if isinstance(chunks[0], Sparse1D):
        return Sparse1D(*(np.concatenate([getattr(c, k) for c in chunks]) for k in ("counts", "indices", "values")))
    return np.concatenate(chunks)


def _take(column: np.ndarray | Sparse1D, order: np.ndarray) -> np.ndarray | Sparse1D:
    if isinstance(column, Sparse1D):
        return _select_sparse(wire.Sparse((len(column.counts), 1), column.counts, column.indices, column.values),
                              order)
    return column[order]


class DatasetSink(Subscriber):
    """Writes the run's per-token values into ``dest`` (a folder or fsspec URL); reliable. ``points``: globs
    of the capture points to write (default: every per-token point captured)."""

    topics = ("act.", "tokens", "result", "batch_end", "intervention")
    sparse = "sparse"

    def __init__(self, connect, dest: str | Path, rows: str = "token", context_size: int = 128, points=None,
                 shard_mb: float = 500.0, shard_seconds: float = 300.0, locked: bool = False, **kwargs):
        if rows not in DATASET_ROWS:
            raise ValueError(f"rows {rows!r}: expected one of {', '.join(DATASET_ROWS)}")
        if rows == "context" and context_size < 1:
            raise ValueError(f"context size {context_size}: a window holds at least one token")
        self.store = open_store(dest)
        self.lock = FolderLock(self.store.root).acquire() if self.store.local and not locked else None
        self.rows, self.context_size = rows, context_size
        self.points = tuple(points or ("*",))
        self.writer = DatasetWriter(self.store, int(shard_mb * (1 << 20)), shard_seconds)
        self.batches: dict[int, dict[str, Any]] = {}  # batches not written yet: their values by step, tokens
        self.left_out: set[str] = set()
        self.errors: list[BaseException] = []
        try:
            super().__init__(connect, **kwargs)
        except BaseException:
            self._release()
            raise

    def state(self) -> dict[str, Any]:
        return self.writer.state()

    @property
    def layout(self) -> dict[str, Any]:
        return {"rows": self.rows, "context": self.context_size if self.rows == "context" else None,
                "points": list(self.points)}

    def on_run_start(self, info: dict[str, Any]) -> None:
        self.batches = {}
        self.writer.abandon()  # a new segment (an engine restarted): the batches in the open shard are redone
        self.writer.begin(info["run"], info.get("spec"), self.layout, bool(info["segment"].get("resume"))
                          or self.writer.progress is not None)

    def _batch(self, number: int) -> dict[str, Any]:
        return self.batches.setdefault(number, {"steps": {}, "tokens": {}, "prompt_tokens": {}, "category": {},
                                                "interventions": []})

    def on_activation(self, frame: wire.Frame) -> None:
        head = frame.header
        name = head["name"]
        if not per_token(head["axes"]):
            if name not in self.left_out:
                self.left_out.add(name)
                print(f"{self.name}: {name} is not written to the dataset: its values are not per token "
                      f"(axes {head['axes']})", file=self.stream, flush=True)
            return
        if not any(fnmatch.fnmatchcase(name, p) for p in self.points):
            return
        positions = frame.positions()
        live = np.asarray(head["live"], dtype=bool)
        rows, seq = np.nonzero(live[:, None] & (positions >= 0))
        step = self._batch(head["batch"])["steps"].setdefault(head["step"], {"keys": None, "values": {}})
        keys = (np.asarray(head["prompts"], dtype=np.int64)[rows], positions[rows, seq])
        if step["keys"] is None:
            step["keys"] = keys
        elif not (np.array_equal(step["keys"][0], keys[0]) and np.array_equal(step["keys"][1], keys[1])):
            raise ValueError(f"{name} at step {head['step']} of batch {head['batch']} covers other positions than "
                             "the step's other points; capture them with the same --positions")
        body = frame.body
        if isinstance(body, wire.Sparse):
            step["values"][name] = _select_sparse(body, rows * positions.shape[1] + seq)
        else:
            step["values"][name] = body[rows, seq]

    def on_tokens(self, frame: wire.Frame) -> None:
        body = frame.body
        tokens = self._batch(body["batch"])["tokens"]
        for prompt, token, position in zip(body["prompts"], body["tokens"], body["positions"]):
            tokens[(prompt, position)] = token

    def on_result(self, result: dict[str, Any]) -> None:
        for batch in self.batches.values():  # the batch whose step values hold this prompt
            if any(result["id"] in step["keys"][0] for step in batch["steps"].values() if step["keys"] is not None):
                batch["prompt_tokens"][result["id"]] = result["prompt_tokens"]
                batch["category"][result["id"]] = result.get("category") or ""
                return

    def on_intervention(self, body: dict[str, Any]) -> None:
        self._batch(body["batch"])["interventions"].append((body["step"], body["interventions"]))

    def on_batch_end(self, body: dict[str, Any]) -> None:
        batch = self.batches.pop(body["batch"], None)
        if batch is None or not batch["steps"]:
            return
        try:
            columns, dropped = self._rows(batch)
            self.writer.add(body["prompts"], columns, self.context_size if self.rows == "context" else None, dropped)
        except BaseException as error:
            self.errors.append(error)
            raise

    def _rows(self, batch: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The batch's rows: tags and points, by prompt and position (in windows for context rows)."""
        steps = sorted(batch["steps"])
        names = list(batch["steps"][steps[0]]["values"])
        prompt_id = np.concatenate([batch["steps"][s]["keys"][0] for s in steps])
        position = np.concatenate([batch["steps"][s]["keys"][1] for s in steps])
        step = np.concatenate([np.full(len(batch["steps"][s]["keys"][0]), s, dtype=np.int32) for s in steps])
        order = np.lexsort((position, prompt_id))
        prompt_id, position, step = prompt_id[order], position[order], step[order]
        tokens = [self._token(batch, int(p), int(q)) for p, q in zip(prompt_id, position)]
        columns: dict[str, Any] = {
            "prompt_id": prompt_id, "position": position.astype(np.int32), "step": step,
            "is_generated": step > 0, "token_ids": np.asarray(tokens, dtype=np.int32),
            "category": np.asarray([batch["category"].get(int(p), "") for p in prompt_id], dtype=object),
            "intervention": self._interventions(batch, prompt_id, step)}
        for name in names:
            columns[name] = _take(_concat([batch["steps"][s]["values"][name] for s in steps]), order)
        if self.rows == "token":
            return columns, 0
        windows = len(prompt_id) // self.context_size
        kept = windows * self.context_size
        grouped = {}
        for name, column in columns.items():
            if isinstance(column, Sparse1D):
                grouped[name] = _take(column, np.arange(kept))
            else:
                grouped[name] = column[:kept].reshape(windows, self.context_size, *column.shape[1:])
        return grouped, len(prompt_id) - kept

    @staticmethod
    def _token(batch: dict[str, Any], prompt: int, position: int) -> int:
        prompt_tokens = batch["prompt_tokens"].get(prompt)
        if prompt_tokens is not None and position < len(prompt_tokens):
            return int(prompt_tokens[position])
        return int(batch["tokens"].get((prompt, position), -1))  # chosen for position p, the input there

    @staticmethod
    def _interventions(batch: dict[str, Any], prompt_id: np.ndarray, step: np.ndarray) -> np.ndarray:
        out = np.full(len(prompt_id), "", dtype=object)
        for first, records in sorted(batch["interventions"], key=lambda x: x[0]):  # later changes override
            for index in np.nonzero(step >= first)[0]:
                out[index] = ",".join(r["id"] for r in records if int(prompt_id[index]) in r["rows"])
        return out

    def on_run_end(self, summary: dict[str, Any]) -> None:
        complete = bool(summary.get("complete")) and not self.batches and not self.errors
        try:
            self.writer.finish(complete, description=f"gemmalens run {self.run_id}")
        except BaseException as error:
            self.errors.append(error)
            raise

    def durable_problem(self) -> str | None:
        if self.errors:
            return f"writing the dataset failed: {self.errors[0]}"
        if self.summary is not None and self.batches:
            return f"{len(self.batches)} batch(es) not written: {sorted(self.batches)[:10]}"
        return None

    def close(self) -> None:
        super().close()
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
