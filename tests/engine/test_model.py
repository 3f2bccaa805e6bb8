"""The model against transformers' Gemma3ForCausalLM on tiny random configs covering what 270M does not."""

import gc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import hf_logits, hf_model, mlx_model, random_weights, relative_error, tiny_config

from gemmalens.engine.config import layer_pattern
from gemmalens.engine.model import MLP, Attention, attention_mask

CONFIGS = {
    "kv_heads_2": tiny_config(),
    "head_dim_128_scalar_168": tiny_config(head_dim=128, query_pre_attn_scalar=168.0, num_attention_heads=2,
                                           num_key_value_heads=1),
    "linear_rope_scaling_global_only": tiny_config(rope_scaling_factor=8.0, layer_types=layer_pattern(4, 2)),
    "one_kv_head_pattern_6": tiny_config(num_hidden_layers=6, layer_types=layer_pattern(6, 6), num_key_value_heads=1),
    "grouped_8_to_4": tiny_config(num_attention_heads=8, num_key_value_heads=4, head_dim=16),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers_beyond_the_sliding_window(name):
    config = CONFIGS[name]
    weights = random_weights(config, seed=1)
    ids = list(np.random.default_rng(2).integers(3, config.vocab_size, size=3 * config.sliding_window + 5).tolist())
    ours = np.array(mlx_model(config, weights)(mx.array([ids]))[0])
    assert relative_error(ours, hf_logits(hf_model(config, weights), ids)) < 1e-5


def test_rope_scaling_changes_only_global_layers():
    base = tiny_config(layer_types=("sliding_attention",) * 4)
    weights = random_weights(base)
    ids = mx.array([list(range(3, 40))])
    plain = mlx_model(base, weights)(ids)
    scaled = mlx_model(tiny_config(layer_types=("sliding_attention",) * 4, rope_scaling_factor=8.0), weights)(ids)
    assert mx.array_equal(plain, scaled)


def test_cached_decode_equals_full_recomputation():
    config = tiny_config()
    model = mlx_model(config, random_weights(config))
    ids = mx.array(np.random.default_rng(3).integers(3, 512, size=(1, 30)), dtype=mx.int32)
    full = model(ids)
    cache = model.make_cache(1, 30)
    steps = [model(ids[:, :5], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 30)]
    assert relative_error(np.array(mx.concatenate(steps, axis=1)), np.array(full)) < 1e-5


def test_left_padded_batch_equals_each_row_alone():
    config = tiny_config()
    model = mlx_model(config, random_weights(config))
    rng = np.random.default_rng(4)
    rows = [rng.integers(3, 512, size=n).tolist() for n in (20, 7, 13)]
    width = max(map(len, rows))
    ids = mx.array([[0] * (width - len(r)) + r for r in rows], dtype=mx.int32)
    pad = mx.array([width - len(r) for r in rows], dtype=mx.int32)
    batch = model(ids, pad)
    for b, row in enumerate(rows):
        alone = model(mx.array([row]))[0]
        assert relative_error(np.array(batch[b, width - len(row):]), np.array(alone)) < 1e-5


def test_left_padded_cached_decode_equals_recomputation_past_the_window():
    config = tiny_config()
    model = mlx_model(config, random_weights(config))
    rng = np.random.default_rng(5)
    rows = [rng.integers(3, 512, size=n).tolist() for n in (11, 3)]
    extra = rng.integers(3, 512, size=(2, 12))
    ids = mx.array([[0] * (11 - len(r)) + r for r in rows], dtype=mx.int32)
    pad = mx.array([0, 8], dtype=mx.int32)
    cache = model.make_cache(2, 23)
    outs = [model(ids, pad, cache)[:, -1:]]
    outs += [model(mx.array(extra[:, t : t + 1], dtype=mx.int32), pad, cache) for t in range(12)]
    full = model(mx.concatenate([ids, mx.array(extra, dtype=mx.int32)], axis=1), pad)[:, 10:]
    assert relative_error(np.array(mx.concatenate(outs, axis=1)), np.array(full)) < 1e-5


def test_sliding_mask_sees_itself_and_window_minus_one_earlier_keys():
    mask = attention_mask(mx.arange(10), mx.arange(10), mx.array([0]), window=4)[0, 0]
    assert np.array(mask[9]).nonzero()[0].tolist() == [6, 7, 8, 9]
    assert np.array(mask[2]).nonzero()[0].tolist() == [0, 1, 2]


def test_mask_hides_padding_and_pad_queries_see_only_themselves():
    mask = attention_mask(mx.arange(5), mx.arange(5), mx.array([2]), window=None)[0, 0]
    assert np.array(mask[4]).nonzero()[0].tolist() == [2, 3, 4]
    assert np.array(mask[0]).nonzero()[0].tolist() == [0]


def test_bfloat16_logits_stay_close_to_float32():
    config = tiny_config()
    weights = random_weights(config)
    ids = mx.array([list(range(3, 30))])
    full = np.array(mlx_model(config, weights)(ids))
    half = np.array(mlx_model(config, weights, mx.bfloat16)(ids).astype(mx.float32))
    assert mlx_model(config, weights, mx.bfloat16)(ids).dtype == mx.bfloat16
    assert relative_error(half, full) < 3e-2


def test_kept_norm_scales_and_transposes_change_nothing_and_follow_new_weights():
    config = tiny_config()
    model = mlx_model(config, random_weights(config, seed=1))
    ids = mx.array([list(range(3, 20))])
    before = model(ids)
    model.keep_derived()
    assert mx.array_equal(model(ids), before)
    other = random_weights(config, seed=2)
    model.load_weights([(k, mx.array(v)) for k, v in other.items()])
    assert mx.array_equal(model(ids), mlx_model(config, other)(ids))


def test_joined_projections_give_the_same_logits_hold_the_weights_once_and_follow_new_weights():
    config = tiny_config(hidden_size=256, intermediate_size=512)  # the smallest weight, k_proj's, is 64 kB
    weights = random_weights(config, seed=1)
    model = mlx_model(config, weights)
    ids = mx.array([list(range(3, 20))])
    before = np.array(model(ids))
    gc.collect()  # arrays of earlier tests freed now, not while this one measures
    held = mx.get_active_memory()
    smallest = min(w.nbytes for name, w in weights.items() if name.endswith("proj.weight"))
    for _, module in model.named_modules():  # keep_derived joins them on a GPU only
        if isinstance(module, (Attention, MLP)):
            mx.eval(module.fused.keep(module))
    gc.collect()
    # each projection's weight is now a view into its joined weight: not even the smallest is copied (MLX's own
    # bookkeeping moves by some kB)
    assert abs(mx.get_active_memory() - held) < smallest / 2
    assert model.model.layers[0].mlp.fused.kept is not None
    assert relative_error(np.array(model(ids)), before) < 1e-6  # one product instead of three: rounding only
    assert np.array_equal(np.array(model.model.layers[1].self_attn.k_proj.weight),
                          weights["model.layers.1.self_attn.k_proj.weight"])
    other = random_weights(config, seed=2)
    model.load_weights([(k, mx.array(v)) for k, v in other.items()])
    assert mx.array_equal(model(ids), mlx_model(config, other)(ids))  # new weights: the separate products


def test_quantized_projections_are_not_joined_and_replaced_ones_are_called():
    config = tiny_config()
    model = mlx_model(config, random_weights(config, seed=1))
    ids = mx.array([list(range(3, 20))])
    dense = model(ids)
    nn.quantize(model, group_size=32, bits=8)  # replaces the projections' modules
    before = model(ids)
    assert not mx.array_equal(before, dense)  # the new modules are the ones called
    for _, module in model.named_modules():
        if isinstance(module, (Attention, MLP)):
            assert module.fused.keep(module) == []  # packed weights cannot be joined into one product
    assert mx.array_equal(model(ids), before)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"


def test_a_pass_stopped_after_some_blocks_captures_what_the_whole_pass_does():
    from gemmalens.engine.capture import Capture
    from gemmalens.engine.generation import layers_needed

    config = tiny_config()
    model = mlx_model(config, random_weights(config))
    ids = mx.array([list(range(3, 30))])
    names = frozenset({"model.layers.0.resid_out", "model.layers.1.mlp.hidden"})
    assert layers_needed(names, (), None) == 2
    assert layers_needed(names | {"model.norm_out"}, (), None) is None and layers_needed(set(), (), None) == 0
    whole, stopped = Capture(names), Capture(names)
    model(ids, cap=whole)
    assert model(ids, cap=stopped, layers=2) is None
    taken, expected = stopped.take(), whole.take()
    assert set(taken) == names and all(mx.array_equal(v, expected[k]) for k, v in taken.items())
