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

from typing import Iterable, Sequence

import mlx.core as mx


TOP_FEATURES = 5


class Capture:
    """Records the values of ``names`` seen during forward passes, by name. ``edits``: ``{name: (keep, put,
    features)}`` (engine/editing.py); ``saes``: attached SAEs (engine/sae.py), encoded where they read, their
    features and error recorded as ``sae.<name>.features``/``.error`` when selected, their error and L0 always
    kept in ``sae_stats``; ``plan``: ``{name: ((sae name, feature), ...)}``, the feature clamps of ``edits``."""

    def __init__(self, names: Iterable[str], edits: dict | None = None, saes: Sequence = (),
                 plan: dict | None = None):
        self.names = frozenset(names)
        self.edits = edits or {}
        self.plan = plan or {}
        self.saes = {sae.name: sae for sae in saes}
        self.reading = {}  # site -> SAEs that encode it
        self.predicting = {}  # site -> transcoders whose reconstruction is measured there
        for sae in saes:
            self.reading.setdefault(sae.site, []).append(sae)
            if sae.site_out != sae.site:
                self.predicting.setdefault(sae.site_out, []).append(sae)
        self.encoded: dict[str, tuple[mx.array, mx.array]] = {}  # SAE name -> (its input, its features)
        self.values: dict[str, mx.array] = {}
        # SAE name -> (error, L0) [B, L] each, and the top features of each row's last position [B, TOP_FEATURES]
        self.sae_stats: dict[str, tuple[mx.array, ...]] = {}

    def __call__(self, name: str, x: mx.array) -> mx.array:
        edit = self.edits.get(name)
        if edit is not None:
            keep, put = _last(edit[:2], x.shape[1])
            x = x * keep + put
        for sae in self.reading.get(name, ()):
            self._encode(sae, x)
        for sae in self.predicting.get(name, ()):
            inputs, features = self.encoded[sae.name]
            self._measure(sae, x, sae.decode(features, inputs), features)
        if edit is not None:
            for (sae_name, feature), (mask, value) in zip(self.plan.get(name, ()), edit[2]):
                sae = self.saes[sae_name]
                active = self.encoded[sae_name][1][..., feature:feature + 1]
                x = x + (mask * (value - active.astype(x.dtype))) * sae.w_dec[feature].astype(x.dtype)
        if name in self.names:
            self.values[name] = x
        return x

    def _encode(self, sae, x: mx.array) -> None:
        features = sae.encode(x)
        self.encoded[sae.name] = (x, features)
        if f"sae.{sae.name}.features" in self.names:
            self.values[f"sae.{sae.name}.features"] = features
        if sae.site_out == sae.site:
            self._measure(sae, x, sae.decode(features), features)

    def _measure(self, sae, target: mx.array, reconstruction: mx.array, features: mx.array) -> None:
        """The relative reconstruction error ``|x - x_hat|^2 / |x|^2`` and L0, per position."""
        target = target.astype(mx.float32)
        error = ((target - reconstruction.astype(mx.float32)) ** 2).sum(-1) / (target ** 2).sum(-1)
        if f"sae.{sae.name}.error" in self.names:
            self.values[f"sae.{sae.name}.error"] = error
        last = features[:, -1].astype(mx.float32)  # the strongest features of each row's last position
        k = min(TOP_FEATURES, last.shape[-1])
        top = mx.argpartition(-last, kth=k - 1, axis=-1)[:, :k]
        self.sae_stats[sae.name] = (error, (features > 0).sum(-1), top, mx.take_along_axis(last, top, axis=-1))

    def heads(self, name: str, x: mx.array) -> mx.array:
        """Records a ``[B, H, L, D]`` value as ``[B, L, H, D]`` (the layout its edits come in)."""
        edit = self.edits.get(name)
        if edit is not None:
            keep, put = (a.transpose(0, 2, 1, 3) for a in _last(edit[:2], x.shape[2]))
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
