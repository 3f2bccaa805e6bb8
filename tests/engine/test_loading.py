"""Loading every checkpoint layout, strictly, with specific errors for bad input."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import hf_logits, hf_model, random_weights, relative_error, tiny_config, write_hf_folder

import gemmalens
from gemmalens.engine.config import layer_pattern
from gemmalens.errors import CheckpointError, ConfigError
from gemmalens.engine.loading import embedded_folder

IDS = mx.array([list(range(3, 40))])


@pytest.fixture
def tiny(tmp_path):
    config = tiny_config()
    weights = random_weights(config)
    return config, weights, hf_logits(hf_model(config, weights), IDS[0].tolist())


def test_hf_folder_loads_and_matches_transformers(tmp_path, tiny):
    config, weights, expected = tiny
    model, tokenizer = gemmalens.load(write_hf_folder(tmp_path / "m", config, weights))
    assert relative_error(np.array(model(IDS)[0]), expected) < 1e-5
    assert tokenizer.encode("Hello world") == [2, 9259, 1902]


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_checkpoint_text_part_loads_under_both_prefixes(tmp_path, tiny, prefix):
    config, weights, expected = tiny
    folder = write_hf_folder(tmp_path / "mm", config, weights, prefix=prefix, multimodal=True)
    extra = {"vision_tower.vision_model.embeddings.patch_embedding.weight": mx.zeros((4, 3)),
             "multi_modal_projector.mm_input_projection_weight": mx.zeros((2, 2))}
    mx.save_safetensors(str(folder / "vision.safetensors"), extra)
    model, _ = gemmalens.load(folder)
    assert relative_error(np.array(model(IDS)[0]), expected) < 1e-5


def test_sparse_multimodal_text_config_takes_gemma3_defaults():
    from gemmalens.engine.config import config_from_hf

    config = config_from_hf({"text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                                             "sliding_window": 1024, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}})
    assert (config.vocab_size, config.num_attention_heads, config.num_key_value_heads) == (262208, 8, 4)
    assert (config.rope_theta, config.query_pre_attn_scalar, config.max_position_embeddings) == (1e6, 256, 131072)
    assert config.rope_scaling_factor == 8.0 and config.layer_types[5] == "full_attention"


def test_sharded_safetensors_with_index(tmp_path, tiny):
    config, weights, expected = tiny
    folder = write_hf_folder(tmp_path / "s", config, weights)
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        mx.save_safetensors(str(folder / file), {n: mx.array(weights[n]) for n in part})
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = gemmalens.load(folder)
    assert relative_error(np.array(model(IDS)[0]), expected) < 1e-5


def _quantized_folder(folder: Path, source: Path, group_size=64, bits=4, overrides=None):
    """An mlx-community-style folder of the 270M weights quantized by mlx.core.quantize; also the dequantized weights."""
    folder.mkdir()
    weights = mx.load(str(source / "model.safetensors"))
    stored, dense = {}, {}
    overrides = overrides or {}
    for name, value in weights.items():
        module = name[: -len(".weight")]
        if value.ndim == 2:
            g, b = overrides.get(module, (group_size, bits))
            q, scales, biases = mx.quantize(value, group_size=g, bits=b)
            stored.update({name: q, f"{module}.scales": scales, f"{module}.biases": biases})
            dense[name] = mx.dequantize(q, scales, biases, group_size=g, bits=b)
        else:
            stored[name] = dense[name] = value
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits,
                              **{m: {"group_size": g, "bits": b} for m, (g, b) in overrides.items()}}
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), stored)
    for file in source.glob("tokenizer*"):
        shutil.copy(file, folder / file.name)
    return dense


@pytest.mark.real
def test_mlx_quantized_folder_matches_dequantized_reference(tmp_path, real):
    reference, tokenizer = real
    overrides = {"model.layers.0.mlp.down_proj": (32, 8), "model.layers.3.self_attn.q_proj": (128, 2)}
    dense = _quantized_folder(tmp_path / "q", embedded_folder(), group_size=64, bits=4, overrides=overrides)
    model, _ = gemmalens.load(tmp_path / "q")
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    down = model.model.layers[0].mlp.down_proj
    assert (down.group_size, down.bits) == (32, 8)
    assert model.model.layers[3].self_attn.q_proj.bits == 2
    reference.load_weights(list(dense.items()))
    ids = mx.array([tokenizer.encode("The quick brown fox jumps over the lazy dog because")])
    try:
        assert relative_error(np.array(model(ids)), np.array(reference(ids))) < 1e-4
    finally:
        reference.load_weights(list(mx.load(str(embedded_folder() / "model.safetensors")).items()))


def _offline_hub(monkeypatch, cache: Path):
    """huggingface_hub reads its environment at import: point its constants at a local cache, offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_id_resolves_from_the_local_hub_cache_offline(tmp_path, tiny, monkeypatch):
    config, weights, expected = tiny
    repo = tmp_path / "hub" / "models--someone--tiny-gemma"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    write_hf_folder(snapshot, config, weights)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    _offline_hub(monkeypatch, tmp_path / "hub")
    model, _ = gemmalens.load("someone/tiny-gemma")
    assert relative_error(np.array(model(IDS)[0]), expected) < 1e-5


def test_unknown_hub_id_without_network_or_cache_says_what_to_do(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"nobody/nothing.*not in the Hugging Face cache.*huggingface-cli download"):
        gemmalens.load("nobody/nothing")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        gemmalens.load(str(tmp_path / "absent.gguf"))


