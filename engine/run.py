"""One run on the bus: from a ``RunSpec`` and the sinks that came, generate and publish every event.

``serve`` is what ``gemmalens engine`` and the in-process API execute: wait for the sinks (they say what they
already hold), decide what a resumed run still has to generate, then ``run.start`` (settings, model
identity, prompts), tokens, activation frames, results and periodic stats, and ``run.end`` with the totals,
which the sinks acknowledge. A stop request (SIGINT/SIGTERM in the CLI) ends the run after the current step;
the end message then says the run is incomplete.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import mlx.core as mx

from gemmalens.errors import ConfigError, SinkLost
from gemmalens.interventions import Intervention, parse_all
from gemmalens.prompts import Prompt
from gemmalens.spec import RunSpec

from .control import ControlServer, ControlTimeout
from .editing import Prepared, prepare
from .events import ActivationEvent, BatchEndEvent, GenerationResult, ResultEvent, StepEvent
from .generation import GenerationConfig, generate
from .model import Gemma3
from .publisher import Publisher, Sink, Stopped
from .sae import SAE, SaeMonitor, attach
from .sampling import SamplingParams
from .selection import Selection, estimate_bytes
from .tokenizer import Tokenizer
from .transfer import dtype_name

WARN_BYTES = 1 << 30


def generation_config(spec: RunSpec) -> GenerationConfig:
    """The generation settings of a run (its seed must be resolved already)."""
    return GenerationConfig(
        max_tokens=spec.max_tokens,
        sampling=SamplingParams(spec.temperature, spec.top_p, spec.top_k, spec.repetition_penalty),
        seed=spec.seed, batch_size=spec.batch_size, chat=spec.chat_mode, stop=spec.stop,
        capture_dtype=spec.wire_dtype,
    )


def run_info(model: Gemma3, config: GenerationConfig, selection: Selection, spec: RunSpec,
             prompts: Sequence[Prompt], engines: int = 1, segment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``run.start`` body: everything needed to interpret and reproduce the run.

    ``prompts`` is the whole prompt set of the run (every engine's share, finished prompts of a resumed run
    included); ``segment`` says whether this start resumes an earlier one and which prompts it skips."""
    from gemmalens import __version__

    return {
        "spec": spec.to_dict(),
        "model": {**getattr(model, "source", {}), "config": model.config.to_dict(), "dtype": dtype_name(model.dtype)},
        "generation": {**asdict(config), "sampling": asdict(config.sampling),
                       "capture_dtype": config.capture_dtype or dtype_name(model.dtype)},
        "capture": selection.to_dict(),
        "prompts": [p.to_dict() for p in prompts],
        "versions": {"gemmalens": __version__, "mlx": mx.__version__, "python": platform.python_version()},
        "device": str(mx.default_device()),
        "engines": engines,
        "segment": segment or {"resume": False, "skipped": []},
    }


