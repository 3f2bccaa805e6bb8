"""``gemmalens control ADDR apply FILE | clear | list | go``: change a running engine's interventions."""

from __future__ import annotations

import json

import click

from gemmalens.control import Controller
from gemmalens.curve import CurveClient

from .options import addresses, reports_errors, require_pair


@click.command()
@click.argument("address", callback=addresses)
@click.argument("action", type=click.Choice(["apply", "clear", "list", "go"]))
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the engine's answer (apply and go wait for the step they reach).")
@click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This controller's NAME.key_secret (CURVE), its public key in the engine's --curve-allow.")
@click.option("--curve-server", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The engine's public key file.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
@reports_errors
def control(address, action, file, timeout, curve_secret, curve_server, verbose):
    """Send an engine started with --control ADDR a change: apply the interventions of FILE (a JSON file as
    --interventions takes), clear them all, list those in force, or (with --control-sync) let it go on a step.
    Prints the engine's answer as JSON: the batch and step the change took effect."""
    if (action == "apply") != (file is not None):
        raise click.UsageError("apply takes the interventions FILE; clear, list and go take none")
    o = {"curve_secret": curve_secret, "curve_server": curve_server}
    curve = CurveClient(curve_secret, curve_server) if require_pair(o, "curve_secret", "curve_server") else None
    with Controller(address, timeout=timeout, curve=curve) as controller:
        reply = controller.apply(file) if action == "apply" else getattr(controller, action)()
    click.echo(json.dumps(reply, indent=2))
