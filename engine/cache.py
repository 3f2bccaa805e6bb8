"""Key/value caches of fixed shape: a static buffer for global layers, a ring for sliding ones.

Every cache column holds the key of one *slot*: the index of a token in the
left-padded batch sequence (the same for all rows). A row with ``pad`` leading
pad tokens has its token at position ``slot - pad``; slot arithmetic therefore
equals position arithmetic, and the masks are built from slots.

Shapes never change after creation and the write position is an array shared
by all layers, so a decode step over these caches compiles once
(``mx.compile``) and runs for every step. Unwritten or stale columns are
hidden by the mask, which compares each column's slot with the query's.
"""

from __future__ import annotations

import mlx.core as mx


class GlobalCache:
    """Keeps every key and value: ``[batch, kv_heads, capacity, head_dim]``; column j is slot j."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: mx.Dtype) -> "GlobalCache":
        keys = mx.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype)
        return cls(keys, mx.zeros_like(keys))

    def slots(self, offset: mx.array, length: int) -> mx.array:
        """The slot of each column attended over once ``length`` tokens are written at ``offset``."""
        return mx.arange(self.keys.shape[2])

    def update(self, keys: mx.array, values: mx.array, offset: mx.array) -> tuple[mx.array, mx.array]:
        """Stores ``[B, kvh, L, D]`` new keys/values at slot ``offset``; returns the whole buffers."""
        start = mx.reshape(offset, (1,))
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values


class SlidingCache:
    """Keeps the last ``size`` keys in a ring: slot ``s`` lives at column ``s % size``.

    ``size`` is the sliding window, or the run's capacity (slots in all) when smaller.
    """

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        self.size = keys.shape[2]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, window: int, capacity: int, head_dim: int,
              dtype: mx.Dtype) -> "SlidingCache":
        keys = mx.zeros((batch, kv_heads, min(window, capacity), head_dim), dtype=dtype)
        return cls(keys, mx.zeros_like(keys))

    def slots(self, offset: mx.array, length: int) -> mx.array:
        """A multi-token update (the prompt, which must come first) attends over its own fresh keys,
        which may outnumber the ring; a single token attends over the ring, whose column ``j`` then
        holds slot ``offset - ((offset - j) mod size)`` (negative: never written)."""
        if length > 1:
            return mx.arange(length)
        return offset - ((offset - mx.arange(self.size)) % self.size)

    def update(self, keys: mx.array, values: mx.array, offset: mx.array) -> tuple[mx.array, mx.array]:
        """Stores new keys/values at slot ``offset``; returns what to attend over (see ``slots``)."""
        length = keys.shape[2]
        if length > 1:
            kept = min(length, self.size)
            columns = mx.arange(length - kept, length) % self.size
            self.keys[:, :, columns] = keys[:, :, length - kept :]
            self.values[:, :, columns] = values[:, :, length - kept :]
            return keys, values
        column = mx.reshape(offset % self.size, (1,))
        self.keys = mx.slice_update(self.keys, keys, column, axes=(2,))
        self.values = mx.slice_update(self.values, values, column, axes=(2,))
        return self.keys, self.values


class Cache:
    """The caches of every layer and the number of slots written so far (one offset for all layers)."""

    def __init__(self, layers: list, offset: mx.array, capacity: int):
        self.layers, self.offset, self.capacity = layers, offset, capacity

    def __getitem__(self, layer: int):
        return self.layers[layer]

    def take_state(self) -> tuple[list[tuple[mx.array, mx.array]], mx.array]:
        """The arrays, handed over: the cache lets go of them so a compiled step can update them in place."""
        state = [(c.keys, c.values) for c in self.layers], self.offset
        for c in self.layers:
            c.keys = c.values = None
        self.offset = None
        return state

    def put_state(self, arrays: list[tuple[mx.array, mx.array]], offset: mx.array) -> None:
        for c, (keys, values) in zip(self.layers, arrays):
            c.keys, c.values = keys, values
        self.offset = offset
