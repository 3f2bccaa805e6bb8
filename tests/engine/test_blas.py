"""The fast BLAS is in use on Linux and MLX's float32 products stay right."""

import sys

import mlx.core as mx
import numpy as np
import pytest

from gemmalens.engine.blas import use_fast_blas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reference-BLAS problem exists only on Linux")
def test_openblas_is_loaded_into_the_process():
    library = use_fast_blas()
    assert library and library.endswith("libopenblas.so.0")
    maps = open("/proc/self/maps").read()
    assert library in maps


def test_float32_matmul_matches_numpy_in_float64():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((257, 640)).astype(np.float32), rng.standard_normal((640, 1031)).astype(np.float32)
    ours = np.array(mx.array(a) @ mx.array(b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.linalg.norm(ours - exact) / np.linalg.norm(exact) < 1e-6
