"""Sinks on another host, several engines, CURVE, and the fault table: nothing lost or duplicated."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
import zmq
from helpers import load_json, run_cli, tiny_generator, without_timings

from gemmalens.curve import CurveClient, CurveServer, create_keys
from gemmalens.engine.publisher import Publisher
from gemmalens.engine.run import serve
from gemmalens.engine.selection import select
from gemmalens.prompts import Prompt
from gemmalens.sinks.base import SinkError, Subscriber
from gemmalens.spec import RunSpec

RUN = ["--max-tokens", 24, "--batch-size", 2, "--seed", 3, "--temperature", 0.9, "--save-activations",
       "--capture", "model.layers.*.resid_out", "--capture", "generate.*.sample.token"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_folder):
    """An uninterrupted single-engine run: what every other arrangement must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    done = run_cli("run", "--model", tiny_folder, *RUN, "--output-dir", out)
    assert done.returncode == 0, done.stderr
    return out


def assert_same_outputs(folder, reference):
    assert load_json(folder / "summary.json")["complete"]
    assert without_timings(load_json(folder / "results.json")) == without_timings(load_json(reference / "results.json"))
    lines = [json.loads(line)["id"] for line in (folder / "results.jsonl").read_text().splitlines()]
    assert sorted(lines) == sorted(set(lines)) == list(range(8))  # none lost, none duplicated
    index, expected = (load_json(d / "activations" / "activations_index.json") for d in (folder, reference))
    assert index["tokens"] == expected["tokens"]
    assert sorted(p for b in index["batches"].values() for p in b["prompts"]) == list(range(8))
    import numpy as np

    import gemmalens

    ours, theirs = gemmalens.open_activations(folder / "activations"), gemmalens.open_activations(reference / "activations")
    for prompt in range(8):
        a, b = ours.trajectory("model.layers.3.resid_out", prompt), theirs.trajectory("model.layers.3.resid_out", prompt)
        assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


