"""Batched generation with a KV cache, and one forward pass for analysis.

``generate`` yields events (tokens per step, captured activations, finished
results) that the publisher puts on the bus; ``batch_generate`` collects the
results in-process. Step 0 is the prompt pass; step k > 0 feeds the token
chosen at step k - 1.
"""

from __future__ import annotations

import secrets
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .cache import Cache, GlobalCache, SlidingCache
from .capture import NO_CAPTURE, Capture
from .errors import ConfigError
from .model import Gemma3
from .sampling import SamplingParams, sample, step_keys
from .selection import NO_SELECTION, Selection, is_attention
from .tokenizer import Tokenizer
from .transfer import StepValues, host_copier


CAPACITY_STEP = 128
CAPTURE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


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
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["num_prompt_tokens"] = len(self.prompt_tokens)
        out["num_tokens"] = len(self.tokens)
        return out


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 100
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None
    batch_size: int = 4
    chat: bool = False
    stop: tuple[str, ...] = ()
    # Decode steps through mx.compile (the prompt pass stays eager). None: on a GPU only; on the CPU
    # compiling costs seconds once and gained nothing measurable (docs/performance.md).
    compiled: bool | None = None
    # Floating captured values leave the device in this dtype ("float32" or "bfloat16"); None: as computed.
    capture_dtype: str | None = None

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbits(31))
        if self.compiled is None:
            object.__setattr__(self, "compiled", mx.default_device() != mx.cpu)
        if self.capture_dtype not in (None, *CAPTURE_DTYPES):
            raise ConfigError(f"capture dtype must be one of {', '.join(CAPTURE_DTYPES)}, got {self.capture_dtype!r}")


@dataclass
class StepEvent:
    """The tokens chosen at ``step`` of ``batch`` for its live rows ``indices`` (prompt indices)."""

    batch: int
    step: int
    indices: list[int]
    tokens: list[int]
    positions: list[int]  # position of each chosen token in its row's sequence


@dataclass
class ActivationEvent:
    """A captured value, ``[rows, seq, ...]`` (attention ``[rows, heads, seq, keys]``), still on the device.

    Rows are every prompt of the batch, finished ones included. ``host()``
    brings it over (with the rest of its step, in one copy).
    """

    batch: int
    step: int
    name: str
    indices: list[int]
    positions: list[list[int]]  # per row, the sequence position of each seq entry (-1: padding)
    values: StepValues
    pads: list[int]  # per row, leading pad slots (attention's key axis counts them)
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
class BatchEndEvent:
    """Every row of ``batch`` has finished after ``steps`` steps: its activations are complete."""

    batch: int
    indices: list[int]
    steps: int


def generate(
    model: Gemma3,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig,
    selection: Selection = NO_SELECTION,
    indices: Sequence[int] | None = None,
) -> Iterator[StepEvent | ActivationEvent | ResultEvent]:
    """Generates for every prompt, ``config.batch_size`` at a time, yielding events in order.

    ``indices`` are the prompts' ids in the run (default 0..n-1); they seed
    sampling and label every event. A batch is named by its first prompt id.
    """
    indices = list(range(len(prompts))) if indices is None else list(indices)
    for start in range(0, len(prompts), config.batch_size):
        chunk = slice(start, start + config.batch_size)
        yield from _generate_batch(
            model, tokenizer, list(prompts[chunk]), indices[chunk], config, selection, indices[start]
        )


