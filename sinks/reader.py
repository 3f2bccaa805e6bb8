"""Reading what the npz archiver wrote: ``open_activations`` and ``ActivationArchive``.

A run's activations are one file per (step, batch) (sinks/npz.py documents
the layout). The reader opens only the files and arrays asked for, strips
padding, re-indexes attention keys by position, and reads the sampling
values (one name per step on disk) as one table or trajectory per prompt.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from gemmalens.wire import SAMPLE_TEMPLATE, Sparse

INDEX = "activations_index.json"
_STEP_NAME = re.compile(r"^generate\.step_(\d+)\.sample\.(.+)$")
_FILE_STEP = re.compile(r"^activations_step_(\d+)_batch_(-?\d+)\.npz$")
_BOOKKEEPING = ("prompts", "step", "tokens", "pad")


def step_file(step: int, batch: int) -> str:
    return f"activations_step_{step}_batch_{batch}.npz"


def step_of(file: str) -> int:
    """The step of a file named by ``step_file``."""
    match = _FILE_STEP.match(file)
    if match is None:
        raise ValueError(f"{file!r} is not an activations_step_K_batch_B.npz file name")
    return int(match.group(1))


def sample_name(name: str) -> tuple[str, int | None] | None:
    """``(suffix, step)`` of a sampling name: ``generate.step_3.sample.token`` -> ("token", 3), the template
    ``generate.step_{k}.sample.token`` -> ("token", None); None for any other name."""
    if name.startswith(SAMPLE_TEMPLATE):
        return name[len(SAMPLE_TEMPLATE):], None
    match = _STEP_NAME.match(name)
    return (match.group(2), int(match.group(1))) if match else None


class ActivationArchive:
    """One activations folder, read lazily: only the files and arrays asked for are loaded.

    ``names`` lists the captured points (sampling values once, as ``generate.step_{k}.sample.<value>``),
    ``prompts`` the prompts whose activations are complete, ``tokens`` the token chosen at each step.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.exists():
            raise FileNotFoundError(f"{self.directory}: no {INDEX}; not an activations folder written by gemmalens")
        self.index = json.loads(index_path.read_text())
        self._batch_of = {p: int(b) for b, v in self.index["batches"].items() for p in v["prompts"]}
        self._names: list[str] | None = None

    def __repr__(self) -> str:
        files = [f for b in self.index["batches"].values() for f in b["files"]]
        size = sum((self.directory / f).stat().st_size for f in files if (self.directory / f).exists())
        steps = max((b["steps"] for b in self.index["batches"].values()), default=0)
        return (f"<ActivationArchive {self.directory}: {len(self.prompts)} prompts, up to {steps} steps, "
                f"{len(self.names)} names, {len(files)} files, {size / 1e6:.1f} MB>")

    @property
    def prompts(self) -> list[int]:
        return sorted(self._batch_of)

    @property
    def tokens(self) -> dict[int, list[int]]:
        """The token table: for each prompt, the token chosen at each step."""
        return {int(p): t for p, t in self.index["tokens"].items() if int(p) in self._batch_of}

    @property
    def names(self) -> list[str]:
        """Captured points; the per-step sampling values as one ``generate.step_{k}.sample.<value>`` name each."""
        if self._names is None:
            names: set[str] = set()
            for batch in self.index["batches"].values():
                for file in batch["files"]:
                    with np.load(self.directory / file) as data:
                        names.update(public_name(re.sub(r"\.sparse_counts$", "", k)) for k in data.files
                                     if k not in _BOOKKEEPING and not k.endswith((".positions", ".sparse_indices",
                                                                                  ".sparse_values", ".sparse_width")))
                break
            self._names = sorted(names)
        return self._names

    def axes(self, name: str) -> list[str]:
        """The axes of a captured name as stored (``batch`` first: one row per prompt of the batch)."""
        return self.index.get("axes", {}).get(self.resolve(name), [])

    def keyed(self, name: str) -> bool:
        """Whether a name's values have a key axis (attention scores and weights: ``[heads, seq, keys]``)."""
        return "keys" in self.axes(name)

    def resolve(self, name: str) -> str:
        """The stored spelling of ``name`` (a step's sampling name becomes the template); an unknown name is a
        KeyError that lists the nearest names."""
        sampling = sample_name(name)
        public = SAMPLE_TEMPLATE + sampling[0] if sampling else name
        if public not in self.names:
            near = difflib.get_close_matches(public, self.names, n=5, cutoff=0.5)
            raise KeyError(f"{name!r} was not captured in {self.directory}"
                           + (f"; nearest names: {', '.join(near)}" if near else "")
                           + f" ({len(self.names)} names: see .names)")
        return public

    def get(self, name: str, prompts: Iterable[int] | None = None, steps: Iterable[int] | None = None,
            sparse: bool = False):
        """``{prompt: {step: (positions, array)}}`` for one name, padding removed.

        Attention arrays come as ``[heads, seq, keys]`` with key j at position j;
        everything else as ``[seq, ...]``. A sampling name reads every step's
        value (or, spelled for one step, ``generate.step_3.sample.token``, that step's).
        SAE features (stored as their nonzeros) come dense, or with ``sparse`` as ``wire.Sparse``.
        """
        public = self.resolve(name)
        sampling = sample_name(name)
        if sampling and sampling[1] is not None:
            steps = [sampling[1]] if steps is None else [s for s in steps if s == sampling[1]]
        wanted = self.prompts if prompts is None else list(prompts)
        out: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {p: {} for p in wanted}
        by_batch: dict[int, list[int]] = {}
        for p in wanted:
            if p not in self._batch_of:
                raise KeyError(f"prompt {p} has no complete activations in {self.directory} "
                               f"(complete: {_ranges(self.prompts)})")
            by_batch.setdefault(self._batch_of[p], []).append(p)
        chosen_steps = None if steps is None else set(steps)
        for batch, members in by_batch.items():
            for file in self.index["batches"][str(batch)]["files"]:
                step = step_of(file)
                if chosen_steps is not None and step not in chosen_steps:
                    continue
                stored = public.replace("{k}", str(step))
                with np.load(self.directory / file) as data:
                    stored_sparse = stored + ".sparse_counts" in data.files
                    if stored not in data.files and not stored_sparse:
                        continue
                    rows, chosen = list(data["prompts"]), data["tokens"]
                    positions = data[stored + ".positions"]
                    array = _stored_sparse(data, stored) if stored_sparse else data[stored]
                    for p in members:
                        r = rows.index(p)
                        if chosen[r] < 0:  # the row had finished: its values here are meaningless
                            continue
                        keep = positions[r] >= 0
                        if stored_sparse:
                            values = _sparse_rows(array, r, np.nonzero(keep)[0])
                            values = values if sparse else values.dense()
                        elif self.keyed(public):
                            values = np.compress(keep, array[r], axis=1)[..., int(data["pad"][r]):]
                        else:
                            values = np.compress(keep, array[r], axis=0)
                        out[p][step] = (positions[r][keep], values)
        return out

    def trajectory(self, name: str, prompt: int, sparse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``[T]`` and values of one point over the prompt and every generated token, in order.

        Values are ``[T, ...]``; attention ``[heads, T, K]`` with K the longest
        key range: a query's keys beyond its own range (later positions) hold
        0 for weights and ``-inf`` for scores, as keys a query does not see do.
        SAE features with ``sparse``: one ``wire.Sparse`` of shape ``[T, width]``.
        """
        steps = self.get(name, [prompt], sparse=sparse)[prompt]
        parts = [steps[k] for k in sorted(steps)]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        positions = np.concatenate([p for p, _ in parts])
        if isinstance(parts[0][1], Sparse):
            return positions, Sparse((len(positions), parts[0][1].shape[-1]),
                                     *(np.concatenate([getattr(a, f) for _, a in parts])
                                       for f in ("counts", "indices", "values")))
        if not self.keyed(self.resolve(name)):
            return positions, np.concatenate([a for _, a in parts])
        keys = max(a.shape[-1] for _, a in parts)
        fill = -np.inf if name.endswith("scores") else 0.0
        padded = [np.pad(a, [(0, 0), (0, 0), (0, keys - a.shape[-1])], constant_values=fill) for _, a in parts]
        return positions, np.concatenate(padded, axis=1)

    def sampling(self, prompt: int, top: int = 5) -> list[dict[str, Any]]:
        """The sampling decisions of one prompt as a table: a row per step with its ``step``, ``position``,
        ``token`` and whatever was captured of ``token_prob`` and the ``top`` most likely alternatives
        (``top_tokens``, ``top_probs``, from ``softmax_probs``)."""
        table = [{"step": k, "token": t} for k, t in enumerate(self.tokens.get(prompt, [])) if t >= 0]
        by_step = {row["step"]: row for row in table}
        captured = {sample_name(n)[0] for n in self.names if sample_name(n)}
        for value in ("token", "token_prob", "softmax_probs"):
            if value not in captured:
                continue
            for step, (positions, values) in self.get(SAMPLE_TEMPLATE + value, [prompt])[prompt].items():
                row = by_step.get(step)
                if row is None:
                    continue
                row["position"] = int(positions[0])
                if value == "token_prob":
                    row["token_prob"] = float(values.reshape(-1)[0])
                else:
                    probs = values.reshape(-1)
                    best = np.argsort(-probs)[:top]
                    row["top_tokens"], row["top_probs"] = best.tolist(), probs[best].tolist()
        return table


class GroupedArchive:
    """The activations of a ``--process-by-group`` run: one archive per group folder, read as one."""

    def __init__(self, archives: dict[str, ActivationArchive]):
        self.groups = archives
        self._owner = {p: a for a in archives.values() for p in a.prompts}

    def __repr__(self) -> str:
        return (f"<GroupedArchive {len(self.groups)} groups ({', '.join(self.groups)}): {len(self.prompts)} prompts, "
                f"{len(self.names)} names>")

    @property
    def prompts(self) -> list[int]:
        return sorted(self._owner)

    @property
    def tokens(self) -> dict[int, list[int]]:
        return {p: t for a in self.groups.values() for p, t in a.tokens.items()}

    @property
    def names(self) -> list[str]:
        return sorted({n for a in self.groups.values() for n in a.names})

    def _archive(self, prompt: int) -> ActivationArchive:
        if prompt not in self._owner:
            raise KeyError(f"prompt {prompt} has no complete activations in any group")
        return self._owner[prompt]

    def get(self, name: str, prompts: Iterable[int] | None = None, steps: Iterable[int] | None = None,
            sparse: bool = False):
        out = {}
        for p in self.prompts if prompts is None else list(prompts):
            out.update(self._archive(p).get(name, [p], steps, sparse))
        return out

    def trajectory(self, name: str, prompt: int, sparse: bool = False):
        return self._archive(prompt).trajectory(name, prompt, sparse)

    def sampling(self, prompt: int, top: int = 5):
        return self._archive(prompt).sampling(prompt, top)


def _stored_sparse(data, stored: str) -> Sparse:
    """A step file's sparse entries of ``stored`` as one ``Sparse`` ``[rows, seq, width]``."""
    counts = data[stored + ".sparse_counts"]
    return Sparse((*counts.shape, int(data[stored + ".sparse_width"])), counts.reshape(-1),
                  data[stored + ".sparse_indices"], data[stored + ".sparse_values"])


def _sparse_rows(array: Sparse, row: int, entries: np.ndarray) -> Sparse:
    """The entries ``entries`` along seq of one row of a ``[rows, seq, width]`` Sparse, as ``[len, width]``."""
    seq = array.shape[1]
    starts = np.concatenate([[0], np.cumsum(array.counts)])
    chosen = row * seq + entries
    spans = [np.arange(starts[i], starts[i + 1]) for i in chosen]
    taken = np.concatenate(spans) if spans else np.zeros(0, np.int64)
    return Sparse((len(entries), array.shape[-1]), array.counts[chosen], array.indices[taken], array.values[taken])


def open_activations(path: str | Path) -> ActivationArchive | GroupedArchive:
    """Opens what the npz archiver wrote: an activations folder, a run's output folder (its ``activations``
    folder, or the one its run_config.json names), or a ``--process-by-group`` root (every group at once)."""
    path = Path(path)
    if (path / INDEX).exists():
        return ActivationArchive(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    own = _activations_of(path)
    if own is not None:
        return ActivationArchive(own)
    groups = {child.name: ActivationArchive(found) for child in sorted(path.iterdir())
              if child.is_dir() and (found := _activations_of(child)) is not None}
    if groups:
        return GroupedArchive(groups)
    raise FileNotFoundError(f"{path}: no {INDEX} here, in an activations subfolder or in group subfolders; "
                            "was the run made with --save-activations?")


def _activations_of(folder: Path) -> Path | None:
    """A run folder's activations folder: the one its run_config.json names, else ``activations``."""
    config = folder / "run_config.json"
    candidates = []
    if config.exists():
        named = json.loads(config.read_text()).get("activations_dir")
        if named:
            candidates.append(Path(named))
    candidates.append(folder / "activations")
    return next((c for c in candidates if (c / INDEX).exists()), None)


def public_name(stored: str) -> str:
    """The name as listed: a step's sampling name as its template."""
    sampling = sample_name(stored)
    return SAMPLE_TEMPLATE + sampling[0] if sampling else stored


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    spans, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}-{a}" if a != start else str(a))
            start = b
    return ", ".join(spans)
