"""The generation engine: model, loading, tokenizer, sampling, generation, capture, publisher.

The fast-BLAS set-up must run before MLX is first imported (engine/blas.py),
hence it runs here, before any engine module is. The entry points below are
imported on first use: sinks read frames and selections from this package
without importing MLX (a helper process of the npz archiver starts in a
fraction of the time, and a storage machine needs no MLX).
"""

import importlib

from .blas import use_fast_blas

use_fast_blas()

_ENTRY_POINTS = {"generate": ".generation", "run_with_capture": ".generation", "load": ".loading"}

__all__ = ["load", "generate", "run_with_capture", "use_fast_blas"]


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_ENTRY_POINTS[name], __name__), name)
