"""Where gemmalens keeps converted checkpoints and prepared libraries."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The gemmalens cache folder: ``$GEMMALENS_CACHE`` or ``~/.cache/gemmalens``."""
    configured = os.environ.get("GEMMALENS_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "gemmalens"
