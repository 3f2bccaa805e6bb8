"""The ``gemmalens`` command: ``run`` wires an engine and its sinks as processes; the parts run alone too."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import click

from gemmalens import __version__
from gemmalens.engine.prompts import by_category, load_prompts, parse_prompts, sample_prompts
from gemmalens.sinks.reader import INDEX, ActivationArchive
from gemmalens.sinks.results import METADATA, RESULTS, RESULTS_LINES, SUMMARY, dump_json, read_result_lines

from .engine import engine
from .options import addresses, generation_options, reports_errors, require_pair
from .sinks import attach, keys, sink

# Flags of `run` forwarded as they are to `gemmalens engine`.
ENGINE_FLAGS = ["model", "dtype", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                "batch_size", "chat_mode", "stop", "capture", "exclude", "layers", "positions", "wire_dtype",
                "save_activations", "prompts_file", "verbose"]
# Settings a resumed run must share with the run it continues.
RESUME_KEYS = ["model", "dtype", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
               "chat_mode", "stop", "capture", "exclude", "layers", "positions", "prompts_file", "save_activations"]
RUN_CONFIG = "run_config.json"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gemmalens")
def cli():
    """Run Gemma 3 with MLX and stream every named intermediate value to sinks."""


def safe_folder_name(category: str) -> str:
    """A folder name for a category, one-to-one: characters other than letters, digits, '_' and '-' (and a dot
    that would start the name) are %-escaped, so two categories never share a folder and none leaves the output
    folder ('../x' -> '%2E%2E%2Fx', 'a/b' -> 'a%2Fb')."""
    return "".join(c if re.fullmatch(r"[A-Za-z0-9_-]", c) or (c == "." and i) else f"%{ord(c):02X}"
                   if ord(c) < 256 else quote(c, safe="") for i, c in enumerate(category))


def engine_arguments(o: dict) -> list[str]:
    args = []
    for key in ENGINE_FLAGS:
        value, flag = o.get(key), "--" + key.replace("_", "-")
        if value is None or value is False or value == ():
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (tuple, list)):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".gemmalens-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise OSError(f"output folder {folder} is not writable ({error.strerror}); choose another --output-dir") from None


def _clear_previous(out: Path, acts: Path | None) -> bool:
    """Removes the outputs of an earlier run in these folders (a fresh run replaces them)."""
    files = [out / n for n in (RESULTS, RESULTS_LINES, METADATA, SUMMARY, RUN_CONFIG)]
    if acts is not None:
        files += [acts / INDEX, *acts.glob("activations_step_*.npz")]
    existing = [f for f in files if f.exists()]
    for file in existing:
        file.unlink()
    return bool(existing)


def _resume_state(out: Path, acts: Path | None, settings: dict) -> tuple[dict, list[int]]:
    """Settings of the run being resumed (checked against this one) and the prompts it finished."""
    stored_path = out / RUN_CONFIG
    if not stored_path.exists():
        raise click.UsageError(f"--resume: {out} holds no earlier run ({RUN_CONFIG} missing); run without --resume")
    stored = json.loads(stored_path.read_text())
    if settings.get("seed") is None:
        settings["seed"] = stored.get("seed")
    differing = [k for k in RESUME_KEYS if _normal(stored.get(k)) != _normal(settings.get(k))]
    if differing:
        raise click.UsageError(
            "--resume: these settings differ from the run being resumed: "
            + ", ".join(f"{k} (was {stored.get(k)!r}, now {settings.get(k)!r})" for k in differing)
        )
    done = set(read_result_lines(out / RESULTS_LINES))
    if acts is not None and settings.get("save_activations"):
        done &= set(ActivationArchive(acts).prompts) if (acts / INDEX).exists() else set()
    return settings, sorted(done)


def _normal(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _spawn(args: list[str]) -> subprocess.Popen:
    """A gemmalens command as a child process in a session of its own: a Ctrl-C at the terminal reaches ``run``
    alone, which ends the run through the engine (the sinks then finish what they received)."""
    return subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", *args], start_new_session=True)


def _local_keys(o: dict, tmp: Path) -> tuple[list[str], list[str]]:
    """Engine and local-sink CURVE arguments: the local sinks get a key of their own for this run."""
    if not require_pair(o, "curve_secret", "curve_allow"):
        return (["--insecure"] if o["insecure"] else []), []
    from gemmalens.engine.security import create_keys

    allowed = tmp / "allowed"
    shutil.copytree(o["curve_allow"], allowed)
    public, secret = create_keys(tmp / "local", "local-sinks")
    shutil.copy(public, allowed / public.name)
    engine = ["--curve-secret", str(Path(o["curve_secret"]).resolve()), "--curve-allow", str(allowed)]
    return engine, ["--curve-secret", str(secret), "--curve-server", str(Path(o["curve_secret"]).resolve())]


def _supervise(engines: list[subprocess.Popen], sinks: list[subprocess.Popen]) -> tuple[int, int | None]:
    """Waits for the engines and sinks, forwarding Ctrl-C/SIGTERM to the engines (which end the run after
    the current step). Returns the worst engine exit code and the signal received, if any."""
    received = {}

    def forward(number, frame):
        received.setdefault("signal", number)
        for proc in engines:
            if proc.poll() is None:
                proc.send_signal(number)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(proc.poll() is None for proc in engines):
            if any(s.poll() not in (None, 0) for s in sinks):  # a sink died: stop the run cleanly
                for proc in engines:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                for proc in engines:
                    proc.wait()
                break
            time.sleep(0.1)
        # An engine that exited on its own sent run.end (or never started): give the sinks time to finish.
        # One that was killed never will: finish them now, as incomplete.
        killed = any(proc.returncode < 0 for proc in engines)
        deadline = time.monotonic() + (1 if killed else 60)
        for proc in sinks:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:  # the engine died before run.end: finish the sink as incomplete
                proc.terminate()
                proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max((abs(proc.returncode) for proc in engines), default=0), received.get("signal")


def _check_model_and_capture(o: dict) -> None:
    """Fails before anything is launched or replaced: the model must resolve and the patterns match."""
    from gemmalens.engine.config import config_from_hf
    from gemmalens.engine.loading import read_config_json, resolve
    from gemmalens.engine.security import check_exposure
    from gemmalens.engine.selection import select

    config = config_from_hf(read_config_json(resolve(o["model"])))
    if o["model"] is not None and Path(o["model"]).expanduser().exists():
        o["model"] = str(Path(o["model"]).expanduser().resolve())
    select(config, list(o["capture"]), list(o["exclude"]), o["layers"], o["positions"])
    curve = o["curve_secret"] if require_pair(o, "curve_secret", "curve_allow") else None
    check_exposure([a for a in (o["bind"], o["lossy_bind"]) if a], curve, o["insecure"])


def _one_run(o: dict, out: Path, acts: Path | None, category: str | None) -> int:
    _writable(out)
    if acts is not None:
        _writable(acts)
    settings = {k: o.get(k) for k in ENGINE_FLAGS}
    skip: list[int] = []
    if o["resume"]:
        settings, skip = _resume_state(out, acts, settings)
    else:
        if _clear_previous(out, acts):
            click.echo(f"note: replacing the outputs of an earlier run in {out} (use --resume to continue it)", err=True)
        if settings["seed"] is None:
            settings["seed"] = secrets.randbits(31)
    (out / RUN_CONFIG).write_text(json.dumps({**settings, "category": category,
                                              "activations_dir": str(acts.resolve()) if acts else None}, indent=2))
    run_id = secrets.token_hex(6)
    tmp = Path(tempfile.mkdtemp(prefix="gemmalens-"))
    try:
        count = o["engines"]
        reliable = [o["bind"] if o["bind"] and count == 1 else f"ipc://{tmp}/reliable{i}" for i in range(count)]
        lossy = [o["lossy_bind"] if o["lossy_bind"] and count == 1 else f"ipc://{tmp}/lossy{i}" for i in range(count)]
        security, client = _local_keys(o, tmp)
        connect = [arg for address in reliable for arg in ("--connect", address)] + client
        sinks = [_spawn(["sink", "results", *connect, "--output-dir", str(out)] + (["--echo"] if o["verbose"] else []))]
        if acts is not None:
            sinks.append(_spawn(["sink", "npz", *connect, "--activations-dir", str(acts)]
                                + (["--no-compress-activations"] if o["no_compress_activations"] else [])
                                + (["--processes", str(o["archiver_processes"])] if o["archiver_processes"] else [])))
        for spec in o["attach"]:
            sinks.append(_spawn(["attach", spec, *connect]))
        watched = [a for folder in (out, acts) if folder is not None for a in ("--watch", str(folder))]
        viewers = ([] if o["quiet"] else
                   [_spawn(["sink", "stats", *[a for x in lossy for a in ("--connect", x)], *client, *watched,
                            "--every", str(o["progress_every"])])])
        skip_file = tmp / "skip.json"
        skip_file.write_text(json.dumps(skip))
        engines = []
        for i in range(count):
            args = ["engine", *engine_arguments(settings), "--bind", reliable[i], "--lossy-bind", lossy[i],
                    "--expect", str(len(sinks) + o["expect_remote"]), "--skip-file", str(skip_file),
                    "--shard", f"{i}/{count}", "--run-id", run_id, *security,
                    *[a for name in o["expect_sink"] for a in ("--expect-sink", name)]]
            if category is not None:
                args += ["--category", category]
            engines.append(_spawn(args))
        code, received = _supervise(engines, sinks + viewers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(out, acts, code, received)


def _report(out: Path, acts: Path | None, code: int, received) -> int:
    summary_path = out / SUMMARY
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        state = "complete" if summary["complete"] else f"INCOMPLETE ({summary.get('reason') or 'see summary.json'})"
        click.echo(f"{summary['prompts_done']}/{summary['prompts_total']} prompts, {state}; results in {out}"
                   + (f", activations in {acts}" if acts is not None else ""), err=True)
        if not summary["complete"] and received is None and code == 0:
            code = 1
    else:
        click.echo(f"no summary was written in {out}: the engine failed before the run started (exit {code})", err=True)
    return 128 + int(received) if received is not None else code


@cli.command()
@generation_options
@click.option("--verbose", is_flag=True, help="Print each result, and tracebacks on errors.")
@click.option("--output-dir", type=click.Path(file_okay=False), default="./gemma3_results", show_default=True,
              help="Directory for results.")
@click.option("--save-activations", is_flag=True,
              help="Enable activation capture (every point unless --capture narrows it).")
@click.option("--activations-dir", type=click.Path(file_okay=False), default=None,
              help="Activation storage directory (default: OUTPUT_DIR/activations); implies --save-activations.")
@click.option("--no-compress-activations", is_flag=True,
              help="Save activation files stored, not deflated (larger, faster to write and read).")
@click.option("--archiver-processes", type=click.IntRange(min=1), default=None,
              help="Processes writing the activation files (default: one per four cores, at most four; one below "
                   "eight cores).")
@click.option("--prompts-file", type=click.Path(dir_okay=False), default=None, help="Structured prompts JSON file.")
@click.option("--create-sample-prompts", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write a sample prompts file and exit.")
@click.option("--process-by-group", is_flag=True, help="Run each category into its own subfolder.")
@click.option("--resume", is_flag=True, help="Continue a stopped run in the same output folder.")
@click.option("--bind", default=None, callback=addresses,
              help="Engine endpoint for sinks (default: a private ipc:// address).")
@click.option("--lossy-bind", default=None, callback=addresses,
              help="Engine endpoint for live views (default: a private ipc:// address).")
@click.option("--attach", multiple=True, metavar="MODULE:CLASS", help="Also run this custom subscriber.")
@click.option("--expect-remote", type=click.IntRange(min=0), default=0,
              help="Also wait for this many sinks started elsewhere (connect them to --bind).")
@click.option("--expect-sink", multiple=True, metavar="NAME", help="Also wait for the remote sink of this name.")
@click.option("--engines", type=click.IntRange(min=1), default=1, show_default=True,
              help="Engine processes sharing the prompts (one per device); the sinks merge their output.")
@click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The engine's NAME.key_secret: encrypt and authenticate the bus (CURVE).")
@click.option("--curve-allow", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of the remote sinks' public keys to accept.")
@click.option("--insecure", is_flag=True, help="Allow --bind beyond loopback without CURVE.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--progress-every", type=click.FloatRange(min=0.1), default=5.0, show_default=True, metavar="SECONDS",
              help="Seconds between progress lines when stderr is not a terminal (a terminal gets a live bar).")
@reports_errors
def run(**o):
    """Generate for a prompt set with the engine and sinks as separate processes."""
    if o["create_sample_prompts"]:
        path = Path(o["create_sample_prompts"])
        if path.exists():
            raise click.UsageError(f"{path} exists; remove it or choose another file name")
        path.write_text(json.dumps(sample_prompts(), indent=2) + "\n")
        click.echo(f"wrote sample prompts to {path}; edit it and pass it with --prompts-file", err=True)
        return
    if (o["capture"] or o["activations_dir"]) and not o["save_activations"]:
        o["save_activations"] = True
    prompts = load_prompts(o["prompts_file"]) if o["prompts_file"] else None
    if o["prompts_file"]:
        o["prompts_file"] = str(Path(o["prompts_file"]).resolve())
    _check_model_and_capture(o)
    out = Path(o["output_dir"])
    acts = Path(o["activations_dir"]) if o["activations_dir"] else out / "activations"
    acts = acts if o["save_activations"] else None
    if not o["process_by_group"]:
        sys.exit(_one_run(o, out, acts, None))
    groups = by_category(prompts if prompts is not None else parse_prompts(sample_prompts()))
    worst = 0
    try:
        for category in groups:
            folder = safe_folder_name(category)
            code = _one_run(o, out / folder, acts / folder if acts is not None else None, category)
            if code >= 128:
                sys.exit(code)
            worst = max(worst, code)
    finally:
        _group_summary(out, list(groups))
    sys.exit(worst)


def _group_summary(out: Path, categories: list[str]) -> None:
    """The root summary.json of a --process-by-group run: each group's state and the totals."""
    groups, totals = {}, {"prompts_done": 0, "prompts_total": 0, "tokens_generated": 0}
    for category in categories:
        path = out / safe_folder_name(category) / SUMMARY
        summary = json.loads(path.read_text()) if path.exists() else {}
        groups[category] = {"folder": safe_folder_name(category), "complete": bool(summary.get("complete")),
                            **{k: summary.get(k, 0) for k in totals}}
        for key in totals:
            totals[key] += summary.get(key, 0)
    dump_json(out / SUMMARY, {"complete": all(g["complete"] for g in groups.values()), **totals, "groups": groups})


