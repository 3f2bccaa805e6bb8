"""One run on the bus: generate for a prompt set and publish every event.

``publish_run`` is what ``gemmalens engine`` and the in-process API execute:
``run.start`` (configuration, model identity, prompts), then tokens,
activation frames, results and periodic stats, then ``run.end`` with totals.
A stop request (SIGINT/SIGTERM in the CLI) ends the run after the current
step; the end message then says the run is incomplete.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import mlx.core as mx

from .generation import ActivationEvent, GenerationConfig, GenerationResult, ResultEvent, StepEvent, generate
from .model import Gemma3
from .prompts import Prompt
from .publisher import Publisher
from .selection import Selection
from .tokenizer import Tokenizer


def run_info(model: Gemma3, config: GenerationConfig, selection: Selection, prompts: Sequence[Prompt],
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``run.start`` body: everything needed to interpret and reproduce the run.

    ``prompts`` is the whole prompt set of the run (every engine of a sharded
    run, finished prompts of a resumed run included); ``extra`` may say how
    many ``engines`` serve it.
    """
    from gemmalens import __version__

    return {
        "model": {**getattr(model, "source", {}), "config": model.config.to_dict(), "dtype": str(model.dtype)},
        "generation": {**asdict(config), "sampling": asdict(config.sampling)},
        "capture": selection.to_dict(),
        "prompts": [p.to_dict() for p in prompts],
        "versions": {"gemmalens": __version__, "mlx": mx.__version__, "python": platform.python_version()},
        "device": str(mx.default_device()),
        "engines": 1,
        **(extra or {}),
    }


def publish_run(
    model: Gemma3,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    selection: Selection,
    publisher: Publisher,
    info: dict[str, Any],
    should_stop: Callable[[], bool] = lambda: False,
    stats_every: float = 1.0,
) -> tuple[list[GenerationResult], dict[str, Any]]:
    """Runs generation, publishing as it goes. Returns the results and the ``run.end`` totals."""
    publisher.start(info, should_stop)
    results: list[GenerationResult] = []
    started = last_stats = time.perf_counter()
    tokens = frames = 0
    stopped = None
    try:
        for event in generate(model, tokenizer, [p.text for p in prompts], config, selection,
                              [p.index for p in prompts]):
            publisher.publish(event)
            if isinstance(event, ActivationEvent):
                frames += 1
            elif isinstance(event, ResultEvent):
                results.append(event.result)
            elif isinstance(event, StepEvent):
                tokens += len(event.tokens)
                if should_stop():
                    stopped = "interrupted"
                    break
            now = time.perf_counter()
            if now - last_stats >= stats_every:
                last_stats = now
                publisher.stats({**_totals(results, prompts, started, tokens), "frames": frames})
    except BaseException as error:
        publisher.finish(False, f"failed: {type(error).__name__}: {error}", _totals(results, prompts, started, tokens))
        raise
    totals = publisher.finish(stopped is None, stopped, _totals(results, prompts, started, tokens))
    return results, totals


def _totals(results, prompts, started, tokens) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {"prompts_done": len(results), "prompts_total": len(prompts), "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds else 0.0}
