"""Engines placed by Ray (``gemmalens run --ray [ADDRESS]``): each engine runs inside a Ray actor, on the node
and device Ray gives it; the sinks stay where ``run`` is, and ZeroMQ stays the data path.

An actor starts ``gemmalens engine`` as its child process, bound on its node's address, with the run's files
(settings, prompts or corpus windows, CURVE keys) shipped to it, and reports how it ended. ``RayEngine`` makes
an actor look like the engine process ``run`` supervises otherwise (``poll``, ``send_signal``, ``terminate``,
``kill``, ``wait``, ``returncode``). An actor that dies (its node lost, killed) ends the segment like a killed
engine: ``run`` then starts the run again with ``--resume`` on new actors, which regenerate what no sink kept.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

DIED = -signal.SIGKILL  # the return code of an engine whose actor died


def connect(address: str | None) -> None:
    """Joins the Ray cluster at ``address`` ("auto": the one this machine belongs to), or starts a local one."""
    try:
        import ray
    except ImportError:
        raise click.UsageError("--ray needs the ray extra: pip install 'gemmalens[ray]'") from None
    if ray.is_initialized():
        return
    ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
             configure_logging=False, log_to_driver=True)


def local(address: str | None) -> bool:
    """Whether the cluster is one started here for this run (its engines then bind on loopback)."""
    return address in (None, "local")


class EngineHost:
    """A Ray actor's body: it runs one ``gemmalens engine`` process with the files it is given."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="gemmalens-engine-"))

    def endpoint(self, loopback: bool) -> tuple[str, int, int]:
        """This node's address and two free ports (the reliable and lossy endpoints)."""
        import ray

        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        ports = []
        for _ in range(2):
            with socket.socket() as probe:
                probe.bind((host, 0))
                ports.append(probe.getsockname()[1])
        return host, ports[0], ports[1]

    def run(self, args: list[str], files: dict[str, bytes], spec: dict[str, Any]) -> int:
        """Writes ``files`` into this actor's folder and ``spec`` as its run_config.json, runs the engine with
        ``args`` and returns its exit code. ``@NAME`` in ``args`` or as a value of ``spec``: that file's path."""
        def local(value):
            return str(self.folder / value[1:]) if isinstance(value, str) and value.startswith("@") else value

        for name, data in files.items():
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_bytes(data)
        (self.folder / "run_config.json").write_text(json.dumps({k: local(v) for k, v in spec.items()}))
        resolved = [local(a) for a in args]
        self.process = subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "engine", *resolved,
                                         "--parent", str(os.getpid())])
        return self.process.wait()

    def signal(self, number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    def pid(self) -> int:
        """The engine process's pid (0 before it started)."""
        return self.process.pid if self.process is not None else 0


class RayEngine:
    """One engine actor, supervised as ``run`` supervises an engine process."""

    def __init__(self, cpus: float, gpus: float):
        import ray

        # two threads: ``run`` waits on the engine the whole run, ``signal`` must reach it meanwhile
        self.actor = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=2)(EngineHost).remote()
        self.ref = None
        self.returncode: int | None = None

    def endpoint(self, loopback: bool) -> tuple[str, int, int]:
        import ray

        return ray.get(self.actor.endpoint.remote(loopback))

    def start(self, args: list[str], files: dict[str, bytes], spec: dict[str, Any]) -> None:
        self.ref = self.actor.run.remote(args, files, spec)

    def poll(self) -> int | None:
        import ray
        from ray.exceptions import RayActorError

        if self.returncode is None and self.ref is not None and ray.wait([self.ref], timeout=0)[0]:
            try:
                self.returncode = ray.get(self.ref)
            except RayActorError:
                self.returncode = DIED
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("engine actor", timeout)
            time.sleep(0.1)
        return self.returncode

    def send_signal(self, number: int) -> None:
        self.actor.signal.remote(number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import ray

        ray.kill(self.actor)


def resources(o: dict[str, Any]) -> tuple[float, float]:
    """What each engine actor asks Ray for: a GPU where the cluster has them, else ``--ray-cpus`` CPUs."""
    import ray

    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return (1.0 if gpus else float(o["ray_cpus"])), gpus


def shipped(spec: dict[str, Any], security: list[str]) -> tuple[dict[str, Any], list[str], dict[str, bytes]]:
    """The run's settings, the engine's CURVE arguments and the files an engine actor needs on its node: the
    prompts file or corpus windows and the keys travel with it (the model, a SAE or an intervention's array must
    be at the same path on every node, or come from the Hub)."""
    files: dict[str, bytes] = {}
    spec = dict(spec)
    for field, name in (("prompts_file", "prompts.json"), ("corpus", "corpus.npy")):
        if spec.get(field):
            files[name] = Path(spec[field]).read_bytes()
            spec[field] = "@" + name
    args = []
    for arg in security:
        path = Path(arg)
        if path.is_file():
            files[path.name] = path.read_bytes()
            args.append("@" + path.name)
        elif path.is_dir():
            for key in path.iterdir():
                files[f"allowed/{key.name}"] = key.read_bytes()
            args.append("@allowed")
        else:
            args.append(arg)
    return spec, args, files
