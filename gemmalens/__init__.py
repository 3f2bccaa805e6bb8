"""gemmalens: run Gemma 3 with MLX and capture every named intermediate value."""

from gemmalens.engine import batch_generate, load, run_with_capture

__version__ = "0.1.0"
__all__ = ["load", "batch_generate", "run_with_capture", "__version__"]
