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
from click.core import ParameterSource

from gemmalens import __version__
from gemmalens.errors import ConfigError
from gemmalens.files import FolderLock, dump_json
from gemmalens.prompts import DEFAULT_PROMPTS, by_category, load_prompts, parse_prompts, sample_prompts
from gemmalens.spec import RUN_CONFIG, RunSpec

from .control import control
from .engine import engine
from .harvest import harvest
from .report import report
from .options import (INTERVENTION_OPTIONS, SPEC_OPTIONS, addresses, cluster_options, control_args, control_options,
                      generation_options, reports_errors, require_pair, spec_from)
from .sinks import attach, keys, sink

EXIT_ON_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
SINK_STOP_SECONDS = 10  # a sink told to stop (its run is over, incomplete) has this long to write what it has


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gemmalens")
def cli():
    """Run Gemma 3 with MLX and stream every named intermediate value to sinks."""


def safe_folder_name(category: str) -> str:
    """A folder name for a category, one-to-one: characters other than letters, digits, '_' and '-' (and a dot
    that would start the name) are %-escaped, so two categories never share a folder and none leaves the output
    folder ('../x' -> '%2E.%2Fx', 'a/b' -> 'a%2Fb')."""
    return "".join(c if re.fullmatch(r"[A-Za-z0-9_-]", c) or (c == "." and i) else f"%{ord(c):02X}"
                   if ord(c) < 256 else quote(c, safe="") for i, c in enumerate(category))


def _spawn(args: list[str]) -> subprocess.Popen:
    """A gemmalens command as a child process in a session of its own: a Ctrl-C at the terminal reaches ``run``
    alone, which ends the run through the engine (the sinks then finish what they received)."""
    return subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", *args], start_new_session=True)


def _local_keys(o: dict, tmp: Path) -> tuple[list[str], list[str]]:
    """Engine and local-sink CURVE arguments: the local sinks get a key of their own for this run."""
    if not require_pair(o, "curve_secret", "curve_allow"):
        return (["--insecure"] if o["insecure"] else []), []
    from gemmalens.curve import create_keys

    allowed = tmp / "allowed"
    shutil.copytree(o["curve_allow"], allowed)
    public, secret = create_keys(tmp / "local", "local-sinks")
    shutil.copy(public, allowed / public.name)
    engine = ["--curve-secret", str(Path(o["curve_secret"]).resolve()), "--curve-allow", str(allowed)]
    return engine, ["--curve-secret", str(secret), "--curve-server", str(Path(o["curve_secret"]).resolve())]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _supervise(engines: dict[str, subprocess.Popen], sinks: dict[str, subprocess.Popen],
               viewers: list[subprocess.Popen]) -> int | None:
    """Waits for every process, forwarding Ctrl-C/SIGTERM to the engines (which end the run after the current
    step; a second one stops everything at once). An engine that fails ends the run: the other engines are
    stopped, and once all have exited the sinks, which will get no more, finish what they have. Returns the
    signal received, if any."""
    received: list[int] = []

    def forward(number, frame):
        received.append(number)
        targets = engines.values() if len(received) == 1 else [*engines.values(), *sinks.values()]
        for proc in targets:
            if proc.poll() is None:
                proc.send_signal(number)

    previous = {sig: signal.signal(sig, forward) for sig in EXIT_ON_SIGNAL}
    try:
        stopping = False
        while any(p.poll() is None for p in engines.values()):
            if not stopping and any(p.poll() not in (None, 0) for p in engines.values()):
                stopping = True
                for proc in engines.values():
                    if proc.poll() is None:
                        proc.terminate()
            time.sleep(0.1)
        if any(p.returncode != 0 for p in engines.values()):  # no more will come: the sinks keep what they have
            for proc in sinks.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in sinks.values():  # one that does not stop (stopped itself, or hung) is killed
                try:
                    proc.wait(timeout=SINK_STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for proc in sinks.values():
            proc.wait()
        for proc in viewers:  # a live view shows the run's end, if it saw it; it waits for nothing else
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0] if received else None


