"""A Hugging Face ``datasets`` folder (what ``Dataset.save_to_disk`` writes) built shard by shard on any store.

The folder holds Arrow stream files ``data-<run>-<n>.arrow``, ``dataset_info.json`` (the features) and
``state.json`` (the list of shards), which ``datasets.load_from_disk`` reads. Shards are written as batches
arrive and closed once they pass ``shard_bytes`` (or have been open ``shard_seconds``); ``gemmalens-dataset.json``
lists the closed ones, with the prompts each holds, and is rewritten after each: that is what a resumed run
keeps (a shard not listed there was cut short and is removed). ``dataset_info.json`` and ``state.json`` come last,
once the run is complete, so a half-written dataset never opens as a whole one; a new run moves an earlier
run's ``state.json`` aside (``previous-state.json``) as it starts and removes that run's shards once it is
complete itself.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from .store import Store

PROGRESS, STATE, INFO, PREVIOUS = "gemmalens-dataset.json", "state.json", "dataset_info.json", "previous-state.json"
SHARDS = "data-*.arrow"
ARRAY_TYPES = {2: "Array2D", 3: "Array3D", 4: "Array4D", 5: "Array5D"}


class Sparse1D:
    """Per row: a variable number of (index, value) pairs (an SAE's nonzero features); ``counts`` per row."""

    def __init__(self, counts: np.ndarray, indices: np.ndarray, values: np.ndarray):
        self.counts, self.indices, self.values = counts, indices, values

    def __len__(self) -> int:
        return len(self.counts)


def feature_of(column: np.ndarray | Sparse1D, group: int | None):
    """The ``datasets`` feature of a column whose first axis is the row (``group``: entries per row, in context
    rows; their axis comes first in each row's value)."""
    from datasets import List, Value
    import datasets

    if isinstance(column, Sparse1D):
        pair = {"indices": List(Value("int32")), "values": List(Value(str(column.values.dtype)))}
        return {k: (List(v, length=group) if group else v) for k, v in pair.items()}
    shape = column.shape[1:]  # in context rows: (group, ...)
    value = Value("string") if column.dtype.kind in "OU" else Value(str(column.dtype))
    if len(shape) == 0:
        return value
    if len(shape) == 1:
        return List(value, length=shape[0])
    if len(shape) in ARRAY_TYPES:
        return getattr(datasets, ARRAY_TYPES[len(shape)])(shape=shape, dtype=value.dtype)
    raise ValueError(f"a value of {len(shape)} axes per row is more than a dataset column holds (5)")


def features_of(columns: dict[str, Any], group: int | None):
    """The dataset's ``Features``: a sparse column becomes two, ``NAME.indices`` and ``NAME.values``."""
    from datasets import Features

    out = {}
    for name, column in columns.items():
        feature = feature_of(column, group)
        if isinstance(feature, dict):
            out.update({f"{name}.{part}": f for part, f in feature.items()})
        else:
            out[name] = feature
    return Features(out)


def _regular_lists(values, shape: tuple[int, ...], rows: int):
    """Nested lists of fixed sizes ``shape`` per row over the flat ``values`` (a storage of an ArrayND)."""
    import pyarrow as pa

    array = values
    for size in reversed(shape):
        count = len(array) // size
        array = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * size), array)
    assert len(array) == rows
    return array


def arrow_column(column: np.ndarray, kind, rows: int):
    """``column`` as the Arrow array of type ``kind`` (one of those ``features_of`` gives)."""
    import pyarrow as pa

    if isinstance(kind, pa.ExtensionType):  # ArrayND: nested lists in storage
        flat = pa.array(np.ascontiguousarray(column).reshape(-1))
        return pa.ExtensionArray.from_storage(kind, _regular_lists(flat, column.shape[1:], rows))
    if pa.types.is_fixed_size_list(kind):
        inner = kind.value_type
        if pa.types.is_list(inner):  # a group of sparse rows: built by sparse_column
            raise TypeError("sparse columns are built by sparse_column")
        flat = column.reshape(-1)
        values = pa.array(flat.tolist() if flat.dtype.kind in "OU" else flat, type=inner)
        return pa.FixedSizeListArray.from_arrays(values, kind.list_size)
    if column.dtype.kind in "OU":
        return pa.array(column.tolist(), type=kind)
    return pa.array(column, type=kind)


def sparse_columns(column: Sparse1D, group: int | None) -> tuple[Any, Any]:
    """The ``indices`` and ``values`` arrays of a sparse column (lists per entry; per row in groups of
    ``group`` entries)."""
    import pyarrow as pa

    offsets = pa.array(np.concatenate([[0], np.cumsum(column.counts, dtype=np.int64)]).astype(np.int32))
    out = []
    for flat in (column.indices.astype(np.int32), column.values):
        lists = pa.ListArray.from_arrays(offsets, pa.array(flat))
        out.append(pa.FixedSizeListArray.from_arrays(lists, group) if group else lists)
    return out[0], out[1]


