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
from .control import ControlServer
from .capture import NO_CAPTURE, Capture
from .editing import BatchEdits, Prepared
from .sae import SAE, SaeMonitor
from .events import ActivationEvent, BatchEndEvent, GenerationResult, InterventionEvent, ResultEvent, StepEvent
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

    max_tokens: int = DEFAULTS.max_tokens  # 0: the prompt pass alone, no token chosen (gemmalens harvest)
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
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be a positive integer (0: the prompt pass alone), got "
                              f"{self.max_tokens!r}")
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
    edits: Sequence[Prepared] = (),
    control: ControlServer | None = None,
    saes: Sequence[SAE] = (),
    monitor: SaeMonitor | None = None,
) -> Iterator[StepEvent | ActivationEvent | ResultEvent | BatchEndEvent | InterventionEvent]:
    """Generates for every prompt, ``config.batch_size`` at a time, yielding events in order.

    A prompt's ``index`` seeds its sampling and labels its events; a batch is named by its first prompt's.
    ``edits``: the run's interventions (``editing.prepare``); a batch they touch starts with an
    ``InterventionEvent`` saying which apply to which rows, and another comes whenever ``control`` (live
    control, engine/control.py; it then holds the set in force) changes them, from the step they take effect.
    ``saes`` (engine/sae.py) are encoded where they read at every pass; ``monitor`` gathers their error and L0.
    """
    prompts = list(prompts)
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start:start + config.batch_size]
        if config.max_tokens == 0:
            yield from _prompt_pass(model, tokenizer, batch, config, selection, edits, tuple(saes), monitor)
        else:
            yield from _generate_batch(model, tokenizer, batch, config, selection, edits, control, start == 0,
                                       tuple(saes), monitor)


def layers_needed(names, saes: tuple, edits) -> int | None:
    """How many blocks a forward pass must run for these captured ``names`` when nothing else is wanted of it:
    up to the deepest captured layer; None (all, and the logits) when a point after the blocks, an SAE or an
    edit is involved."""
    if saes or edits:
        return None
    deepest = 0
    for name in names:
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit():
            deepest = max(deepest, int(parts[2]) + 1)
        elif not name.startswith("model.embed_"):
            return None
    return deepest


def _prompt_pass(model, tokenizer, prompts: list[Prompt], config: GenerationConfig, selection: Selection,
                 prepared: Sequence[Prepared], saes: tuple, monitor: SaeMonitor | None):
    """A batch's prompt pass alone (``max_tokens`` 0): its captured values, an empty step, each row's result
    (no token) and the batch's end. The pass stops after the deepest block a capture needs."""
    started = time.perf_counter()
    indices, batch = [p.index for p in prompts], prompts[0].index
    rows = [tokenizer.prompt_ids(p, config.chat) for p in prompts]
    ids, pad = tokenizer.pad_batch(rows)
    width, pads = ids.shape[1], pad.tolist()
    edits = BatchEdits(prepared, prompts, pads, width, model.dtype) if prepared else None
    if edits:
        yield InterventionEvent(batch, 0, edits.records())
    wanted = selection.names_for_step(0)
    step_edits = edits.at(0, np.arange(width)) if edits else None
    cap = Capture(wanted, step_edits, saes, edits.plan if edits else {}) if wanted or step_edits or saes \
        else NO_CAPTURE
    model(ids, pad, None, cap, last_only=True, layers=layers_needed(wanted, saes, step_edits))
    captured, measured = cap.take(), cap.sae_stats
    frames = 0
    live = [True] * len(prompts)
    if captured:
        values = StepValues(captured, host_copier(), CAPTURE_DTYPES.get(config.capture_dtype))
        mx.eval(list(values.buffers.values()))
        for event in _activation_events(values, selection, batch, 0, indices, pads, live, width):
            frames += 1
            yield event
    if monitor is not None and measured:
        monitor.add(measured, np.arange(width)[None, :] >= np.array(pads)[:, None])
    yield StepEvent(batch, 0, [], [], [], frames)
    seconds = time.perf_counter() - started
    for r, prompt in enumerate(prompts):
        yield ResultEvent(_result(tokenizer, config, prompt, tokenizer.format(prompt.text, config.chat), rows[r], [],
                                  "length", started, seconds, started + seconds,
                                  edits.ids_for(prompt.index) if edits else []))
    yield BatchEndEvent(batch, list(indices), 1)