@cli.command()
@click.argument("pattern", required=False)
@click.option("--model", default=None, help="Model whose points to list (default: the embedded 270M).")
@click.option("--verbose", is_flag=True, help="Show tracebacks on errors.")
@reports_errors
def names(pattern, model, verbose):
    """List capture points with their shapes and meaning (optionally those matching PATTERN)."""
    import fnmatch

    from gemmalens.engine.config import config_from_hf
    from gemmalens.engine.loading import read_config_json, resolve
    from gemmalens.engine.selection import catalogue, dimension_sizes, eval_dim

    config = config_from_hf(read_config_json(resolve(model)))
    sizes = dimension_sizes(config)
    rows = [(n, s, m) for n, s, m in catalogue(config) if pattern is None or fnmatch.fnmatchcase(n, pattern)]
    if not rows:
        raise click.UsageError(f"no capture point matches {pattern!r}")
    for name, shape, meaning in rows:
        dims = ",".join(str(eval_dim(d, sizes)) if d not in ("B", "S", "K") else d for d in shape.split(","))
        click.echo(f"{name:<58} [{dims}]  {meaning}")


cli.add_command(engine)
cli.add_command(sink)
cli.add_command(attach)
cli.add_command(keys)


def seed_main() -> None:
    """``python run_gemma_refactored.py [flags]``: the seed's entry point, which is ``gemmalens run``."""
    cli.main(["run", *sys.argv[1:]], prog_name="run_gemma_refactored.py")


if __name__ == "__main__":
    cli()
