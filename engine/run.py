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

from .errors import ConfigError
from .generation import (ActivationEvent, BatchEndEvent, GenerationConfig, GenerationResult, ResultEvent, StepEvent,
                         generate)
from .model import Gemma3
from .prompts import Prompt
from .publisher import Publisher
from .selection import Selection, estimate_bytes
from .tokenizer import Tokenizer
from .transfer import dtype_name


def run_info(model: Gemma3, config: GenerationConfig, selection: Selection, prompts: Sequence[Prompt],
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``run.start`` body: everything needed to interpret and reproduce the run.

    ``prompts`` is the whole prompt set of the run (every engine of a sharded
    run, finished prompts of a resumed run included); ``extra`` may say how
    many ``engines`` serve it.
    """
    from gemmalens import __version__

    return {
        "model": {**getattr(model, "source", {}), "config": model.config.to_dict(), "dtype": dtype_name(model.dtype)},
        "generation": {**asdict(config), "sampling": asdict(config.sampling),
                       "capture_dtype": config.capture_dtype or dtype_name(model.dtype)},
        "capture": selection.to_dict(),
        "prompts": [p.to_dict() for p in prompts],
        "versions": {"gemmalens": __version__, "mlx": mx.__version__, "python": platform.python_version()},
        "device": str(mx.default_device()),
        "engines": 1,
        **(extra or {}),
    }


class Progress:
    """Counts a run's events into the figures its ``stats`` messages carry (and progress lines show)."""

    def __init__(self, prompts_total: int, batch_size: int, max_tokens: int):
        self.started = time.perf_counter()
        self.values: dict[str, Any] = {"prompts_done": 0, "prompts_total": prompts_total, "tokens": 0, "frames": 0,
                                       "batches_done": 0, "batches_total": -(-prompts_total // batch_size),
                                       "batch": None, "step": 0, "max_tokens": max_tokens}

    def add(self, event) -> None:
        values = self.values
        if isinstance(event, ActivationEvent):
            values["frames"] += 1
        elif isinstance(event, StepEvent):
            values["tokens"] += len(event.tokens)
            values["batch"], values["step"] = event.batch, event.step
        elif isinstance(event, ResultEvent):
            values["prompts_done"] += 1
        elif isinstance(event, BatchEndEvent):
            values["batches_done"] += 1

    def snapshot(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        return {**self.values, "seconds": seconds,
                "tokens_per_second": self.values["tokens"] / seconds if seconds else 0.0}


def check_prompts(tokenizer: Tokenizer, prompts: Sequence[Prompt], chat: bool, max_tokens: int, context: int) -> None:
    """Refuses prompts that cannot be generated: longer than the model's context less ``max_tokens``."""
    room = context - max_tokens
    long = [(p.index, n) for p in prompts if (n := len(tokenizer.encode(p.text, chat))) > room]
    if long:
        listed = ", ".join(f"prompt {i} ({n} tokens)" for i, n in long[:5]) + (" ..." if len(long) > 5 else "")
        raise ConfigError(f"{len(long)} prompt(s) do not fit the model's context of {context} tokens with "
                          f"--max-tokens {max_tokens} (at most {room} prompt tokens): {listed}; shorten them or "
                          "lower --max-tokens")


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
    observe: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[GenerationResult], dict[str, Any]]:
    """Runs generation, publishing as it goes. Returns the results and the ``run.end`` totals.

    ``observe`` also receives every ``stats`` snapshot (the in-process API shows progress with it)."""
    publisher.start(info, should_stop)
    results: list[GenerationResult] = []
    progress = Progress(len(prompts), config.batch_size, config.max_tokens)
    last_stats = progress.started
    stopped = None
    try:
        for event in generate(model, tokenizer, [p.text for p in prompts], config, selection,
                              [p.index for p in prompts]):
            publisher.publish(event)
            progress.add(event)
            if isinstance(event, ResultEvent):
                results.append(event.result)
            elif isinstance(event, StepEvent) and should_stop():
                stopped = "interrupted"
                break
            now = time.perf_counter()
            if now - last_stats >= stats_every:
                last_stats = now
                snapshot = progress.snapshot()
                publisher.stats(snapshot)
                if observe is not None:
                    observe(snapshot)
    except BaseException as error:
        publisher.finish(False, f"failed: {type(error).__name__}: {error}", progress.snapshot())
        raise
    totals = publisher.finish(stopped is None, stopped, progress.snapshot())
    return results, totals


WARN_BYTES = 1 << 30


def capture_estimate(model: Gemma3, tokenizer: Tokenizer, prompts: Sequence[Prompt], config: GenerationConfig,
                     selection: Selection) -> tuple[int, str]:
    """The bytes a capture run writes at most (``estimate_bytes``) and a line saying so; above 1 GiB the line
    warns and says how to narrow the capture."""
    lengths = [len(tokenizer.encode(p.text, config.chat)) for p in prompts]
    size = estimate_bytes(model.config, selection, lengths, config.max_tokens, config.batch_size)
    line = (f"capture: at most {size / 1e9:.2f} GB before compression ({len(selection.model_names)} points, "
            f"{len(prompts)} prompts, up to {config.max_tokens} tokens each)")
    if size > WARN_BYTES:
        line = ("warning: " + line + "; narrow it with --capture PATTERN (e.g. 'model.layers.*.resid_out'), "
                "--layers (e.g. 0-5) or --positions (last, prompt, generated), or lower --max-tokens")
    return size, line