class DecodeStep:
    """One decode step (a token per row) over the fixed-shape caches, compiled once per model and capture set.

    The caches' arrays and write offset go in and come out as the step's
    state, so the compiled graph is pure and serves every batch of the same
    shape; the cache lets go of them for the call, so the step updates them in
    place. Captured values come out with the logits.
    """

    _functions: dict = {}

    def __init__(self, model: Gemma3, cache: Cache, names: frozenset[str], compiled: bool = True,
                 structure: tuple = (), saes: tuple = ()):
        self.cache = cache
        self._slots = mx.arange(cache.capacity)  # its length tells the traced step the capacity
        model.keep_derived()
        key = (id(model), names, compiled, structure, tuple(id(sae) for sae in saes))
        if key not in DecodeStep._functions:
            DecodeStep._functions[key] = _decode_function(model, names, compiled, saes, dict(structure))
            weakref.finalize(model, DecodeStep._functions.pop, key, None)
        self._step = DecodeStep._functions[key]
        self.structure = structure

    def __call__(self, tokens: mx.array, pad: mx.array, edits: dict | None = None) -> tuple[mx.array, dict, dict]:
        """Logits ``[B, V]`` for tokens ``[B, 1]``, the captured values and the SAEs' ``(error, L0)``; ``edits``
        those of each edited site (the same structure at every call)."""
        logits, arrays, offset, values, stats = self._step(*self.cache.take_state(), tokens, pad, self._slots,
                                                           edits or {})
        self.cache.put_state(arrays, offset)
        return logits, values, stats


def _decode_function(model: Gemma3, names: frozenset[str], compiled: bool, saes: tuple, plan: dict):
    kinds = [SlidingCache if model.config.is_sliding(i) else GlobalCache for i in range(model.config.num_hidden_layers)]

    def step(arrays, offset, tokens, pad, slots, edits):
        cache = Cache([kind(*pair) for kind, pair in zip(kinds, arrays)], offset, slots.shape[0])
        cap = Capture(names, edits, saes, plan) if names or edits or saes else NO_CAPTURE
        logits = model(tokens, pad, cache, cap, last_only=True)[:, -1]
        return logits, [(c.keys, c.values) for c in cache.layers], cache.offset, cap.take(), cap.sae_stats

    return mx.compile(step) if compiled else step


