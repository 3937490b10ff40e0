"""One way to write a file that readers may open at any moment: ``publish``. The bytes go to a temp file
beside the target, are fsynced, and are renamed over it; the folder is fsynced so the rename itself
survives a power cut. A reader sees the old file or the whole new one, never half of either."""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def publish(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring), readable as ``mode`` says."""
    publish_with(path, lambda f: f.write(data), durable=durable, mode=mode)


def publish_with(path: Path, write: Callable[[IO[bytes]], object], *, durable: bool = True,
                 mode: int = 0o644) -> None:
    """``publish`` for writers that stream into a file object (``np.savez``, ``onnx.save``). ``durable=False``
    keeps the rename atomic (never half a file) but skips both fsyncs: for a cache that is recomputed when
    missing, and for thumbnails, which ingest writes hundreds a second and the OS flushes within seconds —
    one lost to a power cut shows as a missing thumbnail, nothing else."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks (index files, backup copies)."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
