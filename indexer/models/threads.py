"""Kernel-visible names for flagmatch's threads, so ``top -H``, ``perf`` and ``/proc/<pid>/task/*/comm`` say
which part of a process uses the CPU: ``fm-model`` (the model thread and the OpenMP workers it starts, which
inherit its name), ``fm-decode`` (ingest's and the server's decode pools), ``fm-request`` (a server's request
threads). ``benchmarks/search_api.py`` reads them to split a server's CPU per upload by part."""
from __future__ import annotations

import ctypes
import sys
import threading

from indexer.media.decode import lower_priority

MODEL, DECODE, REQUEST = "fm-model", "fm-decode", "fm-request"
_PR_SET_NAME = 15  # prctl option: the calling thread's name, 15 bytes and a NUL
_libc: ctypes.CDLL | None = None


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel (Linux; elsewhere nothing happens). Never the process's
    main thread: its name is the process's name in ``ps`` and ``top``."""
    global _libc
    if not sys.platform.startswith("linux") or threading.current_thread() is threading.main_thread():
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the thread keeps its inherited name
        pass


def worker_started(name: str, nice: int = 0) -> None:
    """A pool thread's initializer: its kernel name, and its niceness (see ``indexer.media.decode.lower_priority``)."""
    name_os_thread(name)
    lower_priority(nice)
