"""``gemmalens sink ...`` and ``gemmalens attach``: subscribers as their own processes."""

from __future__ import annotations

import importlib
import signal
import sys

import click

from gemmalens.curve import CurveClient, create_keys
from gemmalens.sinks.base import Subscriber
from gemmalens.sinks.npz import NpzArchiver
from gemmalens.sinks.results import ResultsWriter
from gemmalens.sinks.stats import LiveStats
from gemmalens.spec import DATASET_ROWS
from gemmalens.wire import Limits

from .options import addresses, parent_option, reports_errors, require_pair, watch_parent


class _Stopped(Exception):
    """Ctrl-C or SIGTERM reached the sink."""


def serve(sink: Subscriber, idle_timeout: float | None, managed: bool = False) -> None:
    """Runs a sink to the end of the run, saying every few seconds that it waits for an engine until one starts.
    Ctrl-C or SIGTERM stops it at once, its outputs marked incomplete (exit 130/143). Exits 1 when the run it
    received is incomplete, naming what is missing."""
    received = {}

    def stop(number, frame):
        received["signal"] = number
        raise _Stopped()

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stop)

    def waiting(seconds):
        click.echo(f"{sink.name}: waiting for an engine at {', '.join(sink.addresses)} ({seconds:.0f} s)", err=True)

    try:
        complete = sink.run(idle_timeout=idle_timeout, on_wait=None if managed else waiting)
    except _Stopped:
        sink.abort("sink stopped by a signal")
        if sink.run_info is not None or not managed:
            what = "before any run started" if sink.run_info is None else "in the middle of the run; outputs incomplete"
            click.echo(f"{sink.name}: stopped {what}", err=True)
        sys.exit(128 + received["signal"])
    except Exception as error:
        sink.abort(f"sink failed: {error}")
        raise
    if not complete:
        click.echo(f"{sink.name}: incomplete run: {sink.shortfall()}", err=True)
        sys.exit(1)


def _curve(o) -> CurveClient | None:
    return CurveClient(o["curve_secret"], o["curve_server"]) if require_pair(o, "curve_secret", "curve_server") else None


def common(command):
    command = click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False), default=None,
                           help="This sink's NAME.key_secret (CURVE).")(command)
    command = click.option("--curve-server", type=click.Path(exists=True, dir_okay=False), default=None,
                           help="The engine's public key file: refuse any other engine.")(command)
    command = click.option("--connect", multiple=True, required=True, callback=addresses,
                           help="Engine endpoint(s) to subscribe to (several engines of one run: repeat).")(command)
    command = click.option("--name", default=None,
                           help="Name announced to the engine, which `engine --expect-sink NAME` waits for (default: "
                                "the sink's kind: results, npz, stats; attach: the class name).")(command)
    command = click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                           help="Give up after this many seconds without a message, waiting for a run included "
                                "(default: never).")(command)
    command = click.option("--engine-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
                           metavar="SECONDS",
                           help="An engine that went away mid-run and is not back after this long ends the run, "
                                "incomplete.")(command)
    command = click.option("--max-message-mb", type=click.FloatRange(min=1), default=4096.0, show_default=True,
                           help="Refuse messages (and arrays) larger than this many MB.")(command)
    command = parent_option(command)
    command = click.option("--verbose", is_flag=True, help="Show tracebacks.")(command)
    return command


def common_arguments(o: dict) -> dict:
    """Subscriber arguments from the common options (and the watch on a parent ``gemmalens run``)."""
    watch_parent(o["parent"])
    size = int(o["max_message_mb"] * 1e6)
    return {"curve": _curve(o), "engine_timeout": o["engine_timeout"],
            "limits": Limits(message_bytes=size, array_bytes=size)}


@click.group()
def sink():
    """Run one sink as its own process."""


@sink.command("npz")
@common
@click.option("--activations-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the activations_step_*.npz files and their index.")
@click.option("--no-compress-activations", is_flag=True,
              help="Store the arrays uncompressed (larger files, faster to write and read).")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Processes writing the files, each a share of the steps (default: one per four cores, at most "
                   "four; one below eight cores).")
@reports_errors
def npz_sink(connect, name, idle_timeout, verbose, activations_dir, no_compress_activations, processes, **o):
    """Archive activation frames as activations_step_*.npz files."""
    managed = o["parent"] is not None
    serve(NpzArchiver(list(connect), activations_dir, compress=not no_compress_activations, name=name or "npz",
                      processes=processes, locked=managed, **common_arguments(o)), idle_timeout, managed)


