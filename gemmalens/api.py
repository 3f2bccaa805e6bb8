"""The in-process API: the engine and an npz archiver wired over ``inproc://``."""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path
from typing import Sequence

import zmq

from gemmalens.engine.generation import GenerationConfig, GenerationResult, ResultEvent, StepEvent, generate
from gemmalens.engine.model import Gemma3
from gemmalens.engine.prompts import Prompt
from gemmalens.engine.publisher import Publisher
from gemmalens.engine.run import Progress, publish_run, run_info
from gemmalens.engine.sampling import SamplingParams
from gemmalens.engine.selection import select
from gemmalens.engine.tokenizer import Tokenizer
from gemmalens.sinks.npz import NpzArchiver
from gemmalens.sinks.stats import ProgressView


def batch_generate(
    model: Gemma3,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | str,
    *,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_p: float = 0.9,
    top_k: int | None = None,
    repetition_penalty: float = 1.1,
    seed: int | None = None,
    batch_size: int = 4,
    chat: bool = False,
    stop: Sequence[str] | None = None,
    save_activations_dir: str | Path | None = None,
    capture: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    layers: str | None = None,
    positions: str = "all",
    compress: bool = True,
    progress: bool | None = None,
) -> list[GenerationResult]:
    """Generates a continuation for each prompt; returns one result per prompt, in order.

    ``temperature=0`` is greedy. With a ``seed``, each prompt's sampled output
    is independent of the batch size and of its neighbours. With
    ``save_activations_dir``, the points matching ``capture`` (glob patterns;
    default every point) at the chosen ``positions`` ("all", "prompt",
    "generated", "last") are published as frames to an in-process npz
    archiver writing that folder. ``progress`` shows a bar on stderr (default: when stderr is a terminal).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    config = GenerationConfig(
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature, top_p, top_k, repetition_penalty),
        seed=seed,
        batch_size=batch_size,
        chat=chat,
        stop=tuple(stop or ()),
    )
    view = ProgressView(live=True) if (sys.stderr.isatty() if progress is None else progress) else None
    if save_activations_dir is None:
        if capture:
            raise ValueError("capture needs save_activations_dir (or use run_with_capture for one forward pass)")
        counter = Progress(len(prompts), batch_size, max_tokens)
        results = []
        for event in generate(model, tokenizer, prompts, config):
            counter.add(event)
            if isinstance(event, ResultEvent):
                results.append(event.result)
            if view is not None and isinstance(event, (StepEvent, ResultEvent)):
                view.update(counter.snapshot())
        if view is not None:
            view.close(counter.snapshot())
        return sorted(results, key=lambda r: r.index)
    selection = select(model.config, list(capture or ["*"]), list(exclude), layers, positions)
    records = [Prompt(i, text) for i, text in enumerate(prompts)]
    address = f"inproc://gemmalens-{uuid.uuid4().hex}"
    context = zmq.Context.instance()
    publisher = Publisher(reliable=address, expect=1, context=context)
    archiver = NpzArchiver(address, save_activations_dir, compress=compress, context=context, name="npz")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("complete", archiver.run()), daemon=True)
    thread.start()
    try:
        results, totals = publish_run(model, tokenizer, records, config, selection, publisher,
                                      run_info(model, config, selection, records),
                                      observe=view.update if view is not None else None)
    finally:
        thread.join()
        if view is not None:
            view.close()
    if not outcome.get("complete"):
        raise RuntimeError(f"the npz archiver did not receive every frame: {archiver.gaps or archiver.missing()}")
    return sorted(results, key=lambda r: r.index)
