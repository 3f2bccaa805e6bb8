"""The in-process API: the engine and an npz archiver wired over ``inproc://``."""

from __future__ import annotations

import secrets
import sys
import threading
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import zmq

from gemmalens.engine.control import ControlServer
from gemmalens.engine.editing import prepare
from gemmalens.engine.events import GenerationResult, ResultEvent, StepEvent
from gemmalens.engine.generation import generate
from gemmalens.engine.loading import chat_warning
from gemmalens.engine.model import Gemma3
from gemmalens.engine.publisher import Publisher
from gemmalens.engine.run import WARN_BYTES, Progress, capture_estimate, generation_config, serve
from gemmalens.engine.selection import select
from gemmalens.engine.sae import attach
from gemmalens.engine.tokenizer import Tokenizer
from gemmalens.engine.transfer import dtype_name
from gemmalens.interventions import parse_all
from gemmalens.prompts import Prompt
from gemmalens.sinks.npz import NpzArchiver
from gemmalens.sinks.stats import ProgressView
from gemmalens.spec import RunSpec

DEFAULTS = RunSpec()


def batch_generate(
    model: Gemma3,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | str,
    *,
    max_tokens: int = DEFAULTS.max_tokens,
    temperature: float = DEFAULTS.temperature,
    top_p: float = DEFAULTS.top_p,
    top_k: int | None = DEFAULTS.top_k,
    repetition_penalty: float = DEFAULTS.repetition_penalty,
    seed: int | None = DEFAULTS.seed,
    batch_size: int = DEFAULTS.batch_size,
    chat: bool = DEFAULTS.chat_mode,
    stop: Sequence[str] | None = None,
    save_activations_dir: str | Path | None = None,
    capture: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    layers: str | None = DEFAULTS.layers,
    positions: str = DEFAULTS.positions,
    compress: bool = True,
    progress: bool | None = None,
    interventions: Sequence = (),
    saes: Sequence = (),
    control: str | None = None,
    control_sync: bool = False,
    control_timeout: float = 60.0,
) -> list[GenerationResult]:
    """Generates a continuation for each prompt; returns one result per prompt, in order.

    ``temperature=0`` is greedy. With a ``seed``, each prompt's sampled output
    is independent of the batch size and of its neighbours. With
    ``save_activations_dir``, the points matching ``capture`` (glob patterns;
    default every point) at the chosen ``positions`` ("all", "prompt",
    "generated", "last") are published as frames to an in-process npz
    archiver writing that folder. ``progress`` shows a bar on stderr (default:
    when stderr is a terminal). ``interventions``: edits applied during generation, as dicts of their JSON
    form or the helpers' objects (``gemmalens.steer``...; docs/interventions.md); each result lists the ids
    of those that edited it. ``saes``: attached SAEs (``gemmalens.load_sae`` objects or their sources), whose
    ``sae.<name>.features`` and ``.error`` can be captured and whose feature ops can edit. ``control``: an
    address for a live control socket (``gemmalens.control.Controller`` changes the interventions while this
    runs; ``control_sync`` waits for its go before each forward pass after the first, at most
    ``control_timeout`` seconds; docs/interventions.md).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    records = [Prompt(i, text) for i, text in enumerate(prompts)]
    edits = parse_all(interventions)
    saes = attach(saes, model.config, dtype_name(model.dtype))
    spec = RunSpec(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   repetition_penalty=repetition_penalty, seed=secrets.randbits(31) if seed is None else seed,
                   batch_size=batch_size, chat_mode=chat, stop=tuple(stop or ()),
                   save_activations=save_activations_dir is not None, capture=tuple(capture or ()),
                   exclude=tuple(exclude), layers=layers, positions=positions,
                   interventions=tuple(iv.record() for iv in edits), saes=tuple(sae.source for sae in saes),
                   activations_dir=str(save_activations_dir) if save_activations_dir is not None else None)
    config = generation_config(spec)
    if chat and chat_warning(getattr(model, "source", {})):
        warnings.warn(chat_warning(model.source), stacklevel=2)
    view = ProgressView(live=True) if (sys.stderr.isatty() if progress is None else progress) else None
    server = (ControlServer(control, model.config, prepare(edits, model.config, saes), sync=control_sync,
                            timeout=control_timeout) if control is not None else None)
    try:
        return _run(model, tokenizer, records, spec, config, edits, saes, view, server, compress)
    finally:
        if server is not None:
            server.close()


def _run(model, tokenizer, records, spec: RunSpec, config, edits, saes, view, control, compress: bool
         ) -> list[GenerationResult]:
    """Generates, in this process; with ``spec.activations_dir``, through an in-process npz archiver."""
    save_activations_dir = spec.activations_dir
    if save_activations_dir is None:
        if spec.capture:
            raise ValueError("capture needs save_activations_dir (or use run_with_capture for one forward pass)")
        counter = Progress(len(records), spec.batch_size, spec.max_tokens)
        results = []
        for event in generate(model, tokenizer, records, config, edits=prepare(edits, model.config, saes),
                              control=control, saes=saes):
            counter.add(event)
            if isinstance(event, ResultEvent):
                results.append(event.result)
            if view is not None and isinstance(event, (StepEvent, ResultEvent)):
                view.update(counter.snapshot())
        if view is not None:
            view.close(counter.snapshot())
        return sorted(results, key=lambda r: r.index)
    selection = select(model.config, list(spec.patterns), list(spec.exclude), spec.layers, spec.positions, saes)
    size, line = capture_estimate(model, tokenizer, records, config, selection, saes)
    if size > WARN_BYTES:
        warnings.warn(line, stacklevel=3)
    address = f"inproc://gemmalens-{uuid.uuid4().hex}"
    context = zmq.Context.instance()
    publisher = Publisher(reliable=address, expect=1, context=context)
    archiver = NpzArchiver(address, save_activations_dir, compress=compress, context=context, name="npz")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("complete", archiver.run()), daemon=True)
    thread.start()
    try:
        results, totals = serve(model, tokenizer, spec, records, records, selection, publisher,
                                observe=view.update if view is not None else None, interventions=edits,
                                saes=saes, control=control)
    except BaseException:
        archiver.stop_requested = True  # it waits for a run that will not come, or end
        raise
    finally:
        thread.join()
        if view is not None:
            view.close()
    if not totals["complete"] or not outcome.get("complete"):
        raise RuntimeError(f"the activations in {save_activations_dir} are incomplete: "
                           f"{totals.get('reason') or archiver.shortfall()}")
    return sorted(results, key=lambda r: r.index)
