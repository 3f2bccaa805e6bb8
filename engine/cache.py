"""Key/value caches of fixed shape: a static buffer for global layers, a ring for sliding ones.

Every cache column holds the key of one *slot*: the index of a token in the
left-padded batch sequence (the same for all rows). A row with ``pad`` leading
pad tokens has its token at position ``slot - pad``; slot arithmetic therefore
equals position arithmetic, and the masks are built from slots.

Shapes never change after creation and the write position is an array, so a
decode step over these caches compiles once (``mx.compile``) and runs for
every step. Unwritten or stale columns are hidden by the mask, which compares
each column's slot with the query's.
"""

from __future__ import annotations

import mlx.core as mx


class GlobalCache:
    """Keeps every key and value: ``[batch, kv_heads, capacity, head_dim]``; column j is slot j."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: mx.Dtype):
        self.keys = mx.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype)
        self.values = mx.zeros_like(self.keys)
        self.capacity = capacity
        self.offset = mx.array(0, mx.int32)  # slots written so far

    @classmethod
    def from_state(cls, keys: mx.array, values: mx.array, offset: mx.array, capacity: int) -> "GlobalCache":
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.offset, cache.capacity = keys, values, offset, capacity
        return cache

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Stores ``[B, kvh, L, D]`` new keys/values; returns the whole buffers and their slots."""
        start = mx.reshape(self.offset, (1,))
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        self.offset = self.offset + keys.shape[2]
        return self.keys, self.values, mx.arange(self.capacity)


class SlidingCache:
    """Keeps the last ``size`` keys in a ring: slot ``s`` lives at column ``s % size``.

    ``size`` is the sliding window, or the run's ``capacity`` (slots in all) when smaller.
    """

    def __init__(self, batch: int, kv_heads: int, window: int, capacity: int, head_dim: int, dtype: mx.Dtype):
        self.size = size = min(window, capacity)
        self.capacity = capacity
        self.keys = mx.zeros((batch, kv_heads, size, head_dim), dtype=dtype)
        self.values = mx.zeros_like(self.keys)
        self.offset = mx.array(0, mx.int32)

    @classmethod
    def from_state(cls, keys: mx.array, values: mx.array, offset: mx.array, capacity: int) -> "SlidingCache":
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.offset, cache.capacity = keys, values, offset, capacity
        cache.size = keys.shape[2]
        return cache

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Stores new keys/values. A multi-token update (the prompt) must come first.

        The prompt attends over its own fresh keys (it may be longer than the
        ring); single-token steps attend over the ring, whose column ``j`` holds
        slot ``offset - ((offset - j) mod size)`` (negative: never written).
        """
        length = keys.shape[2]
        if length > 1:
            kept = min(length, self.size)
            columns = mx.arange(length - kept, length) % self.size
            self.keys[:, :, columns] = keys[:, :, length - kept :]
            self.values[:, :, columns] = values[:, :, length - kept :]
            self.offset = self.offset + length
            return keys, values, mx.arange(length)
        current = self.offset
        column = mx.reshape(current % self.size, (1,))
        self.keys = mx.slice_update(self.keys, keys, column, axes=(2,))
        self.values = mx.slice_update(self.values, values, column, axes=(2,))
        self.offset = current + 1
        slots = current - ((current - mx.arange(self.size)) % self.size)
        return self.keys, self.values, slots
