"""``gemmalens engine``: load the model, generate, publish every event on the bus."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from gemmalens.engine.prompts import DEFAULT_PROMPTS, load_prompts, parse_prompts
from gemmalens.engine.security import CurveServer, check_exposure
from gemmalens.engine.selection import NO_SELECTION, select

from .options import addresses, generation_options, reports_errors, require_pair

EXIT_ON_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def prompt_set(prompts_file, category=None):
    """The run's prompts: a file (or the built-in set), or one category of it."""
    prompts = load_prompts(prompts_file) if prompts_file else parse_prompts(DEFAULT_PROMPTS, "built-in prompts")
    if category is not None:
        prompts = [p for p in prompts if (p.category or "uncategorized") == category]
    return prompts


def my_share(prompts, shard: tuple[int, int], skip_file=None):
    """The prompts this engine generates: its contiguous share of the run, minus finished ones."""
    index, count = shard
    size = -(-len(prompts) // count)
    share = prompts[index * size : (index + 1) * size]
    if skip_file:
        done = set(json.loads(Path(skip_file).read_text()))
        share = [p for p in share if p.index not in done]
    return share


def parse_shard(ctx, param, value):
    try:
        index, count = (int(x) for x in value.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N with 0 <= I < N, e.g. 0/2") from None
    return index, count


@click.command()
@generation_options
@click.option("--prompts-file", type=click.Path(dir_okay=False), default=None, help="Structured prompts JSON.")
@click.option("--category", default=None, help="Generate only this category of the prompts file.")
@click.option("--skip-file", type=click.Path(dir_okay=False), default=None,
              help="JSON list of prompt ids already finished (set by --resume).")
@click.option("--bind", "bind", multiple=True, default=["tcp://127.0.0.1:5555"], show_default=True,
              callback=addresses, help="Reliable endpoint(s) for archival sinks (repeatable).")
@click.option("--lossy-bind", multiple=True, callback=addresses,
              help="Lossy endpoint(s) for live views (repeatable; default: none).")
@click.option("--expect", type=click.IntRange(min=0), default=0, show_default=True,
              help="Wait for this many sinks before publishing.")
@click.option("--sync-timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for them.")
@click.option("--codec", type=click.Choice(["lz4", "lz4+shuffle", "raw"]), default="lz4", show_default=True,
              help="Payload encoding. lz4+shuffle makes decode-step frames no smaller and halves the GPU's "
                   "captured speed (docs/performance.md); it can pay for long prompt passes over a slow network.")
@click.option("--run-id", default=None, help="Run id stamped on every frame.")
@click.option("--save-activations", is_flag=True, help="Capture every point unless --capture narrows it.")
@click.option("--shard", default="0/1", callback=parse_shard, show_default=True,
              help="I/N: this engine generates the I-th of N contiguous shares of the prompts.")
@click.option("--expect-sink", multiple=True, metavar="NAME", help="Also wait for the sink of this name.")
@click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This engine's NAME.key_secret: encrypt and authenticate (CURVE).")
@click.option("--curve-allow", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of the sinks' public NAME.key files to accept.")
@click.option("--insecure", is_flag=True, help="Allow binding beyond loopback without CURVE.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
@reports_errors
def engine(**o):
    """Run the generation engine and publish tokens, activations and results."""
    # MLX comes with these: imported here, the CLI's sink commands start without it (a second less on a CUDA host)
    from gemmalens.engine.generation import GenerationConfig
    from gemmalens.engine.loading import chat_warning, load
    from gemmalens.engine.publisher import Publisher
    from gemmalens.engine.run import capture_estimate, check_prompts, publish_run, run_info
    from gemmalens.engine.sampling import SamplingParams

    stop = {}
    for sig in EXIT_ON_SIGNAL:
        signal.signal(sig, lambda number, frame: stop.setdefault("signal", number))
    curve = CurveServer(o["curve_secret"], o["curve_allow"]) if require_pair(o, "curve_secret", "curve_allow") else None
    check_exposure(list(o["bind"]) + list(o["lossy_bind"]), curve, o["insecure"])
    prompts = prompt_set(o["prompts_file"], o["category"])
    share = my_share(prompts, o["shard"], o["skip_file"])
    model, tokenizer = load(o["model"], dtype=o["dtype"])
    config = GenerationConfig(
        max_tokens=o["max_tokens"],
        sampling=SamplingParams(o["temperature"], o["top_p"], o["top_k"], o["repetition_penalty"]),
        seed=o["seed"], batch_size=o["batch_size"], chat=o["chat_mode"], stop=tuple(o["stop"]),
        capture_dtype=o["wire_dtype"],
    )
    patterns = list(o["capture"]) or (["*"] if o["save_activations"] else [])
    selection = select(model.config, patterns, list(o["exclude"]), o["layers"], o["positions"]) if patterns else NO_SELECTION
    check_prompts(tokenizer, share, config.chat, config.max_tokens, model.config.max_position_embeddings)
    if config.chat and chat_warning(model.source):
        click.echo(chat_warning(model.source), err=True)
    if selection:
        click.echo(capture_estimate(model, tokenizer, share, config, selection)[1], err=True)
    publisher = Publisher(reliable=list(o["bind"]), lossy=list(o["lossy_bind"]) or None, expect=o["expect"],
                          codec=o["codec"], run_id=o["run_id"],
                          sync_timeout=o["sync_timeout"], curve=curve, engine_id=f"{o['shard'][0]}",
                          expect_names=tuple(o["expect_sink"]))
    info = run_info(model, config, selection, prompts, {"engines": o["shard"][1]})
    _, totals = publish_run(model, tokenizer, share, config, selection, publisher, info,
                            should_stop=lambda: "signal" in stop)
    if "signal" in stop:
        sys.exit(EXIT_ON_SIGNAL[stop["signal"]])
    if not totals["complete"]:
        sys.exit(1)