def _generate_batch(model, tokenizer, prompts: list[Prompt], config: GenerationConfig, selection: Selection,
                    prepared: Sequence[Prepared], control: ControlServer | None, first: bool, saes: tuple,
                    monitor: SaeMonitor | None):
    started = time.perf_counter()
    indices, batch = [p.index for p in prompts], prompts[0].index
    formatted = [tokenizer.format(p.text, config.chat) for p in prompts]
    rows = [tokenizer.prompt_ids(p, config.chat) for p in prompts]
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
    if control is not None:
        if not first:
            control.wait(batch, 0)
        control.changes(batch, 0)
        prepared = control.current
    editing = _Editing(model, cache, decode_names, config.compiled, prompts, pads, width, saes)
    announced = editing.use(batch, 0, prepared)
    if announced is not None:
        yield announced
    copier = host_copier()
    capture_dtype = CAPTURE_DTYPES.get(config.capture_dtype)
    wanted = selection.names_for_step(0)
    prompt_edits = editing.at(0, width)
    cap = (Capture(wanted, prompt_edits, saes, editing.plan) if wanted or prompt_edits or saes else NO_CAPTURE)
    logits = model(ids, pad, cache, cap, last_only=True)[:, -1]
    captured, measured = cap.take(), cap.sae_stats
    for step in range(config.max_tokens):
        keys = None if config.sampling.temperature == 0 else step_keys(config.seed, indices, step)
        tokens, record = sample(logits, seen, config.sampling, keys)
        captured.update({sample_name(step, n): v[:, None] for n, v in record.items()
                         if sample_name(step, n) in wanted})
        values = StepValues(captured, copier, capture_dtype) if captured else None
        mx.async_eval(*(values.buffers.values() if values else ()), tokens)
        if penalized:
            seen = mx.put_along_axis(seen, tokens[:, None], mx.array(True), axis=-1)
        more = step + 1 < config.max_tokens
        ahead = control is None or not control.sync  # a synchronous controller decides each step first
        if more and ahead:
            # Queue the next step on the device before waiting for this one's tokens: the host's
            # bookkeeping and publishing below overlap with the device's work, and this step's
            # captured values leave the device (in the publisher's threads) while the next one runs.
            if control is not None and (announced := editing.update(batch, step + 1, control)) is not None:
                yield announced
            logits, next_captured, next_measured = editing.decode(tokens[:, None], pad,
                                                                  editing.at(step + 1, width + step))
            mx.async_eval(logits, *next_captured.values(), *next_measured.values())
        chosen = tokens.tolist()
        if step == 0:
            prompt_seconds = time.perf_counter() - started
        live = [finish[r] is None for r in range(B)]
        if monitor is not None and measured:
            slots = np.arange(width) if step == 0 else np.array([width + step - 1])
            monitor.add(measured, (slots[None, :] >= np.array(pads)[:, None]) & np.array(live)[:, None])
        frames = 0
        if values is not None:
            mx.eval(list(values.buffers.values()))  # done already: queued before the tokens just read
            for event in _activation_events(values, selection, batch, step, indices, pads, live, width):
                frames += 1
                yield event
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
                                          finish[r], started, prompt_seconds, finished_at[r],
                                          editing.applied[indices[r]]))
        if all(f is not None for f in finish):
            break
        if more and not ahead:
            control.wait(batch, step + 1)
            if (announced := editing.update(batch, step + 1, control)) is not None:
                yield announced
            logits, next_captured, next_measured = editing.decode(tokens[:, None], pad,
                                                                  editing.at(step + 1, width + step))
        if more:
            wanted = selection.names_for_step(step + 1)
            captured = next_captured if wanted else {}
            measured = next_measured
    yield BatchEndEvent(batch, list(indices), step + 1)


class _Editing:
    """A batch's edits as the set in force changes: its ``BatchEdits``, the decode step for their sites, and the
    ids of every intervention that edited each row (``applied``, by prompt id)."""

    def __init__(self, model: Gemma3, cache: Cache, names: frozenset[str], compiled: bool, prompts, pads, width,
                 saes: tuple):
        self.model, self.cache, self.names, self.compiled, self.saes = model, cache, names, compiled, saes
        self.prompts, self.pads, self.width = prompts, pads, width
        self.applied: dict[int, list[str]] = {p.index: [] for p in prompts}
        self.edits: BatchEdits | None = None
        self.decode: DecodeStep | None = None

    def use(self, batch: int, step: int, prepared: Sequence[Prepared]) -> InterventionEvent | None:
        """Puts ``prepared`` in force from ``step``; the event that says so, when there is something to say."""
        had = bool(self.edits)
        self.edits = BatchEdits(prepared, self.prompts, self.pads, self.width, self.model.dtype)
        structure = self.edits.structure
        if self.decode is None or self.decode.structure != structure:
            self.decode = DecodeStep(self.model, self.cache, self.names, self.compiled, structure, self.saes)
        for index, ids in self.applied.items():
            ids.extend(i for i in self.edits.ids_for(index) if i not in ids)
        if self.edits or had:
            return InterventionEvent(batch, step, self.edits.records())
        return None

    def update(self, batch: int, step: int, control: ControlServer) -> InterventionEvent | None:
        changed = control.changes(batch, step)
        return None if changed is None else self.use(batch, step, changed)

    @property
    def plan(self) -> dict:
        return self.edits.plan if self.edits else {}

    def at(self, step: int, first_slot: int) -> dict | None:
        """The edits of the forward pass of ``step`` (the prompt pass: every slot from 0; else one slot)."""
        if not self.edits:
            return None
        return self.edits.at(step, np.arange(self.width) if step == 0 else np.array([first_slot]))


def _result(tokenizer, config, prompt: Prompt, formatted, prompt_ids, generated, finish, started, prompt_seconds,
            finished, interventions: list[str]):
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
        interventions=interventions,
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
