"""Every command block a user would copy from the README and docs/ runs, verbatim apart from ports, folders and
the engine's host, and its outputs are checked. (The README's main command runs in a fresh venv in .ci/run.)"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, load_json

pytestmark = pytest.mark.real


def recipe(document: str, name: str) -> str:
    """The fenced block after ``<!-- recipe: NAME -->`` in a document of the repository."""
    text = (ROOT / document).read_text()
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"{document} has no recipe {name}"
    return match.group(1)


def commands(block: str, **replace) -> list[str]:
    out = []
    for line in block.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            for old, new in replace.items():
                line = line.replace(old, str(new))
            out.append(line)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shell(line, cwd, **kwargs):
    """A README line as a user's shell runs it, with `gemmalens` being this Python's."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_the_separate_processes_recipe(tmp_path):
    lines = commands(recipe("README.md", "separate-processes"), **{"127.0.0.1:5555": f"127.0.0.1:{free_port()}",
                                                                   "127.0.0.1:5556": f"127.0.0.1:{free_port()}"})
    assert [line.split()[1] for line in lines] == ["sink", "sink", "sink", "engine"]
    processes = [shell(line, tmp_path) for line in lines]
    outcomes = [(p.wait(300), p.communicate()) for p in processes]
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], outcomes
    assert load_json(tmp_path / "out" / "summary.json")["complete"]
    assert load_json(tmp_path / "out" / "activations" / "activations_index.json")["complete"]


def test_the_across_machines_recipe_with_keys(tmp_path):
    port = free_port()
    lines = commands(recipe("README.md", "across-machines"), **{"ENGINE:5555": f"127.0.0.1:{port}",
                                                                "0.0.0.0:5555": f"0.0.0.0:{port}"})
    for line in lines[:3]:  # the keys, the allowed folder
        done = shell(line, tmp_path)
        assert done.wait(60) == 0, done.communicate()
    engine, sink = shell(lines[3], tmp_path), shell(lines[4], tmp_path)
    assert engine.wait(300) == 0, engine.communicate()
    assert sink.wait(60) == 0, sink.communicate()
    assert load_json(tmp_path / "out" / "summary.json")["complete"]


def test_the_main_command_then_the_reading_snippet(tmp_path):
    main = commands(recipe("README.md", "main"))[0].split("&&", 1)[1].strip()
    main = main.replace("--max-tokens 32", "--max-tokens 4")  # shorter, the rest verbatim
    done = shell(main, tmp_path)
    assert done.wait(300) == 0, done.communicate()
    read = subprocess.run([sys.executable, "-c", recipe("README.md", "read")], cwd=tmp_path, capture_output=True,
                          text=True)
    assert read.returncode == 0, read.stderr
    assert read.stdout.startswith("<ActivationArchive") and "8 prompts" in read.stdout


def test_the_reading_snippet_of_the_outputs_page(tmp_path):
    main = commands(recipe("README.md", "main"))[0].split("&&", 1)[1].strip().replace("--max-tokens 32",
                                                                                        "--max-tokens 3")
    done = shell(main + " --capture 'generate.*.sample.token*' --capture 'model.layers.5.*'", tmp_path)
    assert done.wait(300) == 0, done.communicate()
    snippet = recipe("docs/outputs.md", "reading") + "\nprint(positions.shape, weights.shape, len(acts.sampling(3)))"
    read = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True)
    assert read.returncode == 0, read.stderr
    match = re.search(r"\((\d+),\) \(4, (\d+), (\d+)\) 3$", read.stdout.strip())
    assert match and len(set(match.groups())) == 1, read.stdout  # T positions, [heads, T, T] weights, 3 steps


def test_the_decoding_snippet_of_the_protocol_page():
    import numpy as np
    from helpers import Engine

    values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    message = Engine().activation(0, 1, "model.layers.0.resid_out", values, codec="lz4", slot=5, pads=[0, 2])

    class Socket:
        def recv_multipart(self):
            return [bytes(part) for part in message]

    namespace = {"socket": Socket()}
    exec(recipe("docs/protocol.md", "decode"), namespace)
    assert np.array_equal(namespace["array"], values)
    assert namespace["positions"].tolist() == [[5, 6, 7], [3, 4, 5]]


def test_the_python_api_snippet(tmp_path):
    done = subprocess.run([sys.executable, "-c", recipe("README.md", "api")], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    shapes = re.search(r"\(1, (\d+), 262144\) \(1, 4, (\d+), (\d+)\)", done.stdout)
    assert shapes and len(set(shapes.groups())) == 1, done.stdout  # logits and attention over the same tokens
    assert load_json(tmp_path / "activations" / "activations_index.json")["complete"]


def test_the_subscriber_recipe(tmp_path):
    (tmp_path / "norms.py").write_text(recipe("docs/subscribers.md", "norms.py"))
    done = shell(commands(recipe("docs/subscribers.md", "attach"))[0], tmp_path)
    assert done.wait(300) == 0, done.communicate()
    norms = json.loads((tmp_path / "norms.json").read_text())
    assert norms["complete"] and len(norms["norms"]) == 8 and all(len(n) == 8 for n in norms["norms"].values())


def test_the_interventions_recipes(tmp_path):
    block = recipe("docs/interventions.md", "cli").replace("--max-tokens 8", "--max-tokens 3")
    done = shell("set -e\n" + block, tmp_path)
    assert done.wait(300) == 0, done.communicate()
    rows = {r["id"]: r["interventions"] for r in load_json(tmp_path / "steered" / "results.json")}
    assert len(rows[0]) == 2 and rows[0][1] == "towards-v" and all(rows[i] == ["towards-v"] for i in range(2, 8))
    assert load_json(tmp_path / "steered2" / "summary.json")["complete"]
    (tmp_path / "probe.py").write_text(recipe("docs/interventions.md", "probe.py"))
    line = commands(recipe("docs/interventions.md", "probe"), **{"--max-tokens 8": "--max-tokens 3",
                                                                  "/tmp/probe-control": tmp_path / "control"})[0]
    probed = shell(line, tmp_path)
    assert probed.wait(300) == 0, probed.communicate()
    summary = load_json(tmp_path / "probed" / "summary.json")
    assert summary["complete"] and summary["interventions"] and summary["interventions"][0]["scale"] == -1.0


def test_the_readme_names_every_run_option():
    from gemmalens.cli.main import run

    readme = (ROOT / "README.md").read_text()
    missing = [opt for param in run.params if not getattr(param, "hidden", False) for opt in param.opts[:1]
               if opt.startswith("--") and opt not in readme and opt != "--help"]
    assert missing == []


def test_recipes_are_what_the_shell_would_run():
    for name in ("separate-processes", "across-machines"):
        for line in commands(recipe("README.md", name)):
            assert shlex.split(line)  # balanced quotes
