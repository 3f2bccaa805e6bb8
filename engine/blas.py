"""A fast BLAS for MLX's CPU backend on Linux.

The ``mlx[cpu]`` wheel links the reference BLAS, which multiplies float32
matrices an order of magnitude slower than an optimised one. MLX calls only
``cblas_sgemm``/``dgemm``/``cgemm`` from it, through the process-wide symbol
scope, so an optimised OpenBLAS opened with ``RTLD_GLOBAL`` *before*
``mlx.core`` is imported takes those calls over (docs/performance.md).

The OpenBLAS comes from the ``cmeel-openblas`` wheel. It needs
``libgfortran.so.5``, which many machines lack; the ``mlx[cpu]`` wheel ships
one under a mangled name, so a copy of the library whose dependency points at
that file (rewritten once with ``patchelf``) is kept in the gemmalens cache.

Set ``GEMMALENS_BLAS=reference`` to keep MLX's own BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from .paths import cache_root

_state = {"library": None}


def _site_dirs() -> list[Path]:
    return [Path(p) for p in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}]


def _find(pattern: str) -> Path | None:
    for site in _site_dirs():
        hits = sorted(glob.glob(str(site / pattern)))
        if hits:
            return Path(hits[0])
    return None


def _patchelf() -> str | None:
    scripts = Path(sysconfig.get_path("scripts")) / "patchelf"
    return str(scripts) if scripts.exists() else shutil.which("patchelf")


def _prepared_openblas() -> Path | None:
    """Returns a loadable OpenBLAS path, preparing the cached copy if needed."""
    openblas = _find("cmeel.prefix/lib/libopenblas.so.0")
    gfortran = _find("mlx_cpu.libs/libgfortran-*.so*")
    patchelf = _patchelf()
    if openblas is None or gfortran is None or patchelf is None:
        return None
    key = hashlib.sha256(f"{openblas}:{openblas.stat().st_size}:{gfortran}".encode()).hexdigest()[:16]
    target = cache_root() / "blas" / key / "libopenblas.so.0"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial{os.getpid()}")
    shutil.copyfile(openblas, partial)
    subprocess.run(
        [patchelf, "--replace-needed", "libgfortran.so.5", str(gfortran), str(partial)],
        check=True,
        capture_output=True,
    )
    os.replace(partial, target)
    return target


def use_fast_blas() -> str | None:
    """Loads OpenBLAS into the global symbol scope so MLX's CPU GEMMs use it.

    Must run before ``mlx.core`` is first imported; later it has no effect and
    warns. Returns the path of the library in use, or None when the reference
    BLAS stays (not Linux, opted out, or the OpenBLAS wheel missing).
    """
    if _state["library"] is not None:
        return _state["library"]
    if not sys.platform.startswith("linux") or os.environ.get("GEMMALENS_BLAS") == "reference":
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before gemmalens, so MLX keeps its slow reference BLAS on this "
            "CPU; import gemmalens first for fast float32 matrix products.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        path = _prepared_openblas()
        if path is None:
            return None
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"could not load OpenBLAS ({error}); MLX keeps its reference BLAS", RuntimeWarning, stacklevel=3)
        return None
    _state["library"] = str(path)
    return _state["library"]
