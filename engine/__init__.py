"""The generation engine: model, loading, tokenizer, sampling, generation, capture, publisher.

The fast-BLAS set-up must run before MLX is first imported (engine/blas.py),
hence it runs here, before any engine module is; everything that needs MLX
comes through this package. Sinks never import it (they use gemmalens.wire).
"""

import importlib

from .blas import use_fast_blas

use_fast_blas()

_ENTRY_POINTS = {"generate": ".generation", "run_with_capture": ".analysis", "load": ".loading"}

__all__ = ["load", "generate", "run_with_capture", "use_fast_blas"]


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_ENTRY_POINTS[name], __name__), name)
