"""One forward pass for analysis: ``run_with_capture`` returns the logits and the named values, in memory."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from gemmalens.errors import ConfigError
from gemmalens.interventions import parse_all
from gemmalens.prompts import Prompt

from .capture import NO_CAPTURE, Capture
from .editing import BatchEdits, prepare
from .model import Gemma3
from .sae import attach
from .tokenizer import Tokenizer


def as_token_batch(tokenizer: Tokenizer, inputs) -> tuple[mx.array, mx.array]:
    """Token ids ``[B, T]`` and left padding ``[B]`` for a string, strings, ids or rows of ids."""
    if isinstance(inputs, mx.array):
        ids = inputs if inputs.ndim == 2 else inputs[None]
        return ids.astype(mx.int32), mx.zeros((ids.shape[0],), dtype=mx.int32)
    if isinstance(inputs, str):
        inputs = [inputs]
    inputs = list(inputs)
    if inputs and all(isinstance(t, (int, np.integer)) for t in inputs):
        inputs = [inputs]
    rows = [tokenizer.encode(x) if isinstance(x, str) else [int(t) for t in x] for x in inputs]
    if not rows or any(len(r) == 0 for r in rows):
        raise ConfigError("run_with_capture: inputs must be non-empty strings or id lists")
    return tokenizer.pad_batch(rows)


class CapturedValues(dict):
    """Captured values by name, ``[batch, seq, ...]`` in the left-padded layout (attention
    ``[batch, heads, seq, keys]``).

    ``pad[b]`` leading entries of row b are padding; ``tokens`` are the ids fed.
    """

    def __init__(self, values, pad: list[int], tokens: mx.array):
        super().__init__(values)
        self.pad = pad
        self.tokens = tokens


def run_with_capture(model: Gemma3, tokenizer: Tokenizer, inputs, names: Sequence[str] = (), interventions=(),
                     saes=()):
    """One forward pass: logits ``[batch, seq, vocab]`` and the captured ``names`` (a ``CapturedValues``).

    ``interventions`` (gemmalens/interventions.py) edit it as in generation's prompt pass (step 0); their
    ``prompts`` are row numbers here, and captured values at an edited site are the edited ones. ``saes``
    (``load_sae``) add the points ``sae.<name>.features`` and ``sae.<name>.error`` (dense)."""
    ids, pad = as_token_batch(tokenizer, inputs)
    saes = attach(saes, model.config)
    edits, plan = None, None
    if interventions:
        rows = [Prompt(r, "") for r in range(ids.shape[0])]
        batch = BatchEdits(prepare(parse_all(interventions), model.config, saes), rows, pad.tolist(), ids.shape[1],
                           model.dtype)
        edits, plan = (batch.at(0, np.arange(ids.shape[1])), batch.plan) if batch else (None, None)
    cap = Capture(names, edits, saes, plan) if names or edits or saes else NO_CAPTURE
    logits = model(ids, pad, cap=cap)
    values = cap.take()
    mx.eval(logits, values)
    return logits, CapturedValues(values, pad.tolist(), ids)