class DatasetWriter:
    """Writes one run's rows into ``store`` as a Hugging Face dataset, shard by shard."""

    def __init__(self, store: Store, shard_bytes: int = 500 << 20, shard_seconds: float = 300.0):
        self.store = store
        self.shard_bytes, self.shard_seconds = shard_bytes, shard_seconds
        self.progress: dict[str, Any] | None = None
        self.features = None
        self._open: dict[str, Any] | None = None  # the shard being written: its file, writer, prompts, bytes
        self._stack = contextlib.ExitStack()

    def state(self) -> dict[str, Any]:
        """What the store holds, as a reliable subscriber tells the engine (sinks/base.py ``state``)."""
        progress = self.store.read_json(PROGRESS)
        if progress is None:
            return {}
        return {"folder": self.store.url, "run": progress.get("run") or "unfinished",
                "complete": bool(progress.get("complete")), "spec": progress.get("spec"),
                "have": sorted(p for shard in progress["shards"] for p in shard["prompts"])}

    def begin(self, run: str, spec: dict[str, Any] | None, layout: dict[str, Any], resume: bool) -> None:
        """Starts (or, with ``resume``, continues) a run: an earlier run's complete dataset stays whole until this
        one is; shards a stopped run left unlisted are removed."""
        self.store.make()
        earlier = self.store.read_json(PROGRESS)
        if resume and earlier is not None:
            if earlier.get("layout") != layout:
                raise ValueError(f"{self.store}: the dataset being resumed was written with {earlier.get('layout')}, "
                                 f"not {layout}; resume with the same dataset options or write a new one")
            self.progress = {**earlier, "run": run, "complete": False}
        else:
            if self.store.exists(STATE):
                self.store.copy(STATE, PREVIOUS)
                self.store.remove([STATE])
            self.progress = {"run": run, "spec": spec, "layout": layout, "features": None, "shards": [],
                             "dropped_tokens": 0, "complete": False}
        listed = {s["file"] for s in self.progress["shards"]}
        kept = listed | {f["filename"] for f in (self.store.read_json(PREVIOUS) or {}).get("_data_files", [])}
        self.store.remove([n for n in self.store.names(SHARDS) if n not in kept])
        if self.progress["features"] is not None:
            from datasets import Features

            self.features = Features.from_dict(self.progress["features"])
        self.store.write_json(PROGRESS, self.progress)

    def add(self, prompts: list[int], columns: dict[str, Any], group: int | None, dropped: int = 0) -> None:
        """Appends rows (``columns``: name -> array with a row axis first, or ``Sparse1D``) holding ``prompts``."""
        features = features_of(columns, group)
        if self.features is None:
            self.features = features
            self.progress["features"] = features.to_dict()
        elif features != self.features:
            raise ValueError(f"{self.store}: these rows' columns differ from the dataset's: "
                             f"{sorted(set(features) ^ set(self.features)) or 'types or shapes'}")
        table = self._table(columns, group)
        if self._open is None:
            self._start_shard(table.schema)
        self._open["writer"].write_table(table)
        self._open["prompts"].extend(prompts)
        self._open["rows"] += table.num_rows
        self._open["bytes"] += table.nbytes
        self.progress["dropped_tokens"] += dropped
        if (self._open["bytes"] >= self.shard_bytes
                or time.monotonic() - self._open["started"] >= self.shard_seconds):
            self.close_shard()

    def _table(self, columns: dict[str, Any], group: int | None):
        import pyarrow as pa

        schema = self.features.arrow_schema
        arrays, names = [], []
        for name, column in columns.items():
            if isinstance(column, Sparse1D):
                indices, values = sparse_columns(column, group)
                arrays += [indices, values]
                names += [f"{name}.indices", f"{name}.values"]
            else:
                arrays.append(arrow_column(column, schema.field(name).type, len(column)))
                names.append(name)
        return pa.Table.from_arrays(arrays, schema=schema)

    def _start_shard(self, schema) -> None:
        import pyarrow as pa

        number = len(self.progress["shards"])
        name = f"data-{self.progress['run']}-{number:05d}.arrow"
        handle = self._stack.enter_context(self.store.writing(name))
        writer = pa.ipc.new_stream(handle, schema)
        self._open = {"file": name, "writer": writer, "prompts": [], "rows": 0, "bytes": 0,
                      "started": time.monotonic()}

    def close_shard(self) -> None:
        """Finishes the shard being written and lists it (its rows are then kept by a resumed run)."""
        if self._open is None:
            return
        shard, self._open = self._open, None
        shard["writer"].close()
        self._stack.close()
        self.progress["shards"].append({"file": shard["file"], "rows": shard["rows"],
                                        "prompts": sorted(shard["prompts"])})
        self.store.write_json(PROGRESS, self.progress)

    def abandon(self) -> None:
        """Drops the shard being written (its rows are regenerated by a resumed run)."""
        self._open = None
        with contextlib.suppress(BaseException):
            self._stack.__exit__(RuntimeError, RuntimeError("abandoned"), None)

    def finish(self, complete: bool, description: str = "") -> None:
        """Closes the last shard; for a complete run, writes the features and the shard list, which make the
        folder a dataset, and removes an earlier run's shards."""
        self.close_shard()
        if not complete or self.progress is None:
            return
        if self.features is None:  # a run that produced no rows: the folder is still a (empty) dataset
            raise ValueError(f"{self.store}: the run produced no rows for the dataset (no per-token capture point "
                             "was captured); nothing to write")
        listed = [s["file"] for s in self.progress["shards"]]
        self.store.write_json(INFO, {"citation": "", "description": description, "features": self.features.to_dict(),
                                     "homepage": "", "license": ""})
        self.store.write_json(STATE, {"_data_files": [{"filename": f} for f in listed],
                                      "_fingerprint": self.progress["run"], "_format_columns": None,
                                      "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                                      "_split": None})
        self.progress["complete"] = True
        self.store.write_json(PROGRESS, self.progress)
        self.store.remove([n for n in self.store.names(SHARDS) if n not in listed] + [PREVIOUS])
