"""Options shared by ``run`` and ``engine`` (defaults from ``RunSpec``), and the way every command reports errors."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import click

from gemmalens.errors import AddressError, ConfigError, GemmalensError, PromptFileError, SelectionError
from gemmalens.spec import CODECS, POSITIONS, WIRE_DTYPES, RunSpec
from gemmalens.wire import check_address

USAGE_ERRORS = (PromptFileError, ConfigError, SelectionError)
DEFAULTS = RunSpec()
# The RunSpec fields the generation options set (the rest come from other options of each command).
SPEC_OPTIONS = ("model", "dtype", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                "batch_size", "chat_mode", "stop", "capture", "exclude", "layers", "positions", "wire_dtype",
                "save_activations", "prompts_file", "codec", "saes", "dataset_rows", "context", "dataset_points",
                "corpus")
INTERVENTION_OPTIONS = ("interventions_file", "steer", "ablate")  # together they set RunSpec.interventions


def generation_options(command):
    """The seed's generation flags with its defaults, plus top-k, dtype, stop strings and the capture."""
    options = [
        click.option("--model", default=DEFAULTS.model,
                     help="A .gguf file, model folder or Hub id (default: the embedded Gemma 3 270M, a pretrained "
                          "base model)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=DEFAULTS.dtype,
                     help="Compute dtype (default: float32 on CPU, bfloat16 on GPU)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=DEFAULTS.max_tokens, show_default=True,
                     help="Maximum new tokens to generate."),
        click.option("--temperature", type=click.FloatRange(min=0), default=DEFAULTS.temperature, show_default=True,
                     help="Sampling temperature (0: greedy)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=DEFAULTS.top_p,
                     show_default=True, help="Top-p nucleus sampling threshold."),
        click.option("--top-k", type=click.IntRange(min=1), default=DEFAULTS.top_k,
                     help="Keep only the k most likely tokens (default: no limit)."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
                     default=DEFAULTS.repetition_penalty, show_default=True, help="Repetition penalty factor (1: off)."),
        click.option("--seed", type=int, default=DEFAULTS.seed,
                     help="Random seed for reproducible generation (default: drawn and recorded in run_config.json)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True,
                     help="Number of prompts per batch."),
        click.option("--chat-mode", is_flag=True, help="Apply the chat template to each prompt (for -it models)."),
        click.option("--stop", multiple=True, help="Stop a prompt's generation at this string (repeatable)."),
        click.option("--prompts-file", type=click.Path(dir_okay=False), default=DEFAULTS.prompts_file,
                     help="Structured prompts JSON file (default: 8 built-in prompts; docs/outputs.md shows the "
                          "formats)."),
        click.option("--save-activations", is_flag=True,
                     help="Enable activation capture (every point unless --capture narrows it)."),
        click.option("--capture", multiple=True, metavar="PATTERN",
                     help="Capture points matching this glob (repeatable; implies --save-activations; default with "
                          "--save-activations: all). `gemmalens names` lists them."),
        click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out points matching this glob."),
        click.option("--layers", default=DEFAULTS.layers, metavar="RANGES",
                     help="Capture only these layers, e.g. '0-5,17' (default: all)."),
        click.option("--positions", type=click.Choice(POSITIONS), default=DEFAULTS.positions, show_default=True,
                     help="Which sequence positions to capture."),
        click.option("--wire-dtype", type=click.Choice(WIRE_DTYPES), default=DEFAULTS.wire_dtype,
                     help="Dtype of activations on the bus (default: the compute dtype)."),
        click.option("--codec", type=click.Choice(CODECS), default=DEFAULTS.codec, show_default=True,
                     help="Payload encoding on the bus. lz4+shuffle packs dense floats somewhat tighter at a few "
                          "times the CPU cost (docs/performance.md)."),
        click.option("--sae", "saes", multiple=True, metavar="SOURCE",
                     help="Attach a Gemma Scope 2 SAE or transcoder (a local folder or REPO_ID/FOLDER/SAE on the Hub; "
                          "repeatable): its features become capture points sae.<name>.features/.error and its "
                          "features can be steered (docs/saes.md)."),
        click.option("--interventions", "interventions_file", type=click.Path(dir_okay=False), default=None,
                     help="A JSON file of interventions: edits applied during generation (docs/interventions.md)."),
        click.option("--steer", multiple=True, metavar="SITE=FILE.npy[*SCALE]",
                     help="Add SCALE times the vector in FILE.npy at SITE, at every position and step (repeatable)."),
        click.option("--ablate", multiple=True, metavar="SITE[:HEADS]",
                     help="Zero SITE, or only these heads of it (e.g. model.layers.3.self_attn.attn_out:0,2-4; "
                          "repeatable)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def control_options(command):
    """``--control`` and its settings, shared by ``run`` and ``engine`` (gemmalens/control.py)."""
    options = [
        click.option("--control", default=None, callback=addresses, metavar="ADDR",
                     help="Open a control socket here: `gemmalens control ADDR apply|clear|list|go` changes the "
                          "interventions of the running generation (docs/interventions.md)."),
        click.option("--control-sync", is_flag=True,
                     help="Wait for a controller's go before each forward pass after the first (closed loop)."),
        click.option("--control-timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
                     metavar="SECONDS", help="How long --control-sync waits for a go."),
        click.option("--control-on-timeout", type=click.Choice(["continue", "stop"]), default="continue",
                     show_default=True,
                     help="When no go comes in time: go on without waiting, or stop the run (incomplete)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def cluster_options(command):
    """Engines, their placement by Ray and the bus's CURVE keys, shared by ``run`` and ``harvest``."""
    options = [
        click.option("--engines", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Engine processes sharing the prompts (one per device); the sinks merge their output."),
        click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="The engine's NAME.key_secret: encrypt and authenticate the bus (CURVE)."),
        click.option("--curve-allow", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Folder of the remote sinks' public keys to accept."),
        click.option("--insecure", is_flag=True,
                     help="Let the bus reach beyond loopback without CURVE (engines on other nodes, run's --bind)."),
        click.option("--ray", default=None, is_flag=False, flag_value="local", metavar="[ADDRESS]",
                     help="Run each engine in a Ray actor (a GPU each where the cluster has them): ADDRESS of a "
                          "cluster (auto: the one this machine is in), or alone a local one (docs/scale.md)."),
        click.option("--ray-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="CPUs each engine actor asks Ray for when the cluster has no GPU."),
        click.option("--ray-restarts", type=click.IntRange(min=0), default=3, show_default=True,
                     help="Times the run starts again (--resume, on new actors) after an engine's actor died."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def control_args(options: dict) -> list[str]:
    """The control options as ``gemmalens engine`` arguments (what ``run`` passes on)."""
    if not options.get("control"):
        return []
    return (["--control", options["control"], "--control-timeout", str(options["control_timeout"]),
             "--control-on-timeout", options["control_on_timeout"]]
            + (["--control-sync"] if options["control_sync"] else []))


def spec_from(options: dict, **extra) -> RunSpec:
    """The ``RunSpec`` that a command's generation options (and ``extra`` fields) describe."""
    values = {name: options[name] for name in SPEC_OPTIONS if name in options}
    return RunSpec.from_dict({**values, "interventions": intervention_records(options), **extra})


def intervention_records(options: dict) -> list[dict]:
    """The records of the interventions that ``--interventions``, ``--steer`` and ``--ablate`` give, in that order
    (arrays checked and referred to by absolute path and SHA-256)."""
    from gemmalens import interventions

    found = interventions.load_file(options["interventions_file"]) if options.get("interventions_file") else []
    found += [interventions.parse_steer(text, Path.cwd()) for text in options.get("steer") or ()]
    found += [interventions.parse_ablate(text) for text in options.get("ablate") or ()]
    return [iv.record() for iv in found]


def addresses(ctx, param, value):
    """A click callback: every address of a (repeatable) option checked (``check_address``)."""
    values = [value] if isinstance(value, str) else list(value or ())
    try:
        checked = [check_address(v, param.opts[0]) for v in values]
    except AddressError as error:
        raise click.BadParameter(str(error).split(": ", 1)[-1], ctx=ctx, param=param) from None
    return checked[0] if isinstance(value, str) else tuple(checked)


def parent_option(command):
    """``--parent PID`` (hidden): started by that ``gemmalens run``, which holds the output folders' locks; if it
    dies, this process stops as if it had been sent SIGTERM (nothing is left running without its supervisor)."""
    return click.option("--parent", type=int, default=None, hidden=True,
                        help="The pid of the `gemmalens run` that started this process.")(command)


def watch_parent(pid: int | None) -> None:
    """Stops this process (SIGTERM) once process ``pid``, its parent, has gone."""
    if pid is None:
        return

    def watch():
        while os.getppid() == pid:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gemmalens-parent-watch", daemon=True).start()


def require_pair(options: dict, first: str, second: str) -> bool:
    """True when both options are given, False when neither; one without the other is a usage error."""
    given = bool(options.get(first)), bool(options.get(second))
    if given[0] != given[1]:
        flags = (f"--{first.replace('_', '-')}", f"--{second.replace('_', '-')}")
        raise click.UsageError(f"{flags[0]} and {flags[1]} go together")
    return given[0]


def reports_errors(command):
    """Turns user-facing errors into one paragraph and an exit code (2: usage, 1: failure)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        verbose = kwargs.get("verbose", False)
        try:
            return command(*args, **kwargs)
        except (GemmalensError, OSError, ValueError) as error:
            if verbose:
                traceback.print_exc()
            usage = isinstance(error, USAGE_ERRORS)
            click.echo(f"error: {error}", err=True)
            if not verbose:
                click.echo("(run with --verbose for the traceback)", err=True)
            sys.exit(2 if usage else 1)

    return wrapper
