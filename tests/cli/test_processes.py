"""The engine and sinks as separate processes: wiring, custom subscribers, interruption and resume."""

import os
import socket
import subprocess
import sys

from helpers import load_json, run_cli

SUBSCRIBER = '''
import json
from gemmalens.sinks.base import Subscriber

class Counter(Subscriber):
    topics = ("result", "act.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results, self.frames, self.codecs = 0, 0, set()

    def on_result(self, result):
        self.results += 1

    def on_activation(self, frame):
        self.frames += 1
        self.codecs.add(frame.header["codec"])

    def on_run_end(self, summary):
        json.dump({"results": self.results, "frames": self.frames, "complete": self.complete,
                   "codecs": sorted(self.codecs)}, open("counted.json", "w"))
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_and_sink_run_as_their_own_processes(tmp_path, tiny_folder):
    address = f"tcp://127.0.0.1:{free_port()}"
    sink = subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "sink", "results", "--connect", address,
                             "--output-dir", tmp_path / "out"])
    engine = run_cli("engine", "--model", tiny_folder, "--bind", address, "--expect", 1, "--max-tokens", 3,
                     "--temperature", 0)
    assert engine.returncode == 0, engine.stderr
    assert sink.wait(60) == 0
    summary = load_json(tmp_path / "out" / "summary.json")
    assert summary["complete"] and summary["prompts_done"] == 8


def test_custom_subscriber_attached_from_the_command_line_receives_the_run(tmp_path, tiny_folder):
    (tmp_path / "counter_mod.py").write_text(SUBSCRIBER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 2, "--attach", "counter_mod:Counter",
                  "--capture", "model.layers.0.resid_out", "--output-dir", tmp_path / "out", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    # frames are lz4 by default: the byte shuffle made decode-step frames no smaller and halved GPU capture speed
    assert load_json(tmp_path / "counted.json") == {"results": 8, "frames": 2 * 2, "complete": True, "codecs": ["lz4"]}


def test_attach_rejects_what_is_not_a_subscriber(tmp_path):
    out = run_cli("attach", "json:dumps", "--connect", "tcp://127.0.0.1:1")
    assert out.returncode == 2 and "not a gemmalens.sinks.base.Subscriber subclass" in out.stderr


def test_resume_refuses_changed_settings(tmp_path, tiny_folder):
    assert run_cli("run", "--model", tiny_folder, "--max-tokens", 2, "--output-dir", tmp_path / "o").returncode == 0
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 3, "--output-dir", tmp_path / "o", "--resume")
    assert out.returncode == 2 and "max_tokens (was 2, now 3)" in out.stderr