def netns(name, *command):
    return subprocess.run(["ip", "netns", "exec", name, *map(str, command)], check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 'engine' 10.231.7.1 and 'sinks' 10.231.7.2."""
    tag = uuid.uuid4().hex[:6]
    engine, sinks = f"gl-e-{tag}", f"gl-s-{tag}"
    try:
        for ns in (engine, sinks):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        pytest.skip(f"network namespaces cannot be created here: {error}")
    try:
        subprocess.run(["ip", "link", "add", f"ve{tag}", "type", "veth", "peer", "name", f"vs{tag}"], check=True)
        subprocess.run(["ip", "link", "set", f"ve{tag}", "netns", engine], check=True)
        subprocess.run(["ip", "link", "set", f"vs{tag}", "netns", sinks], check=True)
        for ns, dev, ip in ((engine, f"ve{tag}", "10.231.7.1/24"), (sinks, f"vs{tag}", "10.231.7.2/24")):
            netns(ns, "ip", "addr", "add", ip, "dev", dev)
            netns(ns, "ip", "link", "set", dev, "up")
            netns(ns, "ip", "link", "set", "lo", "up")
        yield {"engine": engine, "sinks": sinks, "engine_link": f"ve{tag}"}
    finally:
        for ns in (engine, sinks):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns, *args, **kwargs):
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "gemmalens.cli.main", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_engine_and_sinks_on_different_hosts_write_what_one_process_writes(tmp_path, tiny_folder, reference, two_hosts):
    out = tmp_path / "remote"
    address = "tcp://10.231.7.1:5601"
    sinks = [in_ns(two_hosts["sinks"], "sink", "results", "--connect", address, "--output-dir", out),
             in_ns(two_hosts["sinks"], "sink", "npz", "--connect", address, "--activations-dir", out / "activations",
                   "--processes", 2)]  # its files written by two helper processes
    engine = in_ns(two_hosts["engine"], "engine", "--model", tiny_folder, *RUN, "--bind", "tcp://10.231.7.1:5601",
                   "--insecure", "--expect", 2)
    assert engine.wait(300) == 0, engine.communicate()[1]
    assert all(s.wait(60) == 0 for s in sinks), [s.communicate()[1] for s in sinks]
    assert_same_outputs(out, reference)


def test_binding_beyond_loopback_needs_curve_or_an_explicit_opt_out(tmp_path, tiny_folder):
    out = run_cli("engine", "--model", tiny_folder, "--bind", "tcp://0.0.0.0:5602", "--max-tokens", 1)
    assert out.returncode == 2 and "--curve-secret" in out.stderr and "--insecure" in out.stderr


def test_two_engines_one_set_of_sinks_equal_one_engine(tmp_path, tiny_folder, reference):
    out = run_cli("run", "--model", tiny_folder, *RUN, "--engines", 2, "--output-dir", tmp_path / "two",
                  "--archiver-processes", 2)  # and the activation files written by two helper processes
    assert out.returncode == 0, out.stderr
    assert_same_outputs(tmp_path / "two", reference)
    assert load_json(tmp_path / "two" / "summary.json")["prompts_done"] == 8


def curve_run(tmp_path, client_secret, server_public, expect_known=True):
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    allowed.mkdir(exist_ok=True)
    context = zmq.Context()
    server = CurveServer(keys / "engine.key_secret", allowed)
    publisher = Publisher(reliable="tcp://127.0.0.1:0", expect=1 if expect_known else 0, curve=server,
                          context=context, sync_timeout=30)
    received = []

    class Recorder(Subscriber):
        def handle(self, parts):
            received.append(parts[0])
            super().handle(parts)

    sink = Recorder(publisher.endpoints["reliable"], context=context,
                    curve=CurveClient(client_secret, server_public))
    outcome = {}

    def listen():
        try:
            outcome["complete"] = sink.run(timeout=8 if not expect_known else 60)
        except SinkError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=listen)
    thread.start()
    model, tokenizer = tiny_generator()
    prompts = [Prompt(0, "secret prompt")]
    spec = RunSpec(max_tokens=3, temperature=0, top_p=1, repetition_penalty=1, batch_size=1, seed=1,
                   capture=("model.layers.0.resid_out",))
    selection = select(model.config, ["model.layers.0.resid_out"])
    if not expect_known:
        time.sleep(1)
    serve(model, tokenizer, spec, prompts, prompts, selection, publisher)
    thread.join()
    context.term()
    return received, outcome


def test_curve_known_sink_receives_everything_unknown_receives_nothing(tmp_path):
    keys = tmp_path / "keys"
    create_keys(keys, "engine")
    create_keys(keys, "known")
    create_keys(keys, "stranger")
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "known.key").write_bytes((keys / "known.key").read_bytes())
    received, outcome = curve_run(tmp_path, keys / "known.key_secret", keys / "engine.key")
    assert outcome == {"complete": True} and b"run.end" in received and b"act.model.layers.0.resid_out" in received
    received, outcome = curve_run(tmp_path, keys / "stranger.key_secret", keys / "engine.key", expect_known=False)
    assert received == [] and "no message" in outcome["error"] and "handshake" in outcome["error"]


def test_a_sink_refuses_an_engine_it_does_not_trust(tmp_path):
    keys = tmp_path / "keys"
    for name in ("engine", "impostor", "known"):
        create_keys(keys, name)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "known.key").write_bytes((keys / "known.key").read_bytes())
    received, outcome = curve_run(tmp_path, keys / "known.key_secret", keys / "impostor.key", expect_known=False)
    assert received == [] and "no message" in outcome["error"]


def test_keys_command_writes_a_pair(tmp_path):
    out = run_cli("keys", "engine", "--dir", tmp_path)
    assert out.returncode == 0 and (tmp_path / "engine.key").exists() and (tmp_path / "engine.key_secret").exists()
    assert oct((tmp_path / "engine.key_secret").stat().st_mode)[-3:] == "600"


def start_run(tiny_folder, out, *extra, env=None, log=None):
    """``run`` with RUN's settings; its output piped, or both streams into the open file ``log``."""
    return subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "run", "--model", str(tiny_folder),
                             *map(str, RUN), "--output-dir", str(out), *map(str, extra)],
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            text=True, env=env)


def wait_for_results(out, count, timeout=120):
    lines = out / "results.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lines.exists() and len(lines.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("the run produced no results in time")


def child(proc, words):
    for p in psutil.Process(proc.pid).children(recursive=True):
        if all(w in " ".join(p.cmdline()) for w in words):
            return p
    raise AssertionError(f"no child process running {words}")


SLOW = '''
import os, time
from gemmalens.sinks.npz import NpzArchiver

class SlowDisk(NpzArchiver):
    """A second archiver whose every write takes 10 ms longer."""

    def __init__(self, connect, **kwargs):
        super().__init__(connect, os.environ["SLOW_DISK_DIR"], **kwargs)

    def on_tokens(self, frame):
        time.sleep(0.01)
        super().on_tokens(frame)
'''