def _check_inputs(o: dict, spec: RunSpec) -> None:
    """Fails before anything is launched or touched: the prompts, the model's config, the capture selection, the
    addresses and keys must all be usable."""
    from gemmalens.curve import check_exposure
    from gemmalens.engine.config import config_from_hf
    from gemmalens.engine.loading import read_config_json, resolve
    from gemmalens.engine.sae import attach
    from gemmalens.engine.selection import select

    if spec.prompts_file:
        load_prompts(spec.prompts_file)
    config = config_from_hf(read_config_json(resolve(spec.model)))
    saes = attach(spec.saes, config)
    selection = select(config, list(spec.patterns) or ["*"], list(spec.exclude), spec.layers, spec.positions, saes)
    if spec.dataset:
        _check_dataset(spec, selection)
    if spec.interventions:
        from gemmalens.engine.editing import prepare
        from gemmalens.interventions import parse_all

        prepare(parse_all(spec.interventions), config, saes)
    curve = o["curve_secret"] if require_pair(o, "curve_secret", "curve_allow") else None
    check_exposure([a for a in (o["bind"], o["lossy_bind"], o["control"]) if a], curve, o["insecure"])


def _check_dataset(spec: RunSpec, selection) -> None:
    """``--dataset`` needs the dataset extra, an explicit capture, and a captured per-token point for its columns."""
    import fnmatch

    from gemmalens.sinks.dataset import per_token

    try:
        import datasets  # noqa: F401
        import fsspec  # noqa: F401
    except ImportError:
        raise click.UsageError("--dataset needs the dataset extra: pip install 'gemmalens[dataset]'") from None
    if not spec.capture:
        raise click.UsageError("--dataset needs --capture PATTERN: the points to write as columns, e.g. "
                               "--capture 'model.layers.6.resid_out'")
    points = spec.dataset_points or ("*",)
    columns = [n for n in sorted(selection.model_names) if per_token(selection.axes[n])
               and any(fnmatch.fnmatchcase(n, p) for p in points)]
    if not columns:
        raise click.UsageError("--dataset: no captured point has a value per token to write"
                               + (f" among --dataset-points {' '.join(points)}" if spec.dataset_points else "")
                               + " (attention scores and weights do not; `gemmalens names` lists the points)")


def _check_ray(o: dict) -> None:
    """``--ray``: the engines' addresses are Ray's to choose, and beyond this machine the bus needs CURVE."""
    from . import cluster

    given = [flag for flag, key in (("--bind", "bind"), ("--lossy-bind", "lossy_bind"), ("--control", "control"))
             if o[key]]
    if given:
        raise click.UsageError(f"--ray places the engines: {', '.join(given)} cannot be used with it")
    if not cluster.local(o["ray"]) and not require_pair(o, "curve_secret", "curve_allow") and not o["insecure"]:
        raise click.UsageError(f"--ray {o['ray']}: the engines bind on their nodes' addresses; give --curve-secret "
                               "and --curve-allow to encrypt the bus (or --insecure on a network you trust)")
    cluster.connect(o["ray"])


def _dataset_dest(text: str | None, group: str | None = None) -> str | None:
    """A dataset destination as the sink takes it: a URL as given, a local folder made absolute; a group's
    subfolder of it with --process-by-group."""
    if not text:
        return None
    if "://" in text:
        return text.rstrip("/") + (f"/{group}" if group else "")
    folder = Path(text).expanduser().absolute()
    return str(folder / group if group else folder)


