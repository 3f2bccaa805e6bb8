"""The decode attention kernel's dispatch: where it runs, and that everywhere else MLX's attention runs unchanged.

The kernel itself needs a CUDA GPU; `bench/gpu.py` checks it there against a float32 reference on the CPU."""

import mlx.core as mx
import pytest

from gemmalens.engine import kernels


def decode_inputs(batch=2, heads=4, groups=2, length=1, keys=40, dim=256, dtype=mx.float32):
    k = mx.random.split(mx.random.key(0), 4)
    queries = mx.random.normal((batch, heads, length, dim), key=k[0]).astype(dtype)
    cached = [mx.random.normal((batch, groups, keys, dim), key=key).astype(dtype) for key in k[1:3]]
    seen = mx.random.uniform(shape=(batch, 1, length, keys), key=k[3]) < 0.5
    mask = mx.where(seen | (mx.arange(keys) == 0), mx.array(0.0), mx.array(-mx.inf))
    return queries, *cached, mask


def test_without_cuda_the_attention_is_mlx_s_own():
    queries, keys, values, mask = decode_inputs()
    got = kernels.attention(queries, keys, values, 0.125, mask)
    assert mx.array_equal(got, mx.fast.scaled_dot_product_attention(queries, keys, values, scale=0.125, mask=mask))


@pytest.mark.parametrize("change, fits", [
    ({}, True),
    ({"length": 2}, False),  # the prompt pass: MLX's attention
    ({"keys": kernels.MAX_KEYS + 1}, False),
    ({"dtype": mx.bfloat16}, True),
    ({"dim": 128}, False),  # head sizes and dtypes not checked on a GPU: MLX's attention
    ({"dtype": mx.float16}, False),
])
def test_the_kernel_takes_single_token_steps_of_supported_shapes_on_cuda(monkeypatch, change, fits):
    monkeypatch.setattr(kernels, "_on_cuda", lambda: True)
    queries, keys, _, mask = decode_inputs(**change)
    assert kernels._fits_kernel(queries, keys, mask) is fits


def test_the_kernel_needs_cuda(monkeypatch):
    queries, keys, _, mask = decode_inputs()
    monkeypatch.setattr(kernels, "_on_cuda", lambda: False)
    assert not kernels._fits_kernel(queries, keys, mask)


def test_single_token_steps_of_the_model_reach_the_kernel_with_a_block_per_row_and_head(monkeypatch):
    """The glue between the model and the kernel, with CUDA reported and the kernel computed by MLX's attention:
    every decode step of every layer goes to it, launched as one block of 32 x WARPS threads per row and head."""
    import numpy as np
    from helpers import mlx_model, random_weights, relative_error, tiny_config

    launches = []

    def kernel(scale):
        def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            queries, keys, values, mask = inputs
            B, H, L, D = queries.shape
            assert (L, dict(template)["D"], output_shapes, output_dtypes) == (1, D, [queries.shape], [queries.dtype])
            assert threadgroup == (32 * kernels.WARPS, 1, 1) and grid == (B * H * threadgroup[0], 1, 1)
            launches.append(keys.shape[2])
            return [mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)]
        return launch

    monkeypatch.setattr(kernels, "_on_cuda", lambda: True)
    monkeypatch.setattr(kernels, "_kernel", kernel)
    config = tiny_config(head_dim=256)
    model = mlx_model(config, random_weights(config))
    ids = mx.array(np.random.default_rng(3).integers(3, 512, size=(2, 20)), dtype=mx.int32)
    cache = model.make_cache(2, 20)
    steps = [model(ids[:, :5], cache=cache)]
    assert launches == []  # the prompt pass keeps MLX's attention
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 20)]
    assert len(launches) == 15 * config.num_hidden_layers
    assert relative_error(np.array(mx.concatenate(steps, axis=1)), np.array(model(ids))) < 1e-5
