"""Reading configs: flat and nested RoPE keys, layer patterns, GGUF constants, overrides."""

import pytest

from gemmalens.engine.config import apply_overrides, config_from_gguf, config_from_hf
from gemmalens.errors import ConfigError

HF_270M = {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
           "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512,
           "query_pre_attn_scalar": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
           "max_position_embeddings": 32768, "rope_scaling": None, "unrelated_key": 1}


def test_flat_rope_keys_and_default_layer_pattern():
    config = config_from_hf(HF_270M)
    assert config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4 and config.rope_scaling_factor == 1
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]


def test_nested_rope_parameters_per_layer_type():
    raw = {**HF_270M, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    config = config_from_hf(raw)
    assert (config.rope_scaling_factor, config.rope_theta, config.rope_local_base_freq) == (8.0, 1e6, 1e4)


def test_explicit_layer_types_win():
    types = ["sliding_attention", "full_attention"] * 9
    assert config_from_hf({**HF_270M, "layer_types": types}).layer_types == tuple(types)


def test_unsupported_rope_type_is_an_error():
    with pytest.raises(ConfigError, match="RoPE type 'yarn'"):
        config_from_hf({**HF_270M, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_gguf_metadata_uses_gemma3_constants():
    meta = {"gemma3.block_count": 62, "gemma3.embedding_length": 5376, "gemma3.attention.head_count": 32,
            "gemma3.attention.head_count_kv": 16, "gemma3.attention.key_length": 128,
            "gemma3.feed_forward_length": 21504, "gemma3.attention.sliding_window": 1024}
    config = config_from_gguf(meta, 262208)
    assert config.query_pre_attn_scalar == 168 and config.rope_local_base_freq == 1e4
    assert config.layer_types[5] == "full_attention" and config.layer_types[4] == "sliding_attention"


def test_overrides_are_validated():
    config = config_from_hf(HF_270M)
    assert apply_overrides(config, {"sliding_window": 128}).sliding_window == 128
    with pytest.raises(ConfigError, match="sliding_window must be a positive integer"):
        apply_overrides(config, {"sliding_window": 0})
    with pytest.raises(ConfigError, match="sliding_window_pattern must be a positive integer"):
        apply_overrides(config, {"sliding_window_pattern": "6"})
