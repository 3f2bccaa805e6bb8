"""What generation yields, in order, for the publisher to put on the bus (and the in-process API to collect).

Per batch: an ``InterventionEvent`` if interventions edit it; for step 0 (the prompt pass), 1, 2...: the step's
``ActivationEvent`` s, then its ``StepEvent``; a ``ResultEvent`` as each row finishes; a ``BatchEndEvent`` when
all have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .transfer import StepValues


@dataclass
class GenerationResult:
    """One prompt's outcome. ``tokens`` are the generated ids, stop token excluded."""

    index: int
    prompt: str
    formatted_prompt: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    seed: int
    timings: dict[str, float]
    category: str | None = None
    subcategory: str | None = None
    interventions: list[str] = field(default_factory=list)  # ids of the interventions that edited this prompt

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The row of results.json (docs/outputs.md), which the ``result`` message carries as it is."""
        out = {"id": self.index, **asdict(self)}
        out["num_prompt_tokens"] = len(self.prompt_tokens)
        out["num_tokens"] = len(self.tokens)
        return out


@dataclass
class StepEvent:
    """The tokens chosen at ``step`` of ``batch`` for its live rows ``indices`` (prompt ids); ``frames``: the
    activation events of this step, yielded before it."""

    batch: int
    step: int
    indices: list[int]
    tokens: list[int]
    positions: list[int]  # position of each chosen token in its row's sequence
    frames: int = 0


@dataclass
class ActivationEvent:
    """A captured value, still on the device: ``axes`` name its dimensions (``batch`` first, ``seq`` among them).

    Rows are every prompt of the batch; ``live[r]`` is False for a row that had already finished (its values
    are computed but meaningless). Entry i along ``seq`` sits at slot ``slot + i`` of the left-padded sequence:
    position ``slot + i - pads[r]`` of row r (negative: padding). ``host()`` brings the value over (with the
    rest of its step, in one copy).
    """

    batch: int
    step: int
    name: str
    axes: tuple[str, ...]
    indices: list[int]
    pads: list[int]
    live: list[bool]
    slot: int
    values: StepValues
    trim: tuple = ()  # numpy index keeping the entries published

    def host(self) -> tuple[np.ndarray, str]:
        """The array on the host, C-contiguous, and its wire dtype name (bfloat16 as uint16 patterns)."""
        array, dtype = self.values.fetch(self.name)
        return np.ascontiguousarray(array[self.trim]), dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the captured value before trimming (an upper bound of what is published)."""
        return self.values.nbytes(self.name)


@dataclass
class ResultEvent:
    result: GenerationResult


@dataclass
class InterventionEvent:
    """The interventions in force in ``batch`` from ``step`` on: each one's record (gemmalens/interventions.py),
    ``id``, ``digest`` and ``rows`` (the prompt ids it edits)."""

    batch: int
    step: int
    interventions: list[dict[str, Any]]


@dataclass
class BatchEndEvent:
    """Every row of ``batch`` has finished after ``steps`` steps: its activations are complete."""

    batch: int
    indices: list[int]
    steps: int
