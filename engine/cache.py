"""Key/value caches: a static buffer for global layers, a ring for sliding ones.

Every cache column holds the key of one *slot*: the index of a token in the
left-padded batch sequence (the same for all rows). A row with ``pad`` leading
pad tokens has its token at position ``slot - pad``; slot arithmetic therefore
equals position arithmetic, and the masks are built from slots.
"""

from __future__ import annotations

import mlx.core as mx


class GlobalCache:
    """Keeps every key and value: ``[batch, kv_heads, capacity, head_dim]``."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: mx.Dtype):
        self.keys = mx.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype)
        self.values = mx.zeros_like(self.keys)
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Stores ``[B, kvh, L, D]`` new keys/values; returns all keys so far and their slots."""
        end = self.offset + keys.shape[2]
        self.keys[:, :, self.offset : end] = keys
        self.values[:, :, self.offset : end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end], mx.arange(end)


class SlidingCache:
    """Keeps the last ``size`` keys in a ring: slot ``s`` lives at column ``s % size``.

    ``size`` is the sliding window, or less when the whole run is shorter.
    """

    def __init__(self, batch: int, kv_heads: int, size: int, head_dim: int, dtype: mx.Dtype):
        self.keys = mx.zeros((batch, kv_heads, size, head_dim), dtype=dtype)
        self.values = mx.zeros_like(self.keys)
        self.size = size
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Stores new keys/values. A multi-token update (the prompt) must come first.

        The prompt attends over its own fresh keys (it may be longer than the
        ring); single-token steps attend over the ring, whose column ``j`` holds
        slot ``offset - ((offset - j) mod size)`` (negative: never written).
        """
        length = keys.shape[2]
        if length > 1:
            if self.offset:
                raise ValueError("SlidingCache takes a multi-token update only as the first one")
            kept = min(length, self.size)
            columns = mx.arange(length - kept, length) % self.size
            self.keys[:, :, columns] = keys[:, :, length - kept :]
            self.values[:, :, columns] = values[:, :, length - kept :]
            self.offset = length
            return keys, values, mx.arange(length)
        column = self.offset % self.size
        self.keys[:, :, column : column + 1] = keys
        self.values[:, :, column : column + 1] = values
        current = self.offset
        self.offset += 1
        slots = current - ((current - mx.arange(self.size)) % self.size)
        return self.keys, self.values, slots
