"""A run that says complete is complete: faults between processes end with everything on disk or a non-zero exit
naming what is missing, and no run destroys another's outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import load_json, run_cli

import gemmalens

QUICK = ["--max-tokens", 3, "--temperature", 0, "--batch-size", 4]
TOKENS = 24
LONG = ["--max-tokens", TOKENS, "--batch-size", 2, "--seed", 5, "--save-activations", "--capture",
        "model.layers.*.resid_out"]


def start(*args, env=None, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def children(proc, *words):
    import psutil

    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if all(w in " ".join(p.cmdline()) for w in words)]


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def lines(folder):
    path = folder / "results.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_a_sink_paused_near_the_end_holds_the_run_which_then_completes_whole(tmp_path, tiny_folder):
    out = tmp_path / "out"
    proc = start("run", "--model", tiny_folder, *LONG, "--output-dir", out, "--quiet")
    wait_for(lambda: len(lines(out)) >= 4)
    npz = children(proc, "sink", "npz")[0]
    npz.send_signal(signal.SIGSTOP)
    time.sleep(5)
    npz.send_signal(signal.SIGCONT)
    assert proc.wait(300) == 0, proc.communicate()[1]
    assert load_json(out / "summary.json")["complete"]
    assert gemmalens.open_activations(out).prompts == list(range(8))


def test_a_stop_reaches_a_run_whose_sink_is_stalled(tmp_path, tiny_folder):
    out = tmp_path / "out"
    proc = start("run", "--model", tiny_folder, *LONG, "--output-dir", out, "--quiet")
    wait_for(lambda: len(lines(out)) >= 2)
    npz = children(proc, "sink", "npz")[0]
    npz.send_signal(signal.SIGSTOP)
    time.sleep(2)
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    finally:
        if npz.is_running():
            npz.send_signal(signal.SIGCONT)
    assert code == 143 and time.monotonic() - asked < 30 and "npz was killed by SIGKILL" in proc.communicate()[1]
    summary = load_json(out / "summary.json")
    assert not summary["complete"]
    assert run_cli("run", "--model", tiny_folder, *LONG, "--output-dir", out, "--resume", "--quiet").returncode == 0
    assert load_json(out / "summary.json")["complete"] and gemmalens.open_activations(out).prompts == list(range(8))


SLOW_COUNTER = '''
import json, time
from gemmalens.sinks.base import Subscriber

class SlowCounter(Subscriber):
    topics = ("act.",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frames = 0

    def on_activation(self, frame):
        time.sleep(0.05)
        self.frames += 1

    def on_run_end(self, summary):
        json.dump({"frames": self.frames, "complete": self.complete}, open("slow.json", "w"))
'''


def test_a_slow_attached_subscriber_receives_every_frame_before_the_run_ends(tmp_path, tiny_folder):
    (tmp_path / "slow_mod.py").write_text(SLOW_COUNTER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 8, "--capture", "model.layers.*.resid_out",
                  "--attach", "slow_mod:SlowCounter", "--output-dir", tmp_path / "out", "--quiet", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert load_json(tmp_path / "slow.json") == {"frames": 8 * 4 * 2, "complete": True}  # 8 steps, 4 layers, 2 batches


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(tmp_path, tiny_folder):
    out = tmp_path / "out"
    first = start("run", "--model", tiny_folder, *LONG, "--output-dir", out, "--quiet")
    wait_for(lambda: (out / ".gemmalens.lock").exists() and (out / ".gemmalens.lock").read_text())
    second = run_cli("run", "--model", tiny_folder, *QUICK, "--seed", 8, "--output-dir", out, "--quiet")
    assert second.returncode == 1 and "in use by another gemmalens run (pid" in second.stderr
    assert first.wait(300) == 0
    assert load_json(out / "summary.json")["complete"] and len(lines(out)) == 8
    assert {json.loads(line)["seed"] for line in lines(out)} == {5}


def test_a_failing_new_run_leaves_the_previous_outputs_whole(tmp_path, tiny_folder):
    out = tmp_path / "out"
    assert run_cli("run", "--model", tiny_folder, *QUICK, "--capture", "model.layers.0.resid_out",
                   "--output-dir", out, "--quiet").returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".gemmalens.lock"}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes()[:5000])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_folder / name).read_bytes())
    failed = run_cli("run", "--model", broken, *QUICK, "--capture", "model.layers.0.resid_out", "--output-dir", out,
                     "--quiet")
    assert failed.returncode == 1 and "model.safetensors" in failed.stderr and "Traceback" not in failed.stderr
    typo = run_cli("run", "--model", tiny_folder, *QUICK, "--layers", "0-99", "--output-dir", out, "--quiet")
    assert typo.returncode == 2 and "outside 0-3" in typo.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".gemmalens.lock"}
    assert after == before


def test_a_new_run_keeps_the_earlier_one_aside_until_it_is_complete(tmp_path, tiny_folder):
    out = tmp_path / "out"
    assert run_cli("run", "--model", tiny_folder, *QUICK, "--seed", 1, "--output-dir", out, "--quiet").returncode == 0
    assert run_cli("run", "--model", tiny_folder, *QUICK, "--seed", 2, "--output-dir", out, "--quiet").returncode == 0
    assert not (out / ".replaced").exists()
    assert {r["seed"] for r in load_json(out / "results.json")} == {2}


def test_an_interrupted_run_refuses_a_new_run_and_resume_cuts_its_torn_line(tmp_path, tiny_folder):
    out = tmp_path / "out"
    proc = start("run", "--model", tiny_folder, *LONG, "--output-dir", out, "--quiet")
    wait_for(lambda: len(lines(out)) >= 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    fresh = run_cli("run", "--model", tiny_folder, *LONG, "--output-dir", out, "--quiet")
    assert fresh.returncode == 2 and "holds an incomplete run" in fresh.stderr and "--resume" in fresh.stderr
    done = [json.loads(line)["id"] for line in lines(out)]
    with open(out / "results.jsonl", "a") as handle:
        handle.write('{"id": 7, "prompt": "half a li')  # what a crash mid-write leaves
    resumed = run_cli("run", "--model", tiny_folder, *LONG, "--output-dir", out, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    ids = [json.loads(line)["id"] for line in lines(out)]
    assert ids[:len(done)] == done and sorted(ids) == list(range(8))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 48 kB tmpfs: a results folder that fills up mid-run."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"this test needs root to mount a small tmpfs: {done.stderr}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_the_run_naming_the_file_and_resume_finishes_it(tmp_path, tiny_folder, tiny_disk):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([f"prompt number {i} " + "word " * 200 for i in range(12)]))
    out = tiny_disk / "out"
    failed = run_cli("run", "--model", tiny_folder, "--prompts-file", prompts, "--max-tokens", 20, "--batch-size", 2,
                     "--seed", 4, "--output-dir", out, "--quiet")
    assert failed.returncode == 1 and "the disk is full" in failed.stderr and "Traceback" not in failed.stderr
    assert all(json.loads(line) for line in lines(out))  # no torn line left behind
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
    resumed = run_cli("run", "--model", tiny_folder, "--prompts-file", prompts, "--max-tokens", 20, "--batch-size", 2,
                      "--seed", 4, "--output-dir", out, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(json.loads(line)["id"] for line in lines(out)) == list(range(12))


def test_group_names_that_look_alike_get_folders_of_their_own(tmp_path, tiny_folder):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a/b": ["first"], "a_b": ["second"], "..": ["third"], "...": ["fourth"]}))
    out = run_cli("run", "--model", tiny_folder, "--prompts-file", prompts, *QUICK, "--process-by-group",
                  "--output-dir", tmp_path / "out", "--quiet")
    assert out.returncode == 0, out.stderr
    summary = load_json(tmp_path / "out" / "summary.json")
    assert summary["complete"] and summary["prompts_done"] == 4 and len({g["folder"] for g in
                                                                         summary["groups"].values()}) == 4
    for group in summary["groups"].values():
        assert [r["text"] for r in load_json(tmp_path / "out" / group["folder"] / "results.json")]


@pytest.mark.parametrize("prompt, says", [("word " * 5000, "do not fit the model's context of 4096 tokens"),
                                          ("\ud800 lone", "not valid Unicode")], ids=["too long", "lone surrogate"])
def test_prompts_that_cannot_be_generated_are_usage_errors_naming_them(tmp_path, tiny_folder, prompt, says):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["fine", prompt]))
    out = run_cli("run", "--model", tiny_folder, "--prompts-file", prompts, *QUICK, "--output-dir", tmp_path / "out",
                  "--quiet")
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr
    assert "prompt 1" in out.stderr or "$[1]" in out.stderr


def test_an_engine_restarted_into_running_sinks_continues_the_run_as_a_new_segment(tmp_path, tiny_folder):
    """Separate processes: the engine is killed mid-run; started again with --resume, it asks the sinks still
    running what they hold, and they take its new start as a new segment of the same outputs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "out"
    sinks = [start("sink", "results", "--connect", address, "--output-dir", out, "--engine-timeout", 120),
             start("sink", "npz", "--connect", address, "--activations-dir", out / "activations", "--engine-timeout",
                   120)]
    engine_args = ["engine", "--model", tiny_folder, *LONG, "--bind", address, "--expect-sink", "results",
                   "--expect-sink", "npz"]
    first = start(*engine_args)
    wait_for(lambda: len(lines(out)) >= 3)
    first.kill()
    first.wait()
    second = run_cli(*engine_args, "--resume")
    assert second.returncode == 0, second.stderr
    assert [s.wait(60) for s in sinks] == [0, 0]
    summary = load_json(out / "summary.json")
    assert summary["complete"] and len(summary["segments"]) == 2
    ids = [json.loads(line)["id"] for line in lines(out)]
    assert sorted(ids) == sorted(set(ids)) == list(range(8))
    archive = gemmalens.open_activations(out)
    assert archive.prompts == list(range(8)) and all(len(t) == TOKENS for t in archive.tokens.values())


def test_sinks_whose_engine_died_end_incomplete_and_keep_what_they_have(tmp_path, tiny_folder):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "out"
    sink = start("sink", "results", "--connect", address, "--output-dir", out, "--engine-timeout", 2)
    engine = start("engine", "--model", tiny_folder, *LONG, "--bind", address, "--expect-sink", "results")
    wait_for(lambda: len(lines(out)) >= 2)
    engine.kill()
    assert sink.wait(30) == 1
    assert "went away mid-run" in sink.communicate()[1]
    summary = load_json(out / "summary.json")
    assert not summary["complete"] and summary["prompts_done"] == len(lines(out)) >= 2
