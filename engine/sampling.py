"""Choosing the next token: repetition penalty, temperature, top-k, top-p, in that order.

Each row draws from its own random stream, seeded from the run seed and the
prompt's index, so a prompt's sampled output does not depend on the batch it
is in. One uniform number per row and step picks the token by inverse CDF
over the kept set.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import ConfigError

# Candidates examined before falling back to a full sort for top-p.
_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_p`` 1 and ``top_k`` None disable those filters."""

    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int | None = None
    repetition_penalty: float = 1.1

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")


def row_streams(seed: int, prompt_indices) -> list[np.random.Generator]:
    """One random stream per row, determined by the run seed and the prompt index alone."""
    return [np.random.default_rng([seed, int(index)]) for index in prompt_indices]


def penalize(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """Divides positive and multiplies negative logits of tokens already in the row."""
    if penalty == 1.0:
        return logits
    return mx.where(seen, mx.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(
    logits: mx.array, seen: mx.array, params: SamplingParams, uniforms: np.ndarray | None
) -> tuple[mx.array, dict[str, mx.array]]:
    """Next tokens ``[B]`` from logits ``[B, V]``, and the named values of the decision.

    ``seen`` ``[B, V]`` marks tokens already in each row; ``uniforms`` ``[B]``
    in [0, 1) drive the draw (unused when greedy). The record holds
    ``logits``, ``penalized_logits``, ``scaled_logits``, ``softmax_probs``,
    ``kept`` (bool, the top-k/top-p set), ``token`` and ``token_prob`` (the
    token's probability in ``softmax_probs``).
    """
    logits = logits.astype(mx.float32)
    penalized = penalize(logits, seen, params.repetition_penalty)
    record = {"logits": logits, "penalized_logits": penalized}
    if params.temperature == 0:
        tokens = mx.argmax(penalized, axis=-1).astype(mx.int32)
        probs = mx.softmax(penalized, axis=-1)
        kept = mx.arange(logits.shape[-1])[None] == tokens[:, None]
        record.update(scaled_logits=penalized, softmax_probs=probs, kept=kept)
    else:
        scaled = penalized / params.temperature
        probs = mx.softmax(scaled, axis=-1)
        order, kept_probs = _kept_set(scaled, probs, params)
        cumulative = mx.cumsum(kept_probs, axis=-1)
        target = mx.array(uniforms, dtype=mx.float32)[:, None] * cumulative[:, -1:]
        choice = mx.minimum(mx.sum(cumulative <= target, axis=-1), kept_probs.shape[-1] - 1)
        tokens = mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(mx.int32)
        kept = mx.zeros(logits.shape, dtype=mx.bool_)
        kept = mx.put_along_axis(kept, order, kept_probs > 0, axis=-1)
        record.update(scaled_logits=scaled, softmax_probs=probs, kept=kept)
    record["token"] = tokens
    record["token_prob"] = mx.take_along_axis(probs, tokens[:, None], axis=-1)[:, 0]
    return tokens, record


def _kept_set(scaled: mx.array, probs: mx.array, params: SamplingParams) -> tuple[mx.array, mx.array]:
    """Candidate ids ``[B, M]`` by falling probability and their weights (0 where filtered out).

    Examines the top ``max(top_k, 256)`` candidates; when top-p needs more
    mass than they hold, it sorts the whole vocabulary instead, so the set is
    always exact.
    """
    vocab = scaled.shape[-1]
    filtering_p = params.top_p < 1.0
    if params.top_k is None and not filtering_p:
        return mx.broadcast_to(mx.arange(vocab)[None], scaled.shape), probs
    width = min(vocab, params.top_k if params.top_k is not None else _CANDIDATES)
    while True:
        order, weights = _top(scaled, probs, width, params)
        if not filtering_p or width == vocab or params.top_k == width:
            break
        if bool(mx.all(mx.sum(weights, axis=-1) >= params.top_p).item()):
            break
        width = vocab
    if filtering_p:
        before = mx.cumsum(weights, axis=-1) - weights  # mass of higher-ranked candidates
        weights = mx.where(before < params.top_p, weights, 0.0)
    return order, weights


def _top(scaled, probs, width, params):
    vocab = scaled.shape[-1]
    if width < vocab:
        candidates = mx.argpartition(-scaled, width - 1, axis=-1)[:, :width]
    else:
        candidates = mx.broadcast_to(mx.arange(vocab)[None], scaled.shape)
    values = mx.take_along_axis(scaled, candidates, axis=-1)
    rank = mx.argsort(-values, axis=-1)
    order = mx.take_along_axis(candidates, rank, axis=-1)
    if params.top_k is not None:
        # top-p after top-k works on the distribution renormalised over the top k.
        return order, mx.softmax(mx.take_along_axis(values, rank, axis=-1), axis=-1)
    return order, mx.take_along_axis(probs, order, axis=-1)
