"""``gemmalens engine``: load the model, generate, publish every event on the bus, and wait for the sinks' word."""

from __future__ import annotations

import signal
import sys

import click

from gemmalens.corpus import corpus_prompts
from gemmalens.curve import CurveServer, check_exposure
from gemmalens.prompts import DEFAULT_PROMPTS, load_prompts, parse_prompts
from gemmalens.spec import RunSpec

from .options import (addresses, control_options, generation_options, parent_option, reports_errors, require_pair,
                      spec_from, watch_parent)

EXIT_ON_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def prompt_set(prompts_file, category=None, corpus=None):
    """The run's prompts: a file (or the built-in set), or one category of it; or a packed corpus's windows."""
    if corpus:
        return corpus_prompts(corpus)
    prompts = load_prompts(prompts_file) if prompts_file else parse_prompts(DEFAULT_PROMPTS, "built-in prompts")
    if category is not None:
        prompts = [p for p in prompts if (p.category or "uncategorized") == category]
    return prompts


def my_share(prompts, shard: tuple[int, int]):
    """The prompts this engine generates: its contiguous share of the run."""
    index, count = shard
    size = -(-len(prompts) // count)
    return prompts[index * size : (index + 1) * size]


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
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False), default=None, hidden=True,
              help="The run's settings as a run_config.json (what `gemmalens run` passes; the options above are "
                   "then ignored).")
@click.option("--category", default=None, help="Generate only this category of the prompts file.")
@click.option("--resume", is_flag=True,
              help="Continue the run the sinks hold: generate only the prompts not every one of them has.")
@click.option("--bind", "bind", multiple=True, default=["tcp://127.0.0.1:5555"], show_default=True,
              callback=addresses, help="Reliable endpoint(s) for archival sinks (repeatable).")
@click.option("--lossy-bind", multiple=True, callback=addresses,
              help="Lossy endpoint(s) for live views (repeatable; default: none).")
@click.option("--expect", type=click.IntRange(min=0), default=0, show_default=True,
              help="Wait for this many sinks before publishing.")
@click.option("--expect-sink", multiple=True, metavar="NAME",
              help="Wait for the sink of this name (repeatable); name each sink you start: a run never waits "
                   "for one it was not told of.")
@click.option("--sync-timeout", type=click.FloatRange(min=0), default=300.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the expected sinks.")
@click.option("--sink-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True, metavar="SECONDS",
              help="A sink silent this long while the engine waits on it is lost; the run ends incomplete.")
@click.option("--run-id", default=None, help="Run id stamped on every message (default: random).")
@click.option("--shard", default="0/1", callback=parse_shard, show_default=True,
              help="I/N: this engine generates the I-th of N contiguous shares of the prompts.")
@click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This engine's NAME.key_secret: encrypt and authenticate (CURVE).")
@click.option("--curve-allow", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of the sinks' public NAME.key files to accept.")
@click.option("--insecure", is_flag=True, help="Allow binding beyond loopback without CURVE.")
@control_options
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
@parent_option
@reports_errors
def engine(**o):
    """Run the generation engine and publish tokens, activations and results."""
    # MLX comes with these: imported here, the CLI's sink commands start without it
    from gemmalens.engine.control import ControlServer
    from gemmalens.engine.loading import chat_warning, load
    from gemmalens.engine.publisher import Publisher
    from gemmalens.engine.run import capture_estimate, check_prompts, generation_config, serve
    from gemmalens.engine.sae import attach
    from gemmalens.engine.transfer import dtype_name
    from gemmalens.engine.selection import NO_SELECTION, select

    stop = {}
    for sig in EXIT_ON_SIGNAL:
        signal.signal(sig, lambda number, frame: stop.setdefault("signal", number))
    watch_parent(o["parent"])
    spec = RunSpec.read_file(o["spec_file"]) if o["spec_file"] else spec_from(o, category=o["category"])
    curve = CurveServer(o["curve_secret"], o["curve_allow"]) if require_pair(o, "curve_secret", "curve_allow") else None
    check_exposure(list(o["bind"]) + list(o["lossy_bind"]) + ([o["control"]] if o["control"] else []), curve,
                   o["insecure"])
    prompts = prompt_set(spec.prompts_file, spec.category, spec.corpus)
    share = my_share(prompts, o["shard"])
    # Bound first: a busy address fails at once, and sinks connect while the model loads.
    publisher = Publisher(reliable=list(o["bind"]), lossy=list(o["lossy_bind"]) or None, expect=o["expect"],
                          codec=spec.codec, run_id=o["run_id"], sync_timeout=o["sync_timeout"], curve=curve,
                          engine_id=f"{o['shard'][0]}", expect_names=tuple(o["expect_sink"]),
                          sink_timeout=o["sink_timeout"])
    try:
        model, tokenizer = load(spec.model, dtype=spec.dtype)
        saes = attach(spec.saes, model.config, dtype_name(model.dtype))
        selection = (select(model.config, list(spec.patterns), list(spec.exclude), spec.layers, spec.positions, saes)
                     if spec.patterns else NO_SELECTION)
        config = generation_config(spec)
        check_prompts(tokenizer, share, config.chat, config.max_tokens, model.config.max_position_embeddings)
    except BaseException:
        publisher.close()
        raise
    control = None
    if o["control"]:
        try:
            control = ControlServer(o["control"], model.config, sync=o["control_sync"], timeout=o["control_timeout"],
                                    on_timeout=o["control_on_timeout"], curve=curve,
                                    should_stop=lambda: "signal" in stop)
        except BaseException:
            publisher.close()
            raise
    if config.chat and chat_warning(model.source):
        click.echo(chat_warning(model.source), err=True)
    if selection:
        click.echo(capture_estimate(model, tokenizer, share, config, selection, saes)[1], err=True)
    try:
        _, totals = serve(model, tokenizer, spec, prompts, share, selection, publisher, resume=o["resume"],
                          engines=o["shard"][1], should_stop=lambda: "signal" in stop, control=control,
                          saes=saes)
    finally:
        if control is not None:
            control.close()
    if "signal" in stop:
        click.echo(f"engine: stopped; {totals['prompts_done']} prompt(s) finished and kept; continue with --resume",
                   err=True)
        sys.exit(EXIT_ON_SIGNAL[stop["signal"]])
    if not totals["complete"]:
        click.echo(f"engine: the run is INCOMPLETE: {totals['reason']}", err=True)
        sys.exit(1)
    click.echo(f"engine: complete: {totals['prompts_done']} prompt(s), {totals['tokens']} token(s); everything "
               f"acknowledged by {', '.join(sorted(totals['sinks'])) or 'no reliable sink'}", err=True)
