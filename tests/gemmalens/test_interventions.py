"""Interventions as data: files, shortcuts, records that rebuild the same edit, and clear refusals."""

import json

import numpy as np
import pytest

from gemmalens.errors import ConfigError
from gemmalens.interventions import load_file, parse, parse_ablate, parse_steer


def test_a_file_reads_arrays_relative_to_itself_and_its_record_rebuilds_the_same_intervention(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(4, dtype=np.float32))
    (tmp_path / "spec.json").write_text(json.dumps([
        {"op": "add", "site": "model.layers.2.resid_out", "vector": "v.npy", "scale": 4, "prompts": [1, 3],
         "positions": "generated", "steps": [1, 5], "name": "towards-v"},
        {"op": "zero", "site": "model.layers.0.self_attn.attn_out", "heads": [0, 2], "groups": ["math"]},
    ]))
    first, second = load_file(tmp_path / "spec.json")
    assert first.array.tolist() == [0, 1, 2, 3] and first.array_path == str((tmp_path / "v.npy").resolve())
    assert first.id == "towards-v" and len(second.id) == 12
    assert first.applies_to(3, None) and not first.applies_to(2, None)
    assert second.applies_to(7, "math") and not second.applies_to(7, "code")
    assert first.in_force(5) and not first.in_force(0) and second.in_force(99)
    record = json.loads(json.dumps(first.record()))  # as run_config.json stores it
    again = parse(record)
    assert again.digest == first.digest and np.array_equal(again.array, first.array)


def test_a_changed_array_file_is_refused_when_the_record_is_read_again(tmp_path):
    np.save(tmp_path / "v.npy", np.ones(3, np.float32))
    record = parse({"op": "set", "site": "model.norm_out", "value": "v.npy"}, tmp_path).record()
    np.save(tmp_path / "v.npy", np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="is not the one the run used"):
        parse(record)


def test_the_digest_names_the_edit_not_where_its_array_lives(tmp_path):
    np.save(tmp_path / "a.npy", np.ones(3, np.float32))
    from_file = parse({"op": "add", "site": "model.norm_out", "vector": "a.npy"}, tmp_path)
    inline = parse({"op": "add", "site": "model.norm_out", "vector": [1.0, 1.0, 1.0]})
    scaled = parse({"op": "add", "site": "model.norm_out", "vector": [1.0, 1.0, 1.0], "scale": 2})
    assert from_file.digest == inline.digest != scaled.digest


def test_shortcuts(tmp_path):
    np.save(tmp_path / "v.npy", np.ones(3, np.float32))
    steer = parse_steer("model.layers.1.resid_out=v.npy*-2.5", tmp_path)
    assert (steer.op, steer.site, steer.scale) == ("add", "model.layers.1.resid_out", -2.5)
    ablate = parse_ablate("model.layers.3.self_attn.attn_out:0,2-4")
    assert (ablate.op, ablate.heads) == ("zero", (0, 2, 3, 4))
    assert parse_ablate("model.layers.3.mlp.hidden").heads is None


@pytest.mark.parametrize("item, message", [
    ([1], "expected an object"),
    ({"op": "scale", "site": "model.norm_out"}, "'op' must be one of add, zero, mean, set, clamp, patch"),
    ({"op": "zero", "site": "layers.1"}, "'site' must be a capture name under 'model.'"),
    ({"op": "zero", "site": "model.norm_out", "vector": [1]}, "unknown field(s) vector for op 'zero'"),
    ({"op": "add", "site": "model.norm_out"}, "needs 'vector'"),
    ({"op": "add", "site": "model.norm_out", "vector": "missing.npy"}, "missing.npy does not exist"),
    ({"op": "add", "site": "model.norm_out", "vector": [1, float("nan")]}, "NaN"),
    ({"op": "add", "site": "model.norm_out", "vector": [1], "scale": "big"}, "scale: expected a finite number"),
    ({"op": "clamp", "site": "model.norm_out", "index": -1, "value": 1}, "index: expected an integer >= 0"),
    ({"op": "patch", "site": "model.norm_out", "source_prompt": 0}, "needs 'source'"),
    ({"op": "zero", "site": "model.norm_out", "positions": "last"}, "positions: expected one of all, prompt"),
    ({"op": "zero", "site": "model.norm_out", "steps": [4, 2]}, "first <= last"),
    ({"op": "zero", "site": "model.norm_out", "prompts": []}, "non-empty list of integers"),
])
def test_what_is_wrong_is_named(tmp_path, item, message):
    with pytest.raises(ConfigError) as error:
        parse(item, tmp_path, "spec.json[0]")
    assert message in str(error.value) and "spec.json[0]" in str(error.value)


def test_a_file_that_is_not_json_is_refused_with_its_line(tmp_path):
    (tmp_path / "bad.json").write_text('[{"op": "zero",\n "site": }]')
    with pytest.raises(ConfigError, match=r"bad.json:2:\d+: invalid JSON"):
        load_file(tmp_path / "bad.json")
