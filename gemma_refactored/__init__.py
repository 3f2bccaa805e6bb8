"""The seed's import paths (``gemma_refactored.main``, ``gemma_refactored.generation``), kept as a thin layer over gemmalens."""
