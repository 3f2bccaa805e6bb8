"""What a person meets first: clear errors for addresses and ports, sinks that say what they wait for and stop
when asked, progress when nothing is a terminal, warnings that are true, help on every option."""

import json
import signal
import socket
import subprocess
import sys
import time

import click
import pytest
from helpers import load_json, run_cli

from gemmalens.cli.main import cli


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, says", [
    (["sink", "results", "--connect", "localhost:5799", "--output-dir", "o"], "write it as tcp://localhost:5799"),
    (["run", "--bind", "127.0.0.1:5799"], "write it as tcp://127.0.0.1:5799"),
    (["engine", "--bind", "tcp://127.0.0.1"], "expected tcp://HOST:PORT"),
    (["sink", "npz", "--connect", "udp://h:1", "--activations-dir", "a"], "unsupported transport 'udp'"),
])
def test_bad_addresses_are_usage_errors_in_one_paragraph(tmp_path, args, says):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


def test_a_busy_port_is_a_failure_in_one_paragraph(tmp_path, tiny_folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("engine", "--model", tiny_folder, "--bind", f"tcp://127.0.0.1:{port}", cwd=tmp_path)
    assert out.returncode == 1 and "in use by another process" in out.stderr and "Traceback" not in out.stderr


def test_a_lone_sink_says_what_it_waits_for_and_stops_on_ctrl_c(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    sink = subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "sink", "results", "--connect", address,
                             "--output-dir", tmp_path / "out"], stderr=subprocess.PIPE, text=True)
    line = sink.stderr.readline()
    assert f"results: waiting for an engine at {address}" in line
    sink.send_signal(signal.SIGINT)
    assert sink.wait(10) == 130 and "stopped before any run started" in sink.stderr.read()
    assert not (tmp_path / "out" / "summary.json").exists()


def test_idle_timeout_applies_while_waiting_for_an_engine(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = run_cli("sink", "npz", "--connect", address, "--activations-dir", tmp_path / "a", "--idle-timeout", 2)
    assert out.returncode == 1 and time.monotonic() - started < 20
    assert f"no message for 2 s from {address}; is an engine running there?" in out.stderr


def test_the_stats_sink_exits_0_on_a_complete_run(tmp_path, tiny_folder):
    reliable, lossy = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    stats = subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "sink", "stats", "--connect", lossy],
                             stderr=subprocess.PIPE, text=True)
    results = subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", "sink", "results", "--connect", reliable,
                                "--output-dir", tmp_path / "out"])
    engine = run_cli("engine", "--model", tiny_folder, "--bind", reliable, "--lossy-bind", lossy, "--expect-sink",
                     "results", "--max-tokens", 3)
    assert engine.returncode == 0, engine.stderr
    assert results.wait(60) == 0
    assert stats.wait(60) == 0, stats.stderr.read()


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_folder):
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 16, "--progress-every", 0.1, "--output-dir",
                  tmp_path / "out")
    assert out.returncode == 0, out.stderr
    progress = [line for line in out.stderr.splitlines() if line.startswith("progress: ")]
    assert progress and "prompts 8/8" in progress[-1] and "done" in progress[-1]
    assert any("step" in line and "tok/s" in line and "written" in line for line in progress)
    quiet = run_cli("run", "--model", tiny_folder, "--max-tokens", 3, "--quiet", "--output-dir", tmp_path / "q")
    assert "progress: " not in quiet.stderr


def test_chat_mode_on_a_base_model_warns_once_naming_an_it_checkpoint(tmp_path, tiny_folder):
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 2, "--chat-mode", "--quiet", "--output-dir",
                  tmp_path / "out")
    assert out.returncode == 0 and out.stderr.count("a pretrained base model") == 1 and "-it" in out.stderr
    named = tmp_path / "gemma-3-tiny-it"
    named.symlink_to(tiny_folder)
    out = run_cli("run", "--model", named, "--max-tokens", 2, "--chat-mode", "--quiet", "--output-dir",
                  tmp_path / "it")
    assert out.returncode == 0 and "pretrained base model" not in out.stderr


def test_activations_dir_implies_save_activations_and_dtypes_are_named(tmp_path, tiny_folder):
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 2, "--capture", "model.layers.0.resid_out",
                  "--activations-dir", tmp_path / "acts", "--quiet", "--output-dir", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "acts" / "activations_index.json").exists()
    summary = load_json(tmp_path / "out" / "summary.json")
    assert summary["model"]["dtype"] == "float32" and summary["generation"]["capture_dtype"] == "float32"
    assert load_json(tmp_path / "out" / "run_config.json")["activations_dir"] == str((tmp_path / "acts").resolve())


def test_a_big_capture_is_estimated_and_warned_about_before_it_starts(tmp_path):
    from gemmalens.engine.config import config_from_hf
    from gemmalens.engine.loading import read_config_json, resolve
    from gemmalens.engine.selection import estimate_bytes, select

    config = config_from_hf(read_config_json(resolve(None)))  # the embedded 270M, without loading it
    everything = estimate_bytes(config, select(config, ["*"]), [12] * 8, 100, 4)
    narrow = estimate_bytes(config, select(config, ["model.layers.*.resid_out"]), [12] * 8, 100, 4)
    assert everything > 4e9 and narrow == 18 * 640 * 4 * 8 * (12 + 99)  # 18 layers, float32, 8 prompts, 12 + 99


def test_estimates_bound_what_a_run_writes(tmp_path, tiny_folder):
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 4, "--save-activations", "--no-compress-activations",
                  "--quiet", "--output-dir", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    estimate = float(out.stderr.split("capture: at most ")[1].split(" GB")[0]) * 1e9
    written = sum(p.stat().st_size for p in (tmp_path / "out" / "activations").glob("*.npz"))
    assert estimate >= written * 0.9 and estimate <= written * 2  # rounded to 10 MB in the message


def all_options():
    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
        else:
            for param in command.params:
                if isinstance(param, click.Option) and not param.hidden:
                    yield " ".join(path), param

    yield from walk(cli, [])


@pytest.mark.parametrize("command, option", [(c, o) for c, o in all_options()], ids=lambda x: getattr(x, "name", x))
def test_every_option_has_help_and_shows_its_default(command, option):
    assert option.help, f"{command} {option.opts[0]} has no help"
    unset = option.default is None or option.default is False or "UNSET" in repr(option.default)
    if not unset and not option.is_flag:
        assert option.show_default or "default" in option.help.lower(), f"{command} {option.opts[0]} hides its default"


def test_the_summary_says_per_prompt_speeds_are_each_prompts_own(tmp_path, tiny_folder):
    out = run_cli("run", "--model", tiny_folder, "--max-tokens", 6, "--stop", "\n", "--quiet", "--output-dir",
                  tmp_path / "out")
    assert out.returncode == 0, out.stderr
    for result in load_json(tmp_path / "out" / "results.json"):
        timings = result["timings"]
        expected = len(result["tokens"]) / timings["generation_seconds"] if timings["generation_seconds"] else 0
        assert abs(timings["tokens_per_second"] - expected) < 1e-6
    assert json.dumps(load_json(tmp_path / "out" / "summary.json")["segments"])
