"""The generation engine: model, loading, tokenizer, sampling, generation, capture, publisher.

The fast-BLAS set-up must run before MLX is first imported (engine/blas.py),
hence its place above the other imports.
"""

from .blas import use_fast_blas

use_fast_blas()

from .generation import generate, run_with_capture  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["load", "generate", "run_with_capture", "use_fast_blas"]
