"""Options shared by ``run`` and ``engine``, and the way every command reports errors."""

from __future__ import annotations

import functools
import sys
import traceback

import click

from gemmalens.engine.errors import ConfigError, GemmalensError, SelectionError
from gemmalens.engine.prompts import PromptFileError
from gemmalens.engine.selection import POSITIONS

USAGE_ERRORS = (PromptFileError, ConfigError, SelectionError)


def generation_options(command):
    """The seed's generation flags with its defaults, plus top-k, dtype and stop strings."""
    options = [
        click.option("--model", default=None, help="A .gguf file, model folder or Hub id (default: embedded Gemma 3 270M)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="Compute dtype (default: float32 on CPU, bfloat16 on GPU)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=100, show_default=True,
                     help="Maximum new tokens to generate."),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
                     help="Sampling temperature (0: greedy)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
                     help="Top-p nucleus sampling threshold."),
        click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep only the k most likely tokens."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.1,
                     show_default=True, help="Repetition penalty factor (1: off)."),
        click.option("--seed", type=int, default=None, help="Random seed for reproducible generation."),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Number of prompts per batch."),
        click.option("--chat-mode", is_flag=True, help="Apply the chat template to each prompt."),
        click.option("--stop", multiple=True, help="Stop a prompt's generation at this string (repeatable)."),
        click.option("--capture", multiple=True, metavar="PATTERN",
                     help="Capture points matching this glob (repeatable; default with --save-activations: all)."),
        click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out points matching this glob."),
        click.option("--layers", default=None, metavar="RANGES", help="Capture only these layers, e.g. '0-5,17'."),
        click.option("--positions", type=click.Choice(POSITIONS), default="all", show_default=True,
                     help="Which sequence positions to capture."),
        click.option("--wire-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="Dtype of activations on the bus (default: the compute dtype)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def addresses(ctx, param, value):
    """A click callback: every address of a (repeatable) option checked (``check_address``)."""
    from gemmalens.engine.security import AddressError, check_address

    values = [value] if isinstance(value, str) else list(value or ())
    try:
        checked = [check_address(v, param.opts[0]) for v in values]
    except AddressError as error:
        raise click.BadParameter(str(error).split(": ", 1)[-1], ctx=ctx, param=param) from None
    return checked[0] if isinstance(value, str) else tuple(checked)


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
