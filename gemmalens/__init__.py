"""gemmalens: run Gemma 3 with MLX and capture every named intermediate value."""

from gemmalens.engine import load, run_with_capture
from gemmalens.api import batch_generate
from gemmalens.sinks.npz import open_activations

__version__ = "0.1.0"
__all__ = ["load", "batch_generate", "run_with_capture", "open_activations", "__version__"]