class DecodeStep:
    """One decode step (a token per row) over the fixed-shape caches, compiled once per model and capture set.

    The caches' arrays and write offset go in and come out as the step's
    state, so the compiled graph is pure and serves every batch of the same
    shape; the cache lets go of them for the call, so the step updates them in
    place. Captured values come out with the logits.
    """

    _functions: dict = {}

    def __init__(self, model: Gemma3, cache: Cache, names: frozenset[str], compiled: bool = True):
        self.cache = cache
        self._slots = mx.arange(cache.capacity)  # its length tells the traced step the capacity
        model.keep_derived()
        key = (id(model), names, compiled)
        if key not in DecodeStep._functions:
            DecodeStep._functions[key] = _decode_function(model, names, compiled)
            weakref.finalize(model, DecodeStep._functions.pop, key, None)
        self._step = DecodeStep._functions[key]

    def __call__(self, tokens: mx.array, pad: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
        """Logits ``[B, V]`` for tokens ``[B, 1]``, and the captured values."""
        logits, arrays, offset, values = self._step(*self.cache.take_state(), tokens, pad, self._slots)
        self.cache.put_state(arrays, offset)
        return logits, values


def _decode_function(model: Gemma3, names: frozenset[str], compiled: bool):
    kinds = [SlidingCache if model.config.is_sliding(i) else GlobalCache for i in range(model.config.num_hidden_layers)]

    def step(arrays, offset, tokens, pad, slots):
        cache = Cache([kind(*pair) for kind, pair in zip(kinds, arrays)], offset, slots.shape[0])
        cap = Capture(names) if names else NO_CAPTURE
        logits = model(tokens, pad, cache, cap, last_only=True)[:, -1]
        return logits, [(c.keys, c.values) for c in cache.layers], cache.offset, cap.take()

    return mx.compile(step) if compiled else step


def _generate_batch(model, tokenizer, prompts, indices, config: GenerationConfig, selection: Selection, batch: int):
    started = time.perf_counter()
    formatted = [tokenizer.format(p, config.chat) for p in prompts]
    rows = [tokenizer.encode(p, config.chat) for p in prompts]
    ids, pad = tokenizer.pad_batch(rows)
    B, width = ids.shape
    vocab = model.config.vocab_size
    # Capacity rounded up to a multiple of 128: batches of similar lengths share one compiled decode step.
    cache = model.make_cache(B, -(-(width + config.max_tokens) // CAPACITY_STEP) * CAPACITY_STEP)
    penalized = config.sampling.repetition_penalty != 1.0
    seen = np.zeros((B, vocab if penalized else 1), dtype=bool)  # tokens in each row: only a penalty reads them
    for r, row in enumerate(rows if penalized else ()):
        seen[r, [t for t in row if t < vocab]] = True
    seen = mx.array(seen)
    pads = pad.tolist()

    generated: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * B
    prompt_seconds = 0.0
    decode_names = frozenset(n for n in selection.names_for_step(1) if not n.startswith("generate."))
    decode = DecodeStep(model, cache, decode_names, config.compiled)
    copier = host_copier()
    capture_dtype = CAPTURE_DTYPES.get(config.capture_dtype)
    wanted = selection.names_for_step(0)
    cap = Capture(wanted) if wanted else NO_CAPTURE
    logits = model(ids, pad, cache, cap, last_only=True)[:, -1]
    captured = cap.take()
    for step in range(config.max_tokens):
        keys = None if config.sampling.temperature == 0 else step_keys(config.seed, indices, step)
        tokens, record = sample(logits, seen, config.sampling, keys)
        captured.update({f"generate.step_{step}.sample.{n}": v[:, None] for n, v in record.items()
                         if f"generate.step_{step}.sample.{n}" in wanted})
        values = StepValues(captured, copier, capture_dtype) if captured else None
        mx.async_eval(*(values.buffers.values() if values else ()), tokens)
        if penalized:
            seen = mx.put_along_axis(seen, tokens[:, None], mx.array(True), axis=-1)
        if step + 1 < config.max_tokens:
            # Queue the next step on the device before waiting for this one's tokens: the host's
            # bookkeeping and publishing below overlap with the device's work, and this step's
            # captured values leave the device (in the publisher's threads) while the next one runs.
            logits, next_captured = decode(tokens[:, None], pad)
            mx.async_eval(logits, *next_captured.values())
        chosen = tokens.tolist()
        if step == 0:
            prompt_seconds = time.perf_counter() - started
        if values is not None:
            mx.eval(list(values.buffers.values()))  # done already: queued before the tokens just read
            yield from _activation_events(values, batch, step, indices, pads, width, selection.positions)
        if step + 1 < config.max_tokens:
            wanted = selection.names_for_step(step + 1)
            captured = next_captured if wanted else {}
        live = [r for r in range(B) if finish[r] is None]
        yield StepEvent(batch, step, [indices[r] for r in live], [chosen[r] for r in live],
                        [width - pads[r] + step for r in live])
        for r in live:
            if chosen[r] in tokenizer.stop_ids:
                finish[r] = "stop"
            else:
                generated[r].append(chosen[r])
                if config.stop and _hit_stop(tokenizer.decode(generated[r]), config.stop):
                    finish[r] = "stop"
            if finish[r] is None and step == config.max_tokens - 1:
                finish[r] = "length"
            if finish[r] is not None:
                yield ResultEvent(_result(tokenizer, config, indices[r], prompts[r], formatted[r], rows[r],
                                          generated[r], finish[r], started, prompt_seconds))
        if all(f is not None for f in finish):
            break
    yield BatchEndEvent(batch, list(indices), step + 1)


def _result(tokenizer, config, index, prompt, formatted, prompt_ids, generated, finish, started, prompt_seconds):
    text = tokenizer.decode(generated)
    if config.stop:
        text = _cut_at_stop(text, config.stop)
    elapsed = time.perf_counter() - started
    return GenerationResult(
        index=index,
        prompt=prompt,
        formatted_prompt=formatted,
        prompt_tokens=prompt_ids,
        tokens=generated,
        text=text,
        finish_reason=finish,
        seed=config.seed,
        timings={
            "prompt_seconds": prompt_seconds,
            "generation_seconds": elapsed - prompt_seconds,
            "tokens_per_second": len(generated) / (elapsed - prompt_seconds) if elapsed > prompt_seconds else 0.0,
        },
    )


def _activation_events(values: StepValues, batch, step, indices, pads, width, positions_kept):
    """Events for one step's captured values; slot arithmetic turns the seq axis into positions.

    The step's events share their prompt, pad and position lists (read-only): building them once per step
    keeps the engine thread's share of publishing small."""
    indices, pads = list(indices), list(pads)
    positions_of: dict[tuple[int, int], list[list[int]]] = {}
    for name in values.layout:
        shape = list(values.shape(name))
        index = [slice(None)] * len(shape)  # what of the captured array is published, axis by axis
        seq_axis = 2 if is_attention(name) else 1
        if seq_axis == 2:
            shape[3] = width + step  # the key slots written so far
            index[3] = slice(0, shape[3])
        if name.startswith("generate."):
            first = width + step  # the position of the token being chosen
        else:
            if positions_kept == "last" and step == 0:
                index[seq_axis] = slice(shape[seq_axis] - 1, None)
                shape[seq_axis] = 1
            first = width + step - shape[seq_axis]  # slot of the first entry along seq
        length = shape[seq_axis]
        if (first, length) not in positions_of:
            positions_of[first, length] = [[slot - p if slot >= p else -1 for slot in range(first, first + length)]
                                           for p in pads]
        yield ActivationEvent(batch, step, name, indices, positions_of[first, length], values, pads, tuple(index))


def _hit_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s in text for s in stops)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


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


class Activations(dict):
    """Captured values by name, ``[batch, seq, ...]`` in the left-padded layout.

    ``pad[b]`` leading entries of row b are padding; ``tokens`` are the ids fed.
    """

    def __init__(self, values, pad: list[int], tokens: mx.array):
        super().__init__(values)
        self.pad = pad
        self.tokens = tokens


def run_with_capture(model: Gemma3, tokenizer: Tokenizer, inputs, names: Sequence[str] = ()):
    """One forward pass: logits ``[batch, seq, vocab]`` and the captured ``names``."""
    ids, pad = as_token_batch(tokenizer, inputs)
    cap = Capture(names) if names else NO_CAPTURE
    logits = model(ids, pad, cap=cap)
    values = cap.take()
    mx.eval(logits, values)
    return logits, Activations(values, pad.tolist(), ids)
