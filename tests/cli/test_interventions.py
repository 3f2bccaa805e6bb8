"""Interventions from the command line: applied, recorded beside what they caused, resumed exactly, refused early."""

import json
import subprocess
import sys

import numpy as np
from helpers import load_json, run_cli

import gemmalens
from gemmalens.control import Controller
from gemmalens.interventions import parse_steer

SITE = "model.layers.1.resid_out"
RUN = ["--max-tokens", 3, "--temperature", 0, "--batch-size", 4, "--capture", SITE]


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "gemmalens.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_run_records_its_interventions_in_every_output(tmp_path, tiny_folder):
    np.save(tmp_path / "v.npy", np.full(64, 3.0, np.float32))
    (tmp_path / "edits.json").write_text(json.dumps([
        {"op": "zero", "site": "model.layers.0.self_attn.attn_out", "heads": [1], "prompts": [2, 5],
         "name": "no-head-1"}]))
    out = tmp_path / "out"
    done = run_cli("run", "--model", tiny_folder, *RUN, "--interventions", tmp_path / "edits.json",
                   "--steer", f"{SITE}=v.npy*0.5", "--output-dir", out, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    steer = parse_steer(f"{SITE}=v.npy*0.5", tmp_path)
    config = load_json(out / "run_config.json")
    assert [i["op"] for i in config["interventions"]] == ["zero", "add"]
    assert config["interventions"][1]["vector"] == str(tmp_path / "v.npy")
    rows = {r["id"]: r["interventions"] for r in load_json(out / "results.json")}
    assert rows[2] == ["no-head-1", steer.id] and rows[0] == [steer.id]
    summary = load_json(out / "summary.json")
    assert {i["id"]: i["rows"] for i in summary["interventions"]} == {"no-head-1": [2, 5], steer.id: list(range(8))}
    index = load_json(out / "activations" / "activations_index.json")
    first = index["batches"]["0"]["interventions"][0]
    assert first["step"] == 0 and [i["id"] for i in first["interventions"]] == ["no-head-1", steer.id]

    plain = run_cli("run", "--model", tiny_folder, *RUN, "--output-dir", tmp_path / "plain", "--quiet")
    assert plain.returncode == 0
    edited = gemmalens.open_activations(out).get(SITE, [0], [0])[0][0][1]
    unedited = gemmalens.open_activations(tmp_path / "plain").get(SITE, [0], [0])[0][0][1]
    assert np.allclose(edited, unedited + 1.5, atol=1e-5)  # the stored values are after the edit


def test_resume_uses_the_recorded_interventions_and_refuses_a_changed_array(tmp_path, tiny_folder):
    np.save(tmp_path / "v.npy", np.full(64, 3.0, np.float32))
    out = tmp_path / "out"
    done = run_cli("run", "--model", tiny_folder, *RUN, "--steer", f"{SITE}={tmp_path / 'v.npy'}",
                   "--output-dir", out, "--quiet")
    assert done.returncode == 0, done.stderr
    np.save(tmp_path / "v.npy", np.zeros(64, np.float32))
    again = run_cli("run", "--model", tiny_folder, "--output-dir", out, "--resume", "--quiet")
    assert again.returncode == 2 and "is not the one the run used" in again.stderr
    assert load_json(out / "summary.json")["complete"]  # nothing lost


def test_a_site_the_model_lacks_is_refused_before_anything_starts(tmp_path, tiny_folder):
    out = tmp_path / "out"
    refused = run_cli("run", "--model", tiny_folder, *RUN, "--ablate", "model.layers.9.mlp.hidden",
                      "--output-dir", out, "--quiet")
    assert refused.returncode == 2 and "'model.layers.9.mlp.hidden' is not a site this model can edit" in refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()


def test_a_controller_steers_a_running_synchronous_run_from_the_command_line(tmp_path, tiny_folder):
    (tmp_path / "edits.json").write_text(json.dumps([{"op": "add", "site": SITE, "vector": [0.5] * 64,
                                                      "name": "live"}]))
    address = f"ipc://{tmp_path}/control"
    out = tmp_path / "out"
    proc = start("run", "--model", tiny_folder, *RUN, "--output-dir", out, "--quiet", "--control", address,
                 "--control-sync")
    applied = run_cli("control", address, "apply", tmp_path / "edits.json", "--timeout", 120)
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["step"] == 1 and json.loads(applied.stdout)["batch"] == 0
    with Controller(address, timeout=60) as controller:
        steps = [(r["batch"], r["step"]) for r in (controller.go() for _ in range(5))]
    assert steps == [(0, 1), (0, 2), (4, 0), (4, 1), (4, 2)]
    assert proc.wait(120) == 0, proc.communicate()[1]
    rows = {r["id"]: r["interventions"] for r in load_json(out / "results.json")}
    assert rows == {i: ["live"] for i in range(8)}
    assert load_json(out / "summary.json")["interventions"][0]["rows"] == list(range(8))
    refused = run_cli("control", address, "list", "--timeout", 1)
    assert refused.returncode == 1 and "no answer from the engine" in refused.stderr


def test_a_control_socket_beyond_loopback_needs_keys(tmp_path, tiny_folder):
    refused = run_cli("run", "--model", tiny_folder, *RUN, "--control", "tcp://0.0.0.0:5799", "--output-dir",
                      tmp_path / "out", "--quiet")
    assert refused.returncode == 2 and "tcp://0.0.0.0:5799 exposes the bus beyond this machine" in refused.stderr
