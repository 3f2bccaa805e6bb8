"""Capture points: the ``cap(name, x)`` protocol the model calls.

A ``Capture`` records the values of a fixed set of names during one forward
pass; ``NO_CAPTURE`` records nothing and costs nothing. Layouts: everything is
``[batch, seq, ...]`` except attention scores and weights, which are
``[batch, heads, seq, keys]`` with the key axis indexing absolute slots
``0..T-1`` of the (left-padded) sequence, T the cache's capacity (during
generation; the events trim it to the slots written) or the sequence length;
keys a query does not see hold ``-inf`` (scores) or ``0`` (weights). Nothing
here synchronises with the device, so a compiled step can capture.

A ``Capture`` with ``edits`` also edits: at an edited name it returns ``x * keep + put`` (engine/editing.py)
and records that edited value.
"""

from __future__ import annotations

from typing import Iterable

import mlx.core as mx


class Capture:
    """Records the values of ``names`` seen during forward passes, by name."""

    def __init__(self, names: Iterable[str], edits: dict[str, tuple[mx.array, mx.array]] | None = None):
        self.names = frozenset(names)
        self.edits = edits or {}
        self.values: dict[str, mx.array] = {}

    def __call__(self, name: str, x: mx.array) -> mx.array:
        edit = self.edits.get(name)
        if edit is not None:
            keep, put = _last(edit, x.shape[1])
            x = x * keep + put
        if name in self.names:
            self.values[name] = x
        return x

    def heads(self, name: str, x: mx.array) -> mx.array:
        """Records a ``[B, H, L, D]`` value as ``[B, L, H, D]`` (the layout its edits come in)."""
        edit = self.edits.get(name)
        if edit is not None:
            keep, put = (a.transpose(0, 2, 1, 3) for a in _last(edit, x.shape[2]))
            x = x * keep + put
        if name in self.names:
            self.values[name] = x.transpose(0, 2, 1, 3)
        return x

    def wants(self, *names: str) -> bool:
        return any(name in self.names for name in names)

    def attention(self, name: str, x: mx.array, slots: mx.array, total: int) -> None:
        """Records ``[B, H, L, K]`` attention whose column j holds key slot ``slots[j]``, over slots 0..total-1."""
        if name not in self.names:
            return
        K = slots.shape[0]
        columns = mx.arange(total) % K
        valid = slots[columns] == mx.arange(total)
        fill = -mx.inf if name.endswith("scores") else 0.0
        self.values[name] = mx.where(valid, x[..., columns], mx.array(fill, x.dtype))

    def take(self) -> dict[str, mx.array]:
        values, self.values = self.values, {}
        return values


def _last(edit: tuple[mx.array, mx.array], length: int) -> tuple[mx.array, mx.array]:
    """An edit's entries of the last ``length`` positions (the final norm and logits of a pass that computes the
    last position only)."""
    keep, put = edit
    if keep.shape[1] != length:
        keep, put = keep[:, -length:], put[:, -length:]
    return keep, put


class _NoCapture(Capture):
    def __init__(self):
        super().__init__(())

    def __call__(self, name: str, x: mx.array) -> mx.array:
        return x

    def heads(self, name: str, x: mx.array) -> mx.array:
        return x

    def wants(self, *names: str) -> bool:
        return False


NO_CAPTURE = _NoCapture()
