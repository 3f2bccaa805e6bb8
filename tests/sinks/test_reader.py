"""Reading what the archiver wrote: run folders and group roots, a repr that says what is inside, attention
trajectories, sampling tables, the spellings `names` prints, and near names for a wrong one."""

import numpy as np
import pytest
from helpers import tiny_generator

import gemmalens
from gemmalens.sinks.reader import open_activations

CAPTURE = ["model.layers.1.resid_out", "model.layers.0.self_attn.attn_weights", "generate.*.sample.token",
           "generate.*.sample.token_prob", "generate.*.sample.softmax_probs"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    model, tokenizer = tiny_generator(seed=2)
    results = gemmalens.batch_generate(model, tokenizer, ["a longer first prompt here", "short"], max_tokens=4,
                                       temperature=0.8, seed=3, save_activations_dir=folder / "activations",
                                       capture=CAPTURE, progress=False)
    return folder, results


def test_a_run_folder_opens_and_says_what_it_holds(run):
    folder, _ = run
    archive = open_activations(folder)
    assert archive.prompts == [0, 1]
    assert archive.names == ["generate.step_{k}.sample.softmax_probs", "generate.step_{k}.sample.token",
                             "generate.step_{k}.sample.token_prob", "model.layers.0.self_attn.attn_weights",
                             "model.layers.1.resid_out"]
    assert repr(archive).startswith(f"<ActivationArchive {folder / 'activations'}: 2 prompts, up to 4 steps, 5 names")


def test_a_wrong_name_is_answered_with_the_nearest_names(run):
    archive = open_activations(run[0])
    with pytest.raises(KeyError, match="nearest names: model.layers.1.resid_out"):
        archive.get("model.layers.1.resid_outt")


def test_sampling_values_read_under_the_names_names_prints_and_as_a_table(run):
    archive, results = open_activations(run[0]), run[1]
    for spelling in ("generate.step_{k}.sample.token", "generate.step_2.sample.token"):
        values = archive.get(spelling, [0])[0]
        assert values and all(int(v.reshape(-1)[0]) == archive.tokens[0][k] for k, (_, v) in values.items())
    assert sorted(archive.get("generate.step_2.sample.token", [0])[0]) == [2]
    table = archive.sampling(0, top=3)
    assert [row["token"] for row in table] == results[0].tokens
    for row in table:
        assert row["position"] == len(results[0].prompt_tokens) + row["step"]
        assert 0 < row["token_prob"] <= 1 and len(row["top_tokens"]) == 3
        assert row["top_probs"] == sorted(row["top_probs"], reverse=True)
    positions, probs = archive.trajectory("generate.step_{k}.sample.token_prob", 0)
    assert positions.tolist() == [row["position"] for row in table]
    assert np.allclose(probs.reshape(-1), [row["token_prob"] for row in table])


def test_attention_trajectories_are_padded_to_the_longest_key_range(run):
    archive, results = open_activations(run[0]), run[1]
    positions, weights = archive.trajectory("model.layers.0.self_attn.attn_weights", 1)
    length = len(results[1].prompt_tokens) + len(results[1].tokens) - 1  # the last token is never fed
    assert positions.tolist() == list(range(length)) and weights.shape == (4, length, length)
    assert np.allclose(weights.sum(axis=-1), 1.0, atol=1e-5)  # each query's weights over the keys it sees
    assert np.all(np.triu(weights, k=1) == 0)  # keys after the query hold 0


def test_a_group_root_opens_every_group(tmp_path):
    model, tokenizer = tiny_generator()
    for group, prompts in (("a", ["one"]), ("b", ["two", "three"])):
        gemmalens.batch_generate(model, tokenizer, prompts, max_tokens=2, temperature=0,
                                 save_activations_dir=tmp_path / group / "activations",
                                 capture=["model.layers.0.resid_out"], progress=False)
    archive = open_activations(tmp_path)
    assert set(archive.groups) == {"a", "b"} and archive.names == ["model.layers.0.resid_out"]
    assert repr(archive).startswith("<GroupedArchive 2 groups (a, b)")


def test_a_folder_without_activations_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="was the run made with --save-activations"):
        open_activations(tmp_path)
