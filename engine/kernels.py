"""Decode attention as one CUDA kernel, where MLX's fused attention does not apply.

MLX 0.32's CUDA backend has no fused attention for Gemma's head size (256)
with a mask array: ``mx.fast.scaled_dot_product_attention`` then falls back
to separate matmuls, a softmax and the reshapes between them, about a dozen
graph nodes per layer, and at small batches the host's time to launch them is
what a decode step costs (docs/performance.md). For one new token per row the
whole attention fits one kernel: a block of eight warps per (row, query head)
streams that row's keys once, each warp keeping a running maximum, sum and
weighted value sum (float32) over every eighth key, and the warps' partial
results are combined at the end. Everywhere else (the CPU, Apple silicon, the
prompt pass, keys past ``MAX_KEYS``, shapes and dtypes not checked on a GPU) MLX's own attention runs.
"""

from __future__ import annotations

import functools

import mlx.core as mx

MAX_KEYS = 4096  # one block per (row, head) reads all keys; past this MLX's attention spreads wider
WARPS = 8
# What bench/gpu.py checks against float32 attention (Gemma 3 270M to 12B); other head sizes and float16 are
# written for (a whole number of elements per lane, up to 512) but take MLX's attention until checked on a GPU.
HEAD_DIMS = (256,)
DTYPES = (mx.bfloat16, mx.float32)

_SOURCE = """
    constexpr int PER = D / 32;  // elements of a head vector per lane
    const int heads = q_shape[1], groups = k_shape[1], keys = k_shape[2];
    const int row_head = blockIdx.x, row = row_head / heads, head = row_head % heads;
    const int group = head / (heads / groups);  // the key/value head this query head reads
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const T* k_row = k + (size_t)(row * groups + group) * keys * D + lane * PER;
    const T* v_row = v + (size_t)(row * groups + group) * keys * D + lane * PER;
    const M* bias_row = mask + (size_t)row * keys;
    const float never = __int_as_float(0xff800000u);  // -inf
    float query[PER], acc[PER];
    for (int i = 0; i < PER; ++i) {
        query[i] = static_cast<float>(q[(size_t)row_head * D + lane * PER + i]) * SCALE;
        acc[i] = 0.0f;
    }
    float top = never, total = 0.0f;
    for (int j = warp; j < keys; j += WARPS) {
        const float bias = static_cast<float>(bias_row[j]);
        if (bias == never) continue;  // a key this query does not see
        float score = 0.0f;
        for (int i = 0; i < PER; ++i) score += query[i] * static_cast<float>(k_row[(size_t)j * D + i]);
        for (int offset = 16; offset > 0; offset /= 2) score += __shfl_xor_sync(0xffffffffu, score, offset);
        score += bias;
        const float next = fmaxf(top, score);
        const float rescale = expf(top - next), weight = expf(score - next);
        total = total * rescale + weight;
        for (int i = 0; i < PER; ++i) acc[i] = acc[i] * rescale + weight * static_cast<float>(v_row[(size_t)j * D + i]);
        top = next;
    }
    __shared__ float tops[WARPS], totals[WARPS], sums[WARPS][D];
    if (lane == 0) { tops[warp] = top; totals[warp] = total; }
    for (int i = 0; i < PER; ++i) sums[warp][lane * PER + i] = acc[i];
    __syncthreads();
    float best = never;
    for (int w = 0; w < WARPS; ++w) best = fmaxf(best, tops[w]);
    float norm = 0.0f;
    for (int w = 0; w < WARPS; ++w) norm += totals[w] * expf(tops[w] - best);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float value = 0.0f;
        for (int w = 0; w < WARPS; ++w) value += sums[w][d] * expf(tops[w] - best);
        out[(size_t)row_head * D + d] = static_cast<T>(value / norm);
    }
"""


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` for queries ``[B, H, L, D]``, keys and values ``[B, G, K, D]`` and an
    additive mask ``[B, 1, L, K]`` (0 or -inf; every query sees at least one key)."""
    if _fits_kernel(queries, keys, mask):
        B, H, _, D = queries.shape
        return _kernel(scale)(
            inputs=[queries, keys, values, mask],
            template=[("T", queries.dtype), ("M", mask.dtype), ("D", D), ("WARPS", WARPS)],
            grid=(B * H * 32 * WARPS, 1, 1),
            threadgroup=(32 * WARPS, 1, 1),
            output_shapes=[queries.shape],
            output_dtypes=[queries.dtype],
        )[0]
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def _fits_kernel(queries: mx.array, keys: mx.array, mask: mx.array) -> bool:
    B, H, L, D = queries.shape
    return (
        L == 1
        and D in HEAD_DIMS
        and queries.dtype in DTYPES
        and keys.shape[2] <= MAX_KEYS
        and H % keys.shape[1] == 0
        and mask.shape == (B, 1, 1, keys.shape[2])
        and _on_cuda()
    )


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


@functools.cache
def _kernel(scale: float):
    """The kernel for one attention scale (compiled into it; the name tells the scales apart)."""
    return mx.fast.cuda_kernel(
        name=f"gemmalens_decode_attention_{scale.hex().replace('.', '_').replace('-', 'm').replace('+', 'p')}",
        input_names=["q", "k", "v", "mask"],
        output_names=["out"],
        source=_SOURCE.replace("SCALE", f"{scale!r}f"),
    )