def _run_spec(o: dict, out: Path, acts: Path | None, dataset: str | None = None) -> RunSpec:
    """This run's settings: from the options, or for ``--resume`` those the output folder holds (options given
    on the command line must agree with them where they change the outputs)."""
    folders = {"output_dir": str(out.resolve()), "activations_dir": str(acts.resolve()) if acts else None,
               "dataset": dataset}
    given = spec_from(o, category=None, **folders)
    if not o["resume"]:
        return given if given.seed is not None else given.replace(seed=secrets.randbits(31))
    try:
        stored = RunSpec.read(out)
    except ConfigError as error:
        raise click.UsageError(f"--resume: {error}; run without --resume") from None
    context = click.get_current_context()
    explicit = {name: getattr(given, name) for name in SPEC_OPTIONS
                if context.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if any(context.get_parameter_source(name) == ParameterSource.COMMANDLINE for name in INTERVENTION_OPTIONS):
        explicit["interventions"] = given.interventions
    differing = stored.differences(stored.replace(**explicit))
    if differing:
        raise click.UsageError("--resume: these settings differ from the run being resumed: " + ", ".join(differing))
    folders["dataset"] = folders["dataset"] or stored.dataset  # resumed too unless another is given
    return stored.replace(**{k: v for k, v in explicit.items() if k in RunSpec.FREE}, **folders)


def _folder_states(out: Path, acts: Path | None, dataset: str | None) -> list[dict]:
    """What each sink's folder holds (a run, complete or not, and its prompts done)."""
    from gemmalens.sinks.npz import folder_state as activations_state
    from gemmalens.sinks.results import folder_state as results_state

    states = [results_state(out)] + ([activations_state(acts)] if acts is not None else [])
    if dataset:
        from gemmalens.sinks.arrowdata import DatasetWriter
        from gemmalens.sinks.store import open_store

        states.append(DatasetWriter(open_store(dataset)).state())
    return states


def _check_folders(out: Path, acts: Path | None, dataset: str | None, resume: bool) -> None:
    """A new run into folders holding an incomplete run is refused: ``--resume`` continues it."""
    if resume:
        return
    for state in _folder_states(out, acts, dataset):
        if state.get("run") and not state["complete"]:
            raise click.UsageError(
                f"{state['folder']} holds an incomplete run ({len(state['have'])} prompt(s) done): continue it with "
                "--resume, or remove it (or choose another --output-dir) for a new run")


def _one_run(o: dict, spec: RunSpec, out: Path, acts: Path | None, category: str | None) -> int:
    locks = [FolderLock(out).acquire()]
    try:
        if acts is not None:
            locks.append(FolderLock(acts).acquire())
        if spec.dataset and "://" not in spec.dataset:
            locks.append(FolderLock(spec.dataset).acquire())
        _check_folders(out, acts, spec.dataset, o["resume"])
        restarts = o["ray_restarts"] if o["ray"] else 0
        while True:
            code, died = _launch(o, spec.replace(category=category), out, acts)
            if not died or restarts <= 0:
                return code
            restarts -= 1
            resume = o["resume"] or any(state.get("run") for state in _folder_states(out, acts, spec.dataset))
            click.echo(f"{', '.join(died)}: its Ray actor died; the run starts again on new actors"
                       f"{' with --resume' if resume else ' (nothing was written yet)'} ({restarts} restart(s) left)",
                       err=True)
            o = {**o, "resume": resume}
    finally:
        for lock in locks:
            lock.release()


def _launch(o: dict, spec: RunSpec, out: Path, acts: Path | None) -> tuple[int, list[str]]:
    """Runs engines and sinks to the end: the exit code, and the engines whose Ray actor died (a signal from
    the user ends the run whatever died)."""
    run_id = secrets.token_hex(6)
    tmp = Path(tempfile.mkdtemp(prefix="gemmalens-"))
    actors = []
    try:
        spec_file = tmp / RUN_CONFIG
        spec_file.write_text(json.dumps(spec.to_dict()))
        count = o["engines"]
        reliable = [o["bind"] if o["bind"] and count == 1 else f"ipc://{tmp}/reliable{i}" for i in range(count)]
        lossy = [o["lossy_bind"] if o["lossy_bind"] and count == 1 else f"ipc://{tmp}/lossy{i}" for i in range(count)]
        security, client = _local_keys(o, tmp)
        actors = _place_engines(o, count, reliable, lossy) if o["ray"] else []
        parent = ["--parent", str(os.getpid())]
        connect = [arg for address in reliable for arg in ("--connect", address)] + client + parent
        sinks = {"results": _spawn(["sink", "results", *connect, "--output-dir", str(out)]
                                   + (["--echo"] if o["verbose"] else []))}
        if acts is not None:
            sinks["npz"] = _spawn(["sink", "npz", *connect, "--activations-dir", str(acts)]
                                  + (["--no-compress-activations"] if o["no_compress_activations"] else [])
                                  + (["--processes", str(o["archiver_processes"])] if o["archiver_processes"] else []))
        if spec.dataset:
            sinks["dataset"] = _spawn(["sink", "dataset", *connect, "--dest", spec.dataset, "--rows", spec.dataset_rows,
                                       "--context", str(spec.context), "--shard-mb", str(o["dataset_shard_mb"]),
                                       *[a for p in spec.dataset_points for a in ("--points", p)]])
        for n, spec_text in enumerate(o["attach"]):
            sinks[f"attached-{n}"] = _spawn(["attach", spec_text, *connect, "--name", f"attached-{n}"])
        watched = [a for folder in (out, acts) if folder is not None for a in ("--watch", str(folder))]
        viewers = ([] if o["quiet"] else
                   [_spawn(["sink", "stats", *[a for x in lossy for a in ("--connect", x)], *client, *watched,
                            "--every", str(o["progress_every"]), *parent])])
        if o["web"]:
            viewers.append(_spawn(["sink", "web", *[a for x in lossy for a in ("--connect", x)], *client,
                                   "--port", str(o["web_port"]), *parent]))
        names = [*sinks, *o["expect_sink"]]
        engines = {}
        if actors:
            from .cluster import shipped

            settings, security, files = shipped(spec.to_dict(), security)
        for i in range(count):
            args = ["--bind", reliable[i], "--lossy-bind", lossy[i],
                    "--expect", str(len(names) + o["expect_remote"]), "--shard", f"{i}/{count}", "--run-id", run_id,
                    *security, *[a for name in names for a in ("--expect-sink", name)]]
            if o["resume"]:
                args.append("--resume")
            if o["verbose"]:
                args.append("--verbose")
            args += control_args(o)
            label = f"engine {i}" if count > 1 else "engine"
            if actors:
                actors[i].start(["--spec", "@run_config.json", *args], files, settings)
                engines[label] = actors[i]
            else:
                engines[label] = _spawn(["engine", "--spec", str(spec_file), *parent, *args])
        received = _supervise(engines, sinks, viewers)
    finally:
        for actor in actors:  # each segment's actors go with it: their resources are the next segment's
            actor.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    code = _verdict(out, acts, spec.dataset, engines, sinks, received, run_id)
    from .cluster import DIED

    return code, [name for name, e in engines.items() if actors and e.returncode == DIED and received is None]


def _place_engines(o: dict, count: int, reliable: list[str], lossy: list[str]) -> list:
    """Engine actors placed by Ray, one per engine; their endpoints (on their nodes) replace the local ones."""
    from . import cluster

    cpus, gpus = cluster.resources(o)
    actors = [cluster.RayEngine(cpus, gpus) for _ in range(count)]
    for i, actor in enumerate(actors):
        host, port, lossy_port = actor.endpoint(cluster.local(o["ray"]))
        reliable[i], lossy[i] = f"tcp://{host}:{port}", f"tcp://{host}:{lossy_port}"
        click.echo(f"engine {i}: a Ray actor ({'1 GPU' if gpus else f'{cpus:g} CPU(s)'}) at {reliable[i]}", err=True)
    return actors


def _verdict(out: Path, acts: Path | None, dataset: str | None, engines: dict, sinks: dict, received: int | None,
             run_id: str) -> int:
    """Says what the run left: complete, or what is missing and which process failed; records it in
    summary.json. The exit code follows the worst: 130/143 for a user's stop, 2 for a usage error, else 1."""
    from gemmalens.sinks.results import METADATA, RESULTS_LINES, read_result_lines

    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is not None and summary.get("run") != run_id:  # an earlier run's
        summary = None
    metadata = json.loads((out / METADATA).read_text()) if (out / METADATA).exists() else {}
    started = summary is not None or metadata.get("run") == run_id
    named = {**engines, **sinks} if started else engines  # a run that never started: the engine's fault
    problems = [f"{name} {_describe_exit(p.returncode)}" for name, p in named.items() if p.returncode]
    if not started:
        if problems:
            click.echo(f"the run did not start: {'; '.join(problems)}; nothing in {out} was changed", err=True)
        return EXIT_ON_SIGNAL.get(received, 128 + received) if received is not None else (
            2 if any(p.returncode == 2 for p in engines.values()) else 1)
    if summary is None:  # the results sink died before writing it: the run's verdict is still recorded
        summary = {"complete": False, "run": run_id, "reason": None,
                   "prompts_done": len(read_result_lines(out / RESULTS_LINES)),
                   "prompts_total": len(metadata.get("prompts", []))}
    complete = not problems and bool(summary.get("complete"))
    summary["processes"] = {name: p.returncode for name, p in {**engines, **sinks}.items()}
    summary["complete"] = complete
    if problems:
        summary["reason"] = "; ".join(filter(None, [summary.get("reason"), *problems]))
    dump_json(summary_path, summary)
    state = "complete" if complete else f"INCOMPLETE: {summary['reason'] or 'see summary.json'}"
    click.echo(f"{summary['prompts_done']}/{summary['prompts_total']} prompts, {state}; results in {out}"
               + (f", activations in {acts}" if acts is not None else "")
               + (f", dataset in {dataset}" if dataset else ""), err=True)
    if not complete:
        click.echo("continue it with the same command and --resume", err=True)
    if received is not None:
        return EXIT_ON_SIGNAL.get(received, 128 + received)
    return 0 if complete else 1


@cli.command()
@generation_options
@click.option("--verbose", is_flag=True, help="Print each result, and tracebacks on errors.")
@click.option("--output-dir", type=click.Path(file_okay=False), default="./gemma3_results", show_default=True,
              help="Directory for results.")
@click.option("--activations-dir", type=click.Path(file_okay=False), default=None,
              help="Activation storage directory (default: OUTPUT_DIR/activations); implies --save-activations.")
@click.option("--no-compress-activations", is_flag=True,
              help="Save activation files stored, not deflated (larger, faster to write and read).")
@click.option("--archiver-processes", type=click.IntRange(min=1), default=None,
              help="Processes writing the activation files (default: one per four cores, at most four; one below "
                   "eight cores).")
@click.option("--create-sample-prompts", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write a sample prompts file and exit.")
@click.option("--process-by-group", is_flag=True,
              help="Run each category into its own subfolder (a summary.json of all at the top).")
@click.option("--resume", is_flag=True,
              help="Continue a stopped run in the same output folder (its settings come from its run_config.json).")
@click.option("--bind", default=None, callback=addresses,
              help="Engine endpoint for sinks (default: a private ipc:// address).")
@click.option("--lossy-bind", default=None, callback=addresses,
              help="Engine endpoint for live views (default: a private ipc:// address).")
@click.option("--attach", multiple=True, metavar="MODULE:CLASS", help="Also run this custom subscriber (repeatable).")
@click.option("--expect-remote", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also wait for this many sinks started elsewhere (connect them to --bind).")
@click.option("--expect-sink", multiple=True, metavar="NAME", help="Also wait for the remote sink of this name.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--progress-every", type=click.FloatRange(min=0.1), default=5.0, show_default=True, metavar="SECONDS",
              help="Seconds between progress lines when stderr is not a terminal (a terminal gets a live bar).")
@click.option("--web", is_flag=True, help="Serve a live page of the run (gemmalens sink web) and print its URL.")
@click.option("--web-port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="The live page's port, on loopback.")
@click.option("--dataset", default=None, metavar="FOLDER|URL",
              help="Also write the captured per-token points as a Hugging Face datasets dataset here: a folder or "
                   "an fsspec URL such as s3://bucket/path (needs --capture; docs/datasets.md).")
@click.option("--dataset-rows", type=click.Choice(["token", "context"]), default="token", show_default=True,
              help="Dataset rows: one per token, or one per window of --context tokens (SAELens' cached "
                   "activations).")
@click.option("--context", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens per dataset row with --dataset-rows context.")
@click.option("--dataset-points", multiple=True, metavar="PATTERN",
              help="Write only the captured points matching this glob to the dataset (repeatable).")
@click.option("--dataset-shard-mb", type=click.FloatRange(min=0, min_open=True), default=500.0, show_default=True,
              help="Close a dataset shard once it holds this many MB.")
@click.option("--corpus", default=None, hidden=True,
              help="Generate for a packed corpus's windows instead of prompts (what `gemmalens harvest` passes).")
@control_options
@cluster_options
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
    if o["control"] and o["engines"] > 1:
        raise click.UsageError("--control works with one engine (--engines 1)")
    if o["ray"]:
        _check_ray(o)
    npz = o["save_activations"] or o["activations_dir"] or (o["capture"] and not o["dataset"])
    if (o["capture"] or o["activations_dir"]) and not o["save_activations"]:
        o["save_activations"] = True  # capture is on; the npz archiver runs only if asked for (not for --dataset)
    if o["prompts_file"]:
        o["prompts_file"] = str(Path(o["prompts_file"]).resolve())
    if o["model"] is not None and Path(o["model"]).expanduser().exists():
        o["model"] = str(Path(o["model"]).expanduser().absolute())
    o["saes"] = tuple(str(Path(s).expanduser().absolute()) if Path(s).expanduser().exists() else s for s in o["saes"])
    out = Path(o["output_dir"])
    acts = Path(o["activations_dir"]) if o["activations_dir"] else out / "activations"
    acts = acts if npz or (o["resume"] and (acts / "activations_index.json").exists()) else None
    if not o["process_by_group"]:
        spec = _run_spec(o, out, acts, _dataset_dest(o["dataset"]))
        _check_inputs(o, spec)
        sys.exit(_one_run(o, spec, out, acts, None))
    prompts = load_prompts(o["prompts_file"]) if o["prompts_file"] else parse_prompts(DEFAULT_PROMPTS)
    groups = by_category(prompts)
    worst = 0
    try:
        for category in groups:
            folder = safe_folder_name(category)
            group_acts = acts / folder if acts is not None else None
            spec = _run_spec(o, out / folder, group_acts, _dataset_dest(o["dataset"], folder))
            if category == next(iter(groups)):
                _check_inputs(o, spec)
            code = _one_run(o, spec, out / folder, group_acts, category)
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
        path = out / safe_folder_name(category) / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        groups[category] = {"folder": safe_folder_name(category), "complete": bool(summary.get("complete")),
                            **{k: summary.get(k, 0) for k in totals}}
        for key in totals:
            totals[key] += summary.get(key, 0)
    out.mkdir(parents=True, exist_ok=True)
    dump_json(out / "summary.json", {"complete": all(g["complete"] for g in groups.values()), **totals,
                                     "groups": groups})


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
cli.add_command(control)
cli.add_command(report)
cli.add_command(harvest)


def seed_main() -> None:
    """``python run_gemma_refactored.py [flags]``: the seed's entry point, which is ``gemmalens run``."""
    cli.main(["run", *sys.argv[1:]], prog_name="run_gemma_refactored.py")


if __name__ == "__main__":
    cli()
