"""``from gemma_refactored.generation import batch_generate``."""

from gemmalens import batch_generate

__all__ = ["batch_generate"]
