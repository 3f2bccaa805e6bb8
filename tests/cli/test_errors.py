"""Bad input: one clear paragraph, the right exit code, and nothing already written lost."""

import json

import pytest
from helpers import run_cli

from gemmalens.cli.main import safe_folder_name

BAD_VALUES = [
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--max-tokens", "0"], "max-tokens"),
    (["--batch-size", "0"], "batch-size"),
    (["--repetition-penalty", "0"], "repetition-penalty"),
    (["--positions", "middle"], "positions"),
    (["--archiver-processes", "0"], "archiver-processes"),
]


@pytest.mark.parametrize("args,option", BAD_VALUES)
def test_invalid_values_are_usage_errors_naming_the_option(tmp_path, args, option):
    out = run_cli("run", *args, "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert out.returncode == 2
    assert f"--{option}" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("content,message", [
    ('{"a": {"b": ["x",]}}', r"bad.json:1:18: invalid JSON"),
    ('{"cat": {"sub": ["ok", "fine", "good", 42]}}', r"cat\.sub\[3\]: expected a string, got 42"),
    ('{"cat": {"sub": ["ok", "  "]}}', r"cat\.sub\[1\]: empty prompt"),
    ('"just a string"', r"expected a list of prompts or an object of categories"),
])
def test_malformed_prompts_files_say_where(tmp_path, content, message):
    import re

    path = write(tmp_path, "bad.json", content)
    out = run_cli("run", "--prompts-file", path, "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr
    assert "Traceback" not in out.stderr


def test_missing_prompts_file_says_how_to_make_one(tmp_path):
    out = run_cli("run", "--prompts-file", tmp_path / "nope.json", cwd=tmp_path)
    assert out.returncode == 2 and "no such prompts file" in out.stderr and "--create-sample-prompts" in out.stderr


def test_duplicate_prompts_are_warned_not_refused(tmp_path):
    from gemmalens.prompts import parse_prompts

    with pytest.warns(UserWarning, match=r"b\[0\] duplicates a\[0\]"):
        assert len(parse_prompts({"a": ["same"], "b": ["same"]})) == 2


@pytest.mark.real
def test_unknown_model_fails_without_touching_earlier_results(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "results.json").write_text('["earlier"]')
    out = run_cli("run", "--model", tmp_path / "missing.gguf", "--output-dir", out_dir, cwd=tmp_path)
    assert out.returncode == 1 and "missing.gguf: no such file or folder" in out.stderr
    assert "Traceback" not in out.stderr and (out_dir / "results.json").read_text() == '["earlier"]'


@pytest.mark.real
def test_unknown_capture_pattern_lists_near_names(tmp_path):
    out = run_cli("run", "--capture", "model.layers.0.mlp.gate", "--output-dir", tmp_path / "o", cwd=tmp_path)
    assert out.returncode == 2 and "nearest names" in out.stderr and "gate_proj_out" in out.stderr


@pytest.mark.real
def test_unwritable_output_folder_is_a_failure(tmp_path):
    blocker = write(tmp_path, "file", "x")
    out = run_cli("run", "--output-dir", blocker / "sub", "--max-tokens", 1, cwd=tmp_path)
    assert out.returncode == 1 and "is not writable" in out.stderr and "--output-dir" in out.stderr and "Traceback" not in out.stderr


def test_create_sample_prompts_never_overwrites(tmp_path):
    path = write(tmp_path, "mine.json", '["keep me"]')
    out = run_cli("run", "--create-sample-prompts", path, cwd=tmp_path)
    assert out.returncode == 2 and "exists" in out.stderr and json.loads(path.read_text()) == ["keep me"]


@pytest.mark.parametrize("category,folder", [("../../etc", "%2E.%2F..%2Fetc"), ("a/b", "a%2Fb"), ("a_b", "a_b"),
                                             ("..", "%2E."), ("...", "%2E.."), ("Science & Maths", "Science%20%26%20Maths"),
                                             ("v1.2", "v1.2"), ("日本", "%E6%97%A5%E6%9C%AC")])
def test_group_folders_stay_inside_the_output_folder_one_per_category(category, folder):
    assert safe_folder_name(category) == folder and "/" not in folder and not folder.startswith(".")


def test_verbose_shows_the_traceback(tmp_path):
    out = run_cli("run", "--prompts-file", tmp_path / "nope.json", "--verbose", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and "gemmalens, version" in out.stdout
