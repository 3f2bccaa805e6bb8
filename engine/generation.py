"""Batched generation with a KV cache: ``generate`` yields the events of engine/events.py, in order.

Step 0 is the prompt pass; step k > 0 feeds the token chosen at step k - 1.
"""

from __future__ import annotations

import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from gemmalens.errors import ConfigError
from gemmalens.prompts import Prompt
from gemmalens.spec import RunSpec

from .cache import Cache, GlobalCache, SlidingCache
from .capture import NO_CAPTURE, Capture
from .events import ActivationEvent, BatchEndEvent, GenerationResult, ResultEvent, StepEvent
from .model import Gemma3
from .sampling import SamplingParams, sample, step_keys
from .selection import NO_SELECTION, Selection, sample_name
from .tokenizer import Tokenizer
from .transfer import StepValues, host_copier

DEFAULTS = RunSpec()
CAPACITY_STEP = 128
CAPTURE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate (the engine's side of a ``RunSpec``; defaults are its)."""

    max_tokens: int = DEFAULTS.max_tokens
    sampling: SamplingParams = SamplingParams()
    seed: int | None = DEFAULTS.seed
    batch_size: int = DEFAULTS.batch_size
    chat: bool = DEFAULTS.chat_mode
    stop: tuple[str, ...] = DEFAULTS.stop
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


def generate(
    model: Gemma3,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    selection: Selection = NO_SELECTION,
) -> Iterator[StepEvent | ActivationEvent | ResultEvent | BatchEndEvent]:
    """Generates for every prompt, ``config.batch_size`` at a time, yielding events in order.

    A prompt's ``index`` seeds its sampling and labels its events; a batch is named by its first prompt's.
    """
    prompts = list(prompts)
    for start in range(0, len(prompts), config.batch_size):
        yield from _generate_batch(model, tokenizer, prompts[start:start + config.batch_size], config, selection)


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


def _generate_batch(model, tokenizer, prompts: list[Prompt], config: GenerationConfig, selection: Selection):
    started = time.perf_counter()
    indices, batch = [p.index for p in prompts], prompts[0].index
    formatted = [tokenizer.format(p.text, config.chat) for p in prompts]
    rows = [tokenizer.encode(p.text, config.chat) for p in prompts]
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
    finished_at = [0.0] * B
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
        captured.update({sample_name(step, n): v[:, None] for n, v in record.items()
                         if sample_name(step, n) in wanted})
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
        live = [finish[r] is None for r in range(B)]
        frames = 0
        if values is not None:
            mx.eval(list(values.buffers.values()))  # done already: queued before the tokens just read
            for event in _activation_events(values, selection, batch, step, indices, pads, live, width):
                frames += 1
                yield event
        if step + 1 < config.max_tokens:
            wanted = selection.names_for_step(step + 1)
            captured = next_captured if wanted else {}
        rows_live = [r for r in range(B) if live[r]]
        yield StepEvent(batch, step, [indices[r] for r in rows_live], [chosen[r] for r in rows_live],
                        [width - pads[r] + step for r in rows_live], frames)
        for r in rows_live:
            if chosen[r] in tokenizer.stop_ids:
                finish[r] = "stop"
            else:
                generated[r].append(chosen[r])
                if config.stop and _hit_stop(tokenizer.decode(generated[r]), config.stop):
                    finish[r] = "stop"
            if finish[r] is None and step == config.max_tokens - 1:
                finish[r] = "length"
            if finish[r] is not None:
                finished_at[r] = time.perf_counter()
                yield ResultEvent(_result(tokenizer, config, prompts[r], formatted[r], rows[r], generated[r],
                                          finish[r], started, prompt_seconds, finished_at[r]))
        if all(f is not None for f in finish):
            break
    yield BatchEndEvent(batch, list(indices), step + 1)


def _result(tokenizer, config, prompt: Prompt, formatted, prompt_ids, generated, finish, started, prompt_seconds,
            finished):
    """A row's result. Its speed is its own: its generated tokens over the time from its first token (the end
    of its batch's prompt pass) to its last (rows of a batch decode together, one token per row per step)."""
    text = tokenizer.decode(generated)
    if config.stop:
        text = _cut_at_stop(text, config.stop)
    decoding = finished - started - prompt_seconds
    return GenerationResult(
        index=prompt.index,
        prompt=prompt.text,
        formatted_prompt=formatted,
        prompt_tokens=prompt_ids,
        tokens=generated,
        text=text,
        finish_reason=finish,
        seed=config.seed,
        timings={"prompt_seconds": prompt_seconds, "generation_seconds": decoding,
                 "tokens_per_second": len(generated) / decoding if decoding > 0 else 0.0},
        category=prompt.category,
        subcategory=prompt.subcategory,
    )


def _activation_events(values: StepValues, selection: Selection, batch, step, indices, pads, live, width):
    """Events for one step's captured values. The step's events share their row lists (read-only): the
    publisher encodes them once per step."""
    indices, pads = list(indices), list(pads)
    for name in values.layout:
        axes = selection.axes_of(name)
        shape = list(values.shape(name))
        index = [slice(None)] * len(shape)  # what of the captured array is published, axis by axis
        seq_axis = axes.index("seq")
        if "keys" in axes:
            keys_axis = axes.index("keys")
            index[keys_axis] = slice(0, width + step)  # the key slots written so far
        if name.startswith("generate."):
            slot = width + step  # the slot of the token being chosen
        else:
            if selection.positions == "last" and step == 0:
                index[seq_axis] = slice(shape[seq_axis] - 1, None)
                shape[seq_axis] = 1
            slot = width + step - shape[seq_axis]  # slot of the first entry along seq
        yield ActivationEvent(batch, step, name, axes, indices, pads, live, slot, values, tuple(index))


def _hit_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s in text for s in stops)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text
