"""``gemmalens report RUN_DIR [-o FILE.html]``: the run's report page, one self-contained file."""

from __future__ import annotations

from pathlib import Path

import click

from gemmalens.files import write_atomic

from .options import reports_errors


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the page (default: RUN_DIR/report.html).")
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None,
              help="Another run's folder (the same prompts, without the interventions): its tokens beside these, "
                   "differences marked, the change in each token's probability on hover.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
@reports_errors
def report(run_dir, output, baseline, verbose):
    """Write one HTML page for a finished run: tokens coloured by probability with their alternatives, attention
    patterns, the logit lens and the summary, for every prompt; it opens from disk, with no network."""
    from gemmalens.sinks.report import build_report

    target = Path(output) if output else Path(run_dir) / "report.html"
    write_atomic(target, build_report(run_dir, baseline).encode("utf-8"))
    click.echo(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB); open it in a browser", err=True)