@sink.command("dataset")
@common
@click.option("--dest", required=True, metavar="FOLDER|URL",
              help="Where the dataset goes: a folder, or an fsspec URL (s3://bucket/path, gs://..., memory://...).")
@click.option("--rows", type=click.Choice(DATASET_ROWS), default="token", show_default=True,
              help="One row per token, or one per window of --context tokens (SAELens' cached activations).")
@click.option("--context", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per row with --rows context.")
@click.option("--points", multiple=True, metavar="PATTERN",
              help="Write only the captured points matching this glob (repeatable; default: every per-token one).")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=500.0, show_default=True,
              help="Close a shard (a file of the dataset) once it holds this many MB.")
@reports_errors
def dataset_sink(connect, name, idle_timeout, verbose, dest, rows, context, points, shard_mb, **o):
    """Write captured per-token values as a Hugging Face datasets dataset (load_from_disk; SAELens reads it)."""
    from gemmalens.sinks.dataset import DatasetSink

    managed = o["parent"] is not None
    serve(DatasetSink(list(connect), dest, rows=rows, context_size=context, points=points, shard_mb=shard_mb,
                      name=name or "dataset", locked=managed, **common_arguments(o)), idle_timeout, managed)


@sink.command("results")
@common
@click.option("--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for results.json, results.jsonl, prompt_metadata.json and summary.json.")
@click.option("--echo", is_flag=True, help="Print each result as it arrives.")
@reports_errors
def results_sink(connect, name, idle_timeout, verbose, output_dir, echo, **o):
    """Write results.json, results.jsonl, prompt_metadata.json, summary.json and run_config.json."""
    managed = o["parent"] is not None
    serve(ResultsWriter(list(connect), output_dir, echo=echo, name=name or "results", locked=managed,
                        **common_arguments(o)), idle_timeout, managed)


@sink.command("web")
@common
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Where the page is served (beyond loopback, its URL carries a secret token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Its port (0: any free one).")
@reports_errors
def web_sink(connect, name, idle_timeout, verbose, host, port, **o):
    """Serve a live page of the run: tokens as they come for every row, speed, counters, SAE figures, the latest
    logit lens (connect it to the engine's lossy endpoint)."""
    from gemmalens.sinks.web import LiveWeb

    try:
        live = LiveWeb(list(connect), host=host, port=port, name=name or "web", **common_arguments(o))
    except OSError as error:
        raise click.UsageError(f"--host {host} --port {port}: cannot serve there ({error.strerror})") from None
    click.echo(f"live page: {live.url}", err=True)
    try:
        serve(live, idle_timeout, o["parent"] is not None)
    finally:
        live.close()


@sink.command("stats")
@common
@click.option("--every", type=click.FloatRange(min=0.1), default=5.0, show_default=True, metavar="SECONDS",
              help="Seconds between progress lines when stderr is not a terminal (a terminal gets a live bar).")
@click.option("--watch", multiple=True, type=click.Path(file_okay=False), metavar="FOLDER",
              help="Also show the bytes written into this folder (repeatable).")
@reports_errors
def stats_sink(connect, name, idle_timeout, verbose, every, watch, **o):
    """Show live progress (connect it to the engine's lossy endpoint)."""
    serve(LiveStats(list(connect), name=name or "stats", every=every, folders=watch, **common_arguments(o)),
          idle_timeout, o["parent"] is not None)


def load_subscriber(spec: str) -> type[Subscriber]:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise click.BadParameter(f"{spec!r}: expected module:Class", param_hint="SUBSCRIBER")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise click.BadParameter(f"{spec!r}: {error}", param_hint="SUBSCRIBER") from None
    if not (isinstance(cls, type) and issubclass(cls, Subscriber)):
        raise click.BadParameter(f"{spec!r} is not a gemmalens.sinks.base.Subscriber subclass", param_hint="SUBSCRIBER")
    return cls


@click.command()
@click.argument("subscriber")
@common
@reports_errors
def attach(subscriber, connect, name, idle_timeout, verbose, **o):
    """Run a custom subscriber (module:Class, a Subscriber subclass) against an engine."""
    cls = load_subscriber(subscriber)
    serve(cls(list(connect), name=name or cls.__name__.lower(), **common_arguments(o)), idle_timeout,
          o["parent"] is not None)


@click.command()
@click.argument("name")
@click.option("--dir", "folder", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder to write the two key files into.")
@reports_errors
def keys(name, folder, verbose=False):
    """Create a CURVE key pair: NAME.key (public, to share) and NAME.key_secret (to keep)."""
    public, secret = create_keys(folder, name)
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it private)")
