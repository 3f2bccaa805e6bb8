"""``from gemma_refactored.main import load`` and the seed's CLI entry point."""

from gemmalens import load
from gemmalens.cli.main import seed_main as main

__all__ = ["load", "main"]