def test_corrupt_safetensors_names_the_file(tmp_path, tiny):
    config, weights, _ = tiny
    folder = write_hf_folder(tmp_path / "c", config, weights)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors"):
        gemmalens.load(folder)


def test_corrupt_gguf_is_a_specific_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(CheckpointError, match="broken.gguf: not a readable GGUF file"):
        gemmalens.load(bad)


def test_wrong_shape_names_tensor_and_expected_shape(tmp_path, tiny):
    config, weights, _ = tiny
    weights = dict(weights)
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:, :10]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(128, 10\), expected \(128, 64\)"):
        gemmalens.load(write_hf_folder(tmp_path / "w", config, weights))


def test_missing_and_unexpected_tensors_are_named(tmp_path, tiny):
    config, weights, _ = tiny
    missing = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight is missing \(expected shape \(64,\)\)"):
        gemmalens.load(write_hf_folder(tmp_path / "m", config, missing))
    extra = {**weights, "model.layers.9.mlp.up_proj.weight": weights["model.layers.1.mlp.up_proj.weight"]}
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.9\.mlp\.up_proj\.weight"):
        gemmalens.load(write_hf_folder(tmp_path / "u", config, extra))


def test_unknown_model_config_key_is_named(tmp_path, tiny):
    config, weights, _ = tiny
    folder = write_hf_folder(tmp_path / "k", config, weights)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'sliding_windw'.*valid keys are"):
        gemmalens.load(folder, model_config={"sliding_windw": 4})


def test_model_config_override_rebuilds_layer_pattern(tmp_path, tiny):
    config, weights, _ = tiny
    model, _ = gemmalens.load(write_hf_folder(tmp_path / "o", config, weights), model_config={"sliding_window_pattern": 4})
    assert model.config.layer_types == ("sliding_attention",) * 3 + ("full_attention",)


def test_tokenizer_config_is_validated(tmp_path, tiny):
    config, weights, _ = tiny
    folder = write_hf_folder(tmp_path / "t", config, weights)
    gemmalens.load(folder, tokenizer_config={"padding_side": "left"})
    with pytest.raises(ConfigError, match="padding_side 'right' is not supported"):
        gemmalens.load(folder, tokenizer_config={"padding_side": "right"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'paddingside'"):
        gemmalens.load(folder, tokenizer_config={"paddingside": "left"})


def test_float16_is_refused_with_the_reason(tmp_path, tiny):
    config, weights, _ = tiny
    with pytest.raises(ConfigError, match="float16.*overflow.*bfloat16"):
        gemmalens.load(write_hf_folder(tmp_path / "f", config, weights), dtype="float16")


def test_bfloat16_load_casts_weights(tmp_path, tiny):
    config, weights, _ = tiny
    model, _ = gemmalens.load(write_hf_folder(tmp_path / "b", config, weights), dtype="bfloat16")
    assert model.dtype == mx.bfloat16 and model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16


def test_gguf_file_converts_once_into_the_cache(tmp_path, monkeypatch):
    """A Q8_0 GGUF, written as llama.cpp writes one: dequantized, norms' +1 removed, config and tokenizer
    rebuilt, converted once; no half-converted folder stays behind."""
    from helpers import tiny_vocabulary, write_gguf

    from gemmalens.engine.loading import gguf_folder

    monkeypatch.setenv("GEMMALENS_CACHE", str(tmp_path / "cache"))
    config = tiny_config(vocab_size=512, sliding_window=512, layer_types=layer_pattern(4, 6))
    expected = write_gguf(tmp_path / "tiny.gguf", config, random_weights(config), tiny_vocabulary())
    folder = gguf_folder(tmp_path / "tiny.gguf")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_folder(tmp_path / "tiny.gguf") == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    converted = mx.load(str(folder / "model.safetensors"))
    assert sorted(converted) == sorted(expected)
    assert all(np.array_equal(np.array(converted[k]), expected[k]) for k in expected)
    model, tokenizer = gemmalens.load(tmp_path / "tiny.gguf")
    assert model.config.num_hidden_layers == 4 and model.config.layer_types == config.layer_types
    ids = tokenizer.encode("ab cd")  # bos, then the merges: 'ab', '▁', 'cd' (no '▁c' piece)
    assert ids == [2, 268, 261, 270] and tokenizer.decode(ids) == "ab cd"
    assert not list((tmp_path / "cache" / "models").glob("*.partial*"))


def test_a_failed_conversion_leaves_nothing_and_a_dead_ones_leftovers_are_removed(tmp_path, monkeypatch):
    from helpers import tiny_vocabulary, write_gguf

    from gemmalens.engine.loading import gguf_folder

    monkeypatch.setenv("GEMMALENS_CACHE", str(tmp_path / "cache"))
    stale = tmp_path / "cache" / "models" / "old-model.partial999999999"
    stale.mkdir(parents=True)
    config = tiny_config(vocab_size=512)
    write_gguf(tmp_path / "tiny.gguf", config, random_weights(config), tiny_vocabulary())
    import gemmalens.engine.loading as loading

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading, "tokenizer_from_gguf", broken)
    with pytest.raises(CheckpointError, match="the disk is full|No space left"):
        gguf_folder(tmp_path / "tiny.gguf")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # neither its own partial folder nor the stale one
