"""gemmalens: run Gemma 3 with MLX and capture every named intermediate value.

The functions below are imported on first use: ``load``, ``batch_generate``, ``run_with_capture`` and ``load_sae``
bring the engine (and MLX, after setting up a fast BLAS on Linux: engine/blas.py); the wire contract
(``gemmalens.wire``), the sinks, ``open_activations`` and the intervention helpers (``steer``, ``ablate``,
``set_value``, ``clamp``, ``patch``: gemmalens/interventions.py) need neither.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["load", "batch_generate", "run_with_capture", "open_activations", "load_sae", "steer", "ablate",
           "set_value", "clamp", "patch", "__version__"]

_ENTRY_POINTS = {"load": "gemmalens.engine", "run_with_capture": "gemmalens.engine", "batch_generate": "gemmalens.api",
                 "open_activations": "gemmalens.sinks.reader", "load_sae": "gemmalens.engine.sae",
                 **{name: "gemmalens.interventions" for name in ("steer", "ablate", "set_value", "clamp", "patch")}}


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
