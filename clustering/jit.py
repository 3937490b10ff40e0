"""An on-disk cache for the numba functions UMAP compiles, so a new process does not pay the JIT again.

UMAP compiles dozens of numba functions on first use (30–50 s on a 2-core machine) and most of them are
declared without ``cache=True`` (pynndescent's are cached, UMAP's mostly not). Before UMAP is
imported, ``numba.njit``/``numba.jit`` are wrapped so that functions default to ``cache=True``; the
cache lives in ``NUMBA_CACHE_DIR`` (default: the user cache, ``~/.cache/flagmatch/numba``), keyed by
the source file and the CPU, so a changed library or machine simply compiles again. A function numba
cannot cache is compiled as before (numba only warns)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flagmatch" / "numba"


def enable() -> None:
    """Call before the first import of umap (numba reads NUMBA_CACHE_DIR when it is imported)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir()))
    import numba
    if getattr(numba, "_flagmatch_cached", False):
        return
    from numba.core.errors import NumbaWarning

    def cached(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("cache", True)
            return original(*args, **kwargs)
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    numba.njit = cached(numba.njit)
    numba.jit = cached(numba.jit)
    numba._flagmatch_cached = True  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", category=NumbaWarning, message=".*[Cc]annot cache.*")
