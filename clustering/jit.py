"""An on-disk cache for the numba functions UMAP compiles, so a new process does not pay the JIT again.

UMAP compiles dozens of numba functions on first use (30–50 s on a 2-core machine) and most of them are
declared without ``cache=True`` (pynndescent's are cached, UMAP's mostly not). Before UMAP is
imported, ``numba.njit``/``numba.jit`` are wrapped so that functions default to ``cache=True``; the
cache lives in ``NUMBA_CACHE_DIR`` (default: the user cache, ``~/.cache/flagmatch/numba``), keyed by
the source file and the CPU, so a changed library or machine simply compiles again. A function numba
cannot cache is compiled as before (numba only warns).

Functions also default to ``nogil=True``: they touch no Python object, and releasing
the GIL is what lets the clustering job lay out its two UMAP embeddings on two cores at once
(``clustering.job.layouts``)."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any


# pynndescent declares eager signatures on 36 functions (distances and tree builders for every metric), so
# numba compiles all of them while pynndescent is imported: 12 s of a new 2-core machine's first clustering
# run (the import went from 13.7 to 3.7 s without them). The job's cosine path calls four of them, all in
# pynndescent.utils (random numbers and heap pushes), which stay eager; the rest compile on first call
# instead — for the job, never. (Making every eagerly typed function lazy is not safe: fast_hdbscan, whose
# k-d tree is typed eagerly, crashed with SIGSEGV in its parallel spanning tree once loaded from a cache
# written that way.)
LAZY_SIGNATURES = ("pynndescent.",)
EAGER_SIGNATURES = ("pynndescent.utils",)


# The job runs NN-descent seeded, on one thread (UMAP's rule: a random_state means n_jobs=1), so
# pynndescent's parallel loops gain nothing there, while numba's parallel compilation of them was most of
# the graph's first-run cost (46.7 → 29.6 s at 20k points). Its forest and kernel modules compile as plain
# loops instead (they split work by an explicit thread count: the graph is the same, checked against the
# library's in tests/test_clustering.py). Two modules keep their parallel loops: pynndescent_ (the job runs
# its own cacheable copy of NN-descent, clustering.nndescent) and utils, where numba cannot lower one of
# the functions the library's own NN-descent calls as a plain loop ("Storing i64 to ptr of i32").
SERIAL = ("pynndescent.",)
PARALLEL = ("pynndescent.pynndescent_", "pynndescent.utils")


def _compile_on_call(module: str) -> bool:
    return module.startswith(LAZY_SIGNATURES) and not module.startswith(EAGER_SIGNATURES)


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
            kwargs.setdefault("nogil", True)  # only takes effect in nopython mode (numba's default)
            module = sys._getframe(1).f_globals.get("__name__", "")
            if module.startswith(SERIAL) and not module.startswith(PARALLEL) and kwargs.get("parallel"):
                kwargs["parallel"] = False
            if args and not callable(args[0]) and _compile_on_call(module):
                args = args[1:]
                if not args:
                    return original(**kwargs)
            return original(*args, **kwargs)
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    numba.njit = cached(numba.njit)
    numba.jit = cached(numba.jit)
    numba._flagmatch_cached = True  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", category=NumbaWarning, message=".*[Cc]annot cache.*")
