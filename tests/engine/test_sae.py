"""Gemma Scope 2 SAEs and transcoders, written by the tests in the published layout: loading and its refusals,
features and reconstruction error as capture points, feature interventions."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_generator, write_sae

import gemmalens
from gemmalens.engine.editing import prepare
from gemmalens.engine.sae import load_sae
from gemmalens.errors import CheckpointError, ConfigError
from gemmalens.interventions import parse

ROWS = ["a short one", "a somewhat longer prompt than that"]
SITE = "model.layers.1.resid_out"


@pytest.fixture(scope="module")
def tiny():
    return tiny_generator()


@pytest.fixture
def resid(tmp_path):
    weights = write_sae(tmp_path, "resid_post/layer_1_width_48_l0_small", "model.layers.1.output", 64)
    return load_sae(tmp_path / "resid_post/layer_1_width_48_l0_small"), weights


def jumprelu(x, w):
    pre = x @ w["w_enc"] + w["b_enc"]
    return np.where(pre > w["threshold"], pre, 0.0)


def test_loading_names_the_sae_and_maps_its_hook_point(resid, tiny):
    sae, weights = resid
    assert (sae.name, sae.site, sae.site_out, sae.kind, sae.width) == (
        "resid_post_layer_1_width_48_l0_small", SITE, SITE, "sae", 48)
    sae.check(tiny[0].config)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    assert np.allclose(np.array(sae.encode(mx.array(x))), jumprelu(x, weights), atol=1e-5)


@pytest.mark.parametrize("folder, hook, message", [
    ("resid_post/layer_1_width_48_l0_small", "model.layers.1.self_attn.o_proj.input", "do not belong together"),
    ("resid_post/layer_2_width_48_l0_small", "model.layers.1.output", "the folder says layer 2"),
    ("resid_post/layer_1_width_48_l0_small", "blocks.1.hook_resid_post", "is not one gemmalens maps"),
])
def test_a_mismatched_hook_point_is_refused(tmp_path, folder, hook, message):
    write_sae(tmp_path, folder, hook, 64)
    with pytest.raises(ConfigError, match=message):
        load_sae(tmp_path / folder)


def test_an_sae_of_another_model_size_is_refused(tmp_path, tiny):
    write_sae(tmp_path, "resid_post/layer_1_width_48_l0_small", "model.layers.1.output", 640)
    with pytest.raises(ConfigError, match="d_in 640 but the model's model.layers.1.resid_out has 64"):
        load_sae(tmp_path / "resid_post/layer_1_width_48_l0_small").check(tiny[0].config)
    write_sae(tmp_path, "resid_post/layer_9_width_48_l0_small", "model.layers.9.output", 64)
    with pytest.raises(ConfigError, match="reads layer 9; the model has 4 layers"):
        load_sae(tmp_path / "resid_post/layer_9_width_48_l0_small").check(tiny[0].config)


def test_a_hub_id_reads_the_local_hub_cache_and_offline_says_what_to_download(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--google--gemma-scope-2-270m-pt" / "snapshots" / "abc123"
    write_sae(snapshot, "resid_post/layer_1_width_48_l0_small", "model.layers.1.output", 64)
    (tmp_path / "hub" / "models--google--gemma-scope-2-270m-pt" / "refs").mkdir()
    (tmp_path / "hub" / "models--google--gemma-scope-2-270m-pt" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sae = load_sae("google/gemma-scope-2-270m-pt/resid_post/layer_1_width_48_l0_small")
    assert sae.site == SITE
    with pytest.raises(CheckpointError, match="huggingface-cli download google/gemma-scope-2-1b-pt"):
        load_sae("google/gemma-scope-2-1b-pt/resid_post/layer_1_width_48_l0_small")


def test_features_and_error_are_capture_points_equal_to_numpy(resid, tiny):
    sae, weights = resid
    model, tokenizer = tiny
    names = [SITE, f"sae.{sae.name}.features", f"sae.{sae.name}.error"]
    _, values = gemmalens.run_with_capture(model, tokenizer, ROWS, names, saes=[sae])
    x = np.array(values[SITE])
    features = np.array(values[names[1]])
    assert features.shape == (2, x.shape[1], 48)
    assert np.allclose(features, jumprelu(x, weights), atol=1e-4)
    fired = (features[1] > 0).mean()
    assert 0.05 < fired < 0.95
    reconstruction = features @ weights["w_dec"] + weights["b_dec"]
    error = ((x - reconstruction) ** 2).sum(-1) / (x ** 2).sum(-1)
    assert np.allclose(np.array(values[names[2]]), error, rtol=1e-4)


def test_transcoders_read_the_mlp_input_and_measure_against_its_output(tmp_path, tiny):
    model, tokenizer = tiny
    weights = write_sae(tmp_path, "transcoder/layer_2_width_48_l0_big_affine",
                        "model.layers.2.pre_feedforward_layernorm.output", 64, kind="transcoder", skip=True,
                        hook_out="model.layers.2.post_feedforward_layernorm.output")
    sae = load_sae(tmp_path / "transcoder/layer_2_width_48_l0_big_affine")
    assert (sae.site, sae.site_out, sae.kind) == ("model.layers.2.pre_feedforward_layernorm_out",
                                                  "model.layers.2.post_feedforward_layernorm_out", "transcoder")
    names = [sae.site, sae.site_out, f"sae.{sae.name}.features", f"sae.{sae.name}.error"]
    _, values = gemmalens.run_with_capture(model, tokenizer, ROWS[:1], names, saes=[sae])
    x, y = np.array(values[names[0]]), np.array(values[names[1]])
    predicted = jumprelu(x, weights) @ weights["w_dec"] + weights["b_dec"] + x @ weights["affine_skip_connection"]
    assert np.allclose(np.array(values[names[3]]), ((y - predicted) ** 2).sum(-1) / (y ** 2).sum(-1), rtol=1e-4)


def test_add_feature_equals_add_of_the_decoder_row(resid, tiny):
    sae, weights = resid
    model, tokenizer = tiny
    by_feature = parse({"op": "add_feature", "sae": sae.name, "feature": 5, "scale": 3.0})
    by_vector = gemmalens.steer(SITE, weights["w_dec"][5], scale=3.0)
    a, _ = gemmalens.run_with_capture(model, tokenizer, ROWS, interventions=[by_feature], saes=[sae])
    b, _ = gemmalens.run_with_capture(model, tokenizer, ROWS, interventions=[by_vector])
    assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("op, value", [("clamp_feature", 7.5), ("ablate_feature", 0.0)])
def test_clamping_a_feature_keeps_the_error_term(resid, tiny, op, value):
    sae, weights = resid
    model, tokenizer = tiny
    _, values = gemmalens.run_with_capture(model, tokenizer, ROWS, [SITE], saes=[sae])
    x = np.array(values[SITE])
    item = {"op": op, "sae": sae.name, "feature": 3, "prompts": [1]} | ({"value": value} if op == "clamp_feature" else {})
    _, edited = gemmalens.run_with_capture(model, tokenizer, ROWS, [SITE], interventions=[parse(item)], saes=[sae])
    f = jumprelu(x, weights)[..., 3:4]
    expected = x.copy()
    pad = values.pad[1]
    expected[1, pad:] += ((value - f) * weights["w_dec"][3])[1, pad:]
    assert np.allclose(np.array(edited[SITE]), expected, atol=1e-4)
    assert np.array_equal(np.array(edited[SITE])[0], x[0])


def test_feature_ops_need_a_known_sae_and_feature(resid, tiny):
    sae, _ = resid
    model, _ = tiny
    with pytest.raises(ConfigError, match="no SAE named 'other'"):
        prepare([parse({"op": "ablate_feature", "sae": "other", "feature": 1})], model.config, [sae])
    with pytest.raises(ConfigError, match="feature 48 outside 0-47"):
        prepare([parse({"op": "ablate_feature", "sae": sae.name, "feature": 48})], model.config, [sae])


def test_the_monitor_keeps_each_saes_means_and_the_last_tokens_strongest_features(resid, tiny):
    from gemmalens.engine.events import ResultEvent
    from gemmalens.engine.generation import GenerationConfig, generate
    from gemmalens.engine.sae import SaeMonitor
    from gemmalens.engine.sampling import SamplingParams
    from gemmalens.prompts import Prompt

    sae, weights = resid
    model, tokenizer = tiny
    monitor = SaeMonitor([sae])
    config = GenerationConfig(max_tokens=1, sampling=SamplingParams(0.0, 1.0, None, 1.0), seed=1, batch_size=2)
    events = list(generate(model, tokenizer, [Prompt(0, ROWS[0]), Prompt(1, ROWS[1])], config, saes=[sae],
                           monitor=monitor))
    assert sum(isinstance(e, ResultEvent) for e in events) == 2
    _, values = gemmalens.run_with_capture(model, tokenizer, ROWS, [SITE])
    x = np.array(values[SITE])
    real = [x[r, values.pad[r]:] for r in range(2)]
    features = [jumprelu(v, weights) for v in real]
    reconstruction = [f @ weights["w_dec"] + weights["b_dec"] for f in features]
    errors = np.concatenate([((v - r) ** 2).sum(-1) / (v ** 2).sum(-1) for v, r in zip(real, reconstruction)])
    summary = monitor.summary()[sae.name]
    assert summary["positions"] == len(errors)
    assert np.isclose(summary["mean_error"], errors.mean(), rtol=1e-4)
    assert np.isclose(summary["mean_l0"], np.concatenate([(f > 0).sum(-1) for f in features]).mean())
    last = features[0][-1]
    strongest = [int(i) for i in np.argsort(-last)[:5] if last[i] > 0]
    assert [f for f, _ in summary["top_features"]] == strongest


def test_generation_archives_features_at_every_step(resid, tiny, tmp_path):
    sae, weights = resid
    model, tokenizer = tiny
    name = f"sae.{sae.name}.features"
    gemmalens.batch_generate(model, tokenizer, ROWS, max_tokens=3, temperature=0, saes=[sae],
                             save_activations_dir=tmp_path / "acts", capture=[SITE, name])
    archive = gemmalens.open_activations(tmp_path / "acts")
    for prompt in (0, 1):
        positions, x = archive.trajectory(SITE, prompt)
        feature_positions, features = archive.trajectory(name, prompt)
        assert np.array_equal(positions, feature_positions) and len(positions) == len(tokenizer.encode(ROWS[prompt])) + 2
        assert np.allclose(features, jumprelu(x, weights), atol=1e-4)


def test_features_travel_and_are_stored_as_their_nonzeros(resid, tiny, tmp_path):
    sae, weights = resid
    model, tokenizer = tiny
    name = f"sae.{sae.name}.features"
    gemmalens.batch_generate(model, tokenizer, ROWS, max_tokens=3, temperature=0, saes=[sae],
                             save_activations_dir=tmp_path / "acts", capture=[SITE, name])
    with np.load(tmp_path / "acts" / "activations_step_0_batch_0.npz") as step:
        assert name not in step.files
        counts, indices = step[name + ".sparse_counts"], step[name + ".sparse_indices"]
        assert counts.shape == step[name + ".positions"].shape and counts.sum() == len(indices)
        assert int(step[name + ".sparse_width"]) == 48
    archive = gemmalens.open_activations(tmp_path / "acts")
    positions, dense = archive.trajectory(name, 1)
    _, sparse = archive.trajectory(name, 1, sparse=True)
    assert sparse.shape == dense.shape and np.array_equal(sparse.dense(), dense)
    assert len(sparse.values) == int((dense != 0).sum()) < dense.size


def test_clamping_a_transcoder_feature_edits_the_mlp_output_it_predicts(tmp_path, tiny):
    model, tokenizer = tiny
    weights = write_sae(tmp_path, "transcoder/layer_2_width_48_l0_big", "model.layers.2.pre_feedforward_layernorm.output",
                        64, kind="transcoder", hook_out="model.layers.2.post_feedforward_layernorm.output")
    sae = load_sae(tmp_path / "transcoder/layer_2_width_48_l0_big")
    names = [sae.site, sae.site_out]
    _, plain = gemmalens.run_with_capture(model, tokenizer, ROWS[:1], names, saes=[sae])
    clamp = parse({"op": "clamp_feature", "sae": sae.name, "feature": 4, "value": 5.0})
    _, edited = gemmalens.run_with_capture(model, tokenizer, ROWS[:1], names, interventions=[clamp], saes=[sae])
    x, y = np.array(plain[sae.site]), np.array(plain[sae.site_out])
    assert np.array_equal(np.array(edited[sae.site]), x)  # the MLP's input is read, not edited
    expected = y + (5.0 - jumprelu(x, weights)[..., 4:5]) * weights["w_dec"][4]
    assert np.allclose(np.array(edited[sae.site_out]), expected, atol=1e-4)


def test_two_saes_of_one_name_are_refused(resid, tiny):
    from gemmalens.engine.sae import attach

    sae, _ = resid
    with pytest.raises(ConfigError, match="two attached SAEs have the same name"):
        attach([sae, sae], tiny[0].config)