@pytest.mark.parametrize("fault", ["kill -9 npz sink", "kill -9 results sink", "kill -9 engine", "slow sink"])
def test_fault_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_folder, reference, fault):
    out = tmp_path / "run"
    if fault == "slow sink":
        (tmp_path / "slowdisk.py").write_text(SLOW)
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "SLOW_DISK_DIR": str(tmp_path / "slow")}
        proc = start_run(tiny_folder, out, "--attach", "slowdisk:SlowDisk", env=env)
        assert proc.wait(300) == 0, proc.communicate()[1]
    else:
        proc = start_run(tiny_folder, out)
        wait_for_results(out, 2)
        words = {"kill -9 npz sink": ["sink", "npz"], "kill -9 results sink": ["sink", "results"],
                 "kill -9 engine": [" engine "]}[fault]
        child(proc, words).send_signal(signal.SIGKILL)
        assert proc.wait(120) == 1  # the dead process named, the run incomplete
        victim = {"kill -9 npz sink": "npz", "kill -9 results sink": "results", "kill -9 engine": "engine"}[fault]
        assert f"{victim} was killed by SIGKILL" in proc.communicate()[1]
        assert not load_json(out / "summary.json")["complete"] if (out / "summary.json").exists() else True
    resumed = run_cli("run", "--model", tiny_folder, *RUN, "--output-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(out, reference)
    if fault == "slow sink":
        slow = load_json(tmp_path / "slow" / "activations_index.json")
        assert slow["tokens"] == load_json(reference / "activations" / "activations_index.json")["tokens"]


def test_a_cut_link_that_comes_back_loses_nothing(tmp_path, tiny_folder, reference, two_hosts):
    out = tmp_path / "cut"
    address = "tcp://10.231.7.1:5603"
    sinks = [in_ns(two_hosts["sinks"], "sink", "results", "--connect", address, "--output-dir", out),
             in_ns(two_hosts["sinks"], "sink", "npz", "--connect", address, "--activations-dir", out / "activations")]
    engine = in_ns(two_hosts["engine"], "engine", "--model", tiny_folder, *RUN, "--bind", address, "--insecure",
                   "--expect", 2)
    wait_for_results(out, 1)
    netns(two_hosts["engine"], "ip", "link", "set", two_hosts["engine_link"], "down")
    time.sleep(2)
    netns(two_hosts["engine"], "ip", "link", "set", two_hosts["engine_link"], "up")
    assert engine.wait(300) == 0, engine.communicate()[1]
    assert all(s.wait(60) == 0 for s in sinks)
    assert_same_outputs(out, reference)  # complete as it is: TCP kept the connection, back-pressure held the engine


def test_two_engines_placed_by_ray_equal_one_engine_without_it(tmp_path, tiny_folder, reference):
    out = run_cli("run", "--model", tiny_folder, *RUN, "--engines", 2, "--ray", "--output-dir", tmp_path / "ray")
    assert out.returncode == 0, out.stderr
    assert "engine 1: a Ray actor (1 CPU(s)) at tcp://127.0.0.1:" in out.stderr
    assert_same_outputs(tmp_path / "ray", reference)


def test_an_engine_actor_killed_mid_run_is_replaced_and_the_run_completes_identical(tmp_path, tiny_folder, reference):
    out = tmp_path / "ray"
    log = tmp_path / "run.log"  # not a pipe: Ray's forwarded logs could fill one and hold the run
    with log.open("w") as output:
        proc = start_run(tiny_folder, out, "--engines", 2, "--ray", log=output)
    engine, deadline = None, time.monotonic() + 120
    while engine is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)  # the engine takes seconds to start: a look every 20 ms finds it long before it sends
        placed = re.search(r"engine 1: a Ray actor \(1 CPU\(s\)\) at (\S+)", log.read_text())
        engine = placed and next((p for p in psutil.process_iter(["cmdline"])
                                  if f"--bind {placed[1]} " in " ".join(p.info["cmdline"] or ())), None)
    assert engine is not None, "engine 1 never started: " + log.read_text()
    engine.suspend()  # held before it sent anything: its whole share is still to do when its actor dies
    wait_for_results(out, 1)  # while engine 0's results come in: the run is under way
    worker = engine.parent()
    assert "EngineHost" in " ".join(worker.cmdline())
    worker.kill()  # the actor's worker: Ray reports the actor dead
    engine.kill()  # and its engine with it, as when a node is lost
    assert proc.wait(300) == 0, log.read_text()
    assert "engine 1: its Ray actor died; the run starts again on new actors with --resume (2 restart(s) left)" \
        in log.read_text()
    assert_same_outputs(out, reference)
