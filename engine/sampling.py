"""Choosing the next token: repetition penalty, temperature, top-k, top-p, in that order.

Sampling is Gumbel-max over the kept set: the token is the argmax of
``scaled_logit + g`` where the noise ``g`` of a token is a hash of (row key,
step, token id). A row's key comes from the run seed and the prompt's index,
so a prompt's sampled output does not depend on its batch or neighbours, and
because the noise is tied to token ids, not to ranks, tiny numeric changes
(another batch shape) do not reorder the draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from gemmalens.errors import ConfigError
from gemmalens.spec import RunSpec

DEFAULTS = RunSpec()

# The values of each step's decision, captured as generate.step_{k}.sample.<name>: (name, shape, meaning).
POINTS = (
    ("logits", "B,1,V", "float32 logits the step samples from"),
    ("penalized_logits", "B,1,V", "after the repetition penalty"),
    ("scaled_logits", "B,1,V", "after temperature"),
    ("softmax_probs", "B,1,V", "softmax of the scaled logits"),
    ("kept", "B,1,V", "bool: the top-k / top-p set the token is drawn from"),
    ("token", "B,1", "the chosen token id"),
    ("token_prob", "B,1", "the chosen token's probability in softmax_probs"),
)

# Candidates examined before falling back to a full sort for top-p.
_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_p`` 1 and ``top_k`` None disable those filters."""

    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int | None = DEFAULTS.top_k
    repetition_penalty: float = DEFAULTS.repetition_penalty

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")


def step_keys(seed: int, prompt_indices, step: int) -> np.ndarray:
    """``[B, 2]`` uint32 keys for one step, determined by the run seed, prompt index and step alone."""
    return np.stack([np.random.SeedSequence([seed, int(i), step]).generate_state(2) for i in prompt_indices])


def gumbel_noise(keys: mx.array, ids: mx.array) -> mx.array:
    """Gumbel(0, 1) noise ``[B, M]`` for token ``ids`` ``[B, M]`` under row ``keys`` ``[B, 2]`` (a hash, no state)."""
    x = ids.astype(mx.uint32) * mx.array(0x9E3779B1, mx.uint32) ^ keys[:, :1]
    for round_key in (keys[:, 1:], keys[:, :1]):
        x = x ^ (x >> 16)
        x = x * mx.array(0x85EBCA6B, mx.uint32)
        x = x ^ (x >> 13)
        x = x * mx.array(0xC2B2AE35, mx.uint32)
        x = x ^ (x >> 16) ^ round_key
    uniform = ((x >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -mx.log(-mx.log(uniform))


def penalize(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """Divides positive and multiplies negative logits of tokens already in the row."""
    if penalty == 1.0:
        return logits
    return mx.where(seen, mx.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(
    logits: mx.array, seen: mx.array, params: SamplingParams, keys: np.ndarray | None
) -> tuple[mx.array, dict[str, mx.array]]:
    """Next tokens ``[B]`` from logits ``[B, V]``, and the named values of the decision.

    ``seen`` ``[B, V]`` marks tokens already in each row; ``keys`` ``[B, 2]``
    (``step_keys``) drive the draw (unused when greedy). The record holds
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
        perturbed = mx.take_along_axis(scaled, order, axis=-1) + gumbel_noise(mx.array(keys, mx.uint32), order)
        choice = mx.argmax(mx.where(kept_probs > 0, perturbed, -mx.inf), axis=-1)
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