class Progress:
    """Counts a run's events into the figures its ``stats`` messages carry (and progress lines show)."""

    def __init__(self, prompts_total: int, batch_size: int, max_tokens: int):
        self.started = time.perf_counter()
        self.values: dict[str, Any] = {"prompts_done": 0, "prompts_total": prompts_total, "tokens": 0,
                                       "prompt_tokens": 0, "frames": 0,
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
            values["prompt_tokens"] += len(event.result.prompt_tokens)
        elif isinstance(event, BatchEndEvent):
            values["batches_done"] += 1

    def snapshot(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        return {**self.values, "seconds": seconds,
                "tokens_per_second": self.values["tokens"] / seconds if seconds else 0.0,
                "prompt_tokens_per_second": self.values["prompt_tokens"] / seconds if seconds else 0.0}


def check_prompts(tokenizer: Tokenizer, prompts: Sequence[Prompt], chat: bool, max_tokens: int, context: int) -> None:
    """Refuses prompts that cannot be generated: longer than the model's context less ``max_tokens``."""
    room = context - max_tokens
    long = [(p.index, n) for p in prompts if (n := len(tokenizer.prompt_ids(p, chat))) > room]
    if long:
        listed = ", ".join(f"prompt {i} ({n} tokens)" for i, n in long[:5]) + (" ..." if len(long) > 5 else "")
        raise ConfigError(f"{len(long)} prompt(s) do not fit the model's context of {context} tokens with "
                          f"--max-tokens {max_tokens} (at most {room} prompt tokens): {listed}; shorten them or "
                          "lower --max-tokens")


def capture_estimate(model: Gemma3, tokenizer: Tokenizer, prompts: Sequence[Prompt], config: GenerationConfig,
                     selection: Selection, saes: Sequence[SAE] = ()) -> tuple[int, str]:
    """The bytes a capture run writes at most (``estimate_bytes``) and a line saying so; above 1 GiB the line
    warns and says how to narrow the capture."""
    lengths = [len(tokenizer.prompt_ids(p, config.chat)) for p in prompts]
    size = estimate_bytes(model.config, selection, lengths, config.max_tokens, config.batch_size, saes)
    points = len(selection.model_names) + len(selection.names_for_step(1) - selection.model_names)
    line = (f"capture: at most {size / 1e9:.2f} GB before compression ({points} points, {len(prompts)} prompts, up "
            f"to {config.max_tokens} tokens each)")
    if size > WARN_BYTES:
        line = ("warning: " + line + "; narrow it with --capture PATTERN (e.g. 'model.layers.*.resid_out'), "
                "--layers (e.g. 0-5) or --positions (last, prompt, generated), or lower --max-tokens")
    return size, line


def resume_plan(sinks: Sequence[Sink], spec: RunSpec, resume: bool, run_id: str | None = None
                ) -> tuple[RunSpec, set[int]]:
    """What the sinks' hellos mean for this run: the settings to use (a resumed run's seed comes from the run it
    continues) and the prompts to skip (those every sink holding the earlier run has done).

    A fresh run into a sink that holds an incomplete run is refused (``--resume`` continues it); a resumed run
    with settings that change the outputs, or with no sink holding a run, is refused too. A sink already in this
    run (``run_id``: another engine of it started first) is never taken for an earlier, incomplete run."""
    holding = [s for s in sinks if (s.state or {}).get("run")]
    if not resume:
        unfinished = [s for s in holding if not s.state.get("complete") and s.state["run"] != run_id]
        if unfinished:
            s = unfinished[0]
            raise ConfigError(
                f"sink {s.name} holds an incomplete run in {s.state.get('folder')} ({len(s.state.get('have', []))} "
                "prompt(s) done): continue it with --resume, or clear that folder (or choose another) for a new run")
        return spec, set()
    if not holding:
        raise ConfigError("--resume: no sink holds an earlier run to continue (their folders are empty); run "
                          "without --resume")
    for sink in holding:
        if not sink.state.get("spec"):  # it holds no finished prompt: nothing it has can disagree
            continue
        stored = RunSpec.from_dict(sink.state["spec"], f"sink {sink.name}'s run_config.json")
        if spec.seed is None:
            spec = spec.replace(seed=stored.seed)
        differing = stored.differences(spec)
        if differing:
            raise ConfigError(f"--resume: these settings differ from the run in {sink.state.get('folder')} "
                              f"(sink {sink.name}): {', '.join(differing)}")
    skip = set.intersection(*(set(s.state.get("have", [])) for s in holding))
    return spec, skip


def serve(model: Gemma3, tokenizer: Tokenizer, spec: RunSpec, prompts: Sequence[Prompt], share: Sequence[Prompt],
          selection: Selection, publisher: Publisher, resume: bool = False, engines: int = 1,
          should_stop: Callable[[], bool] = lambda: False,
          observe: Callable[[dict[str, Any]], None] | None = None,
          interventions: Sequence[Intervention] | None = None, control: ControlServer | None = None,
          saes: Sequence[SAE] | None = None) -> tuple[list[GenerationResult], dict[str, Any]]:
    """Waits for the sinks, then generates this engine's ``share`` of ``prompts`` (less what a resumed run has
    done) and publishes it. Returns the results and the ``run.end`` totals (with every sink's acknowledgement).
    ``interventions``: those of ``spec`` as objects (the in-process API's may hold arrays no file has); None:
    read from ``spec``. ``control``: a live control socket, which then holds the set in force. ``saes``: the
    attached SAEs (None: loaded from ``spec.saes``).
    """
    saes = attach(spec.saes if saes is None else saes, model.config, dtype_name(model.dtype))
    edits = prepare(parse_all(spec.interventions) if interventions is None else interventions, model.config, saes)
    if control is not None:
        control.current = list(edits)
    sinks = publisher.wait_for_sinks(should_stop)
    spec, skip = resume_plan(sinks, spec, resume, publisher.run_id)
    config = generation_config(spec)
    todo = [p for p in share if p.index not in skip]
    segment = {"resume": resume, "skipped": sorted(skip)}
    publisher.start(run_info(model, config, selection, spec, prompts, engines, segment))
    return publish_run(model, tokenizer, todo, config, selection, publisher, should_stop, observe=observe,
                       edits=edits, control=control, saes=saes)


def publish_run(
    model: Gemma3,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    selection: Selection,
    publisher: Publisher,
    should_stop: Callable[[], bool] = lambda: False,
    stats_every: float = 1.0,
    observe: Callable[[dict[str, Any]], None] | None = None,
    edits: Sequence[Prepared] = (),
    control: ControlServer | None = None,
    saes: Sequence[SAE] = (),
) -> tuple[list[GenerationResult], dict[str, Any]]:
    """Generates ``prompts`` (with the prepared interventions ``edits``) and publishes every event (after
    ``publisher.start``). Returns the results and the ``run.end`` totals. ``observe`` also receives every
    ``stats`` snapshot (the in-process API shows progress with it). A lost sink ends the run early, incomplete."""
    results: list[GenerationResult] = []
    progress = Progress(len(prompts), config.batch_size, config.max_tokens)
    monitor = SaeMonitor(saes) if saes else None
    last_stats = progress.started
    reason = None
    try:
        try:
            for event in generate(model, tokenizer, prompts, config, selection, edits, control, saes, monitor):
                publisher.publish(event)
                progress.add(event)
                if isinstance(event, ResultEvent):
                    results.append(event.result)
                elif isinstance(event, StepEvent) and should_stop():
                    reason = "interrupted"
                    break
                now = time.perf_counter()
                if now - last_stats >= stats_every:
                    last_stats = now
                    snapshot = {**progress.snapshot(), **({"saes": monitor.summary()} if monitor else {})}
                    publisher.stats(snapshot)
                    if observe is not None:
                        observe(snapshot)
        finally:  # a controller waiting on a pass that will not come is answered now
            if control is not None:
                control.ended()
    except ControlTimeout as error:
        reason = f"stopped: {error}"
    except Stopped:
        reason = "interrupted"
    except SinkLost as error:
        reason = str(error)
    except BaseException as error:
        publisher.finish(False, f"failed: {type(error).__name__}: {error}", progress.snapshot())
        raise
    warnings = monitor.warnings() if monitor else []
    for note in warnings:
        print(f"engine: warning: {note}", file=sys.stderr, flush=True)
    notes = (control.notes if control is not None else []) + warnings
    extra = {**progress.snapshot(), **({"notes": notes} if notes else {}),
             **({"saes": monitor.summary()} if monitor else {})}
    totals = publisher.finish(reason is None, reason, extra)
    return results, totals

