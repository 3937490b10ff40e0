"""Antialiased resampling of uint8 pictures — the model's input, the thumbnail, the greyscale copy — through
torch's vectorised uint8 kernels (``interpolate(..., antialias=True)``), which implement Pillow's own
resampling filters (the same support, bicubic a = −0.5, the same fixed-point rounding) with AVX2.

Measured on a make-corpus photo (2-core AMD EPYC, one thread), Pillow → torch: 403 × 403 to the 384-px bicubic
input 3.2 → 0.6 ms, to the 224-px bilinear input 1.25 → 0.33 ms; the pixels differ from Pillow's by at most
2 levels (mean ~0.001), and the embeddings by far less than the 0.999 cosine the tests hold them to.

torch's kernels split their rows over its intra-op (OpenMP) threads. A thread that resamples is set to one
torch thread before its first call (a per-thread OpenMP setting): the decode threads must never start an
OpenMP team of their own beside the model's (see ``indexer.models.embed.on_model_thread`` for why teams hurt). Like the
model's lanes, this also sets torch's default for threads that have not yet run a parallel region; the model
thread sets its own count when it starts.

torch's kernels are used where torch is loaded anyway (the timm backend, a GPU host); a process without it
(the ONNX backend) resamples with Pillow itself, the same filters: loading torch there would cost ~500 MB of
memory for ~0.7 ms an image (and loaded on a decode thread's first call, it stalled a 7-second make-corpus
ingest by a tenth: 45–48 against 54–57 images/s)."""
from __future__ import annotations

import sys
import threading
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch as _torch_t

# Filters torch implements as Pillow does; any other (``lanczos``) is resampled by Pillow itself.
TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
               "lanczos": Image.LANCZOS}
_ready = threading.local()
# The decoded buffers are read-only numpy views of Pillow's images; torch only reads them, and says so once.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
_torch: "_torch_t | None" = None  # type: ignore[valid-type]


def _one_thread_torch():  # type: ignore[no-untyped-def]
    """torch, set to one intra-op thread on the calling thread (once per thread); None where this process
    has not loaded torch."""
    global _torch
    if _torch is None:
        _torch = sys.modules.get("torch")
        if _torch is None:
            return None
    if not getattr(_ready, "done", False):
        _torch.set_num_threads(1)
        _ready.done = True
    return _torch


def vectorised() -> bool:
    """Whether ``resize`` runs on torch's kernels in this process (else on Pillow's)."""
    return sys.modules.get("torch") is not None


def resize(pixels: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic", *,
           reducing_gap: float | None = None) -> np.ndarray:
    """``pixels`` (uint8, [h, w, 3] RGB or [h, w] grey) resampled to ``size`` = (width, height) with Pillow's
    ``interpolation`` filter (antialiased when shrinking, as Pillow's ``resize`` is). ``reducing_gap``: where
    Pillow resamples, box-reduce by an integer factor first while the filter's own step stays at least this
    (Pillow's ``reducing_gap``: cheaper, close to the exact filter — for thumbnails, never the model's input);
    torch's kernels apply the exact filter at any factor."""
    width, height = size
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return np.ascontiguousarray(pixels)
    mode = TORCH_MODES.get(interpolation)
    torch = _one_thread_torch() if mode is not None else None
    if torch is None:
        return np.asarray(Image.fromarray(pixels).resize((width, height), PIL_FILTERS[interpolation],
                                                         reducing_gap=reducing_gap))
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]  # NCHW view of the HWC buffer
    out = torch.nn.functional.interpolate(t, size=(height, width), mode=mode, antialias=True)[0]
    return np.ascontiguousarray((out[0] if pixels.ndim == 2 else out.permute(1, 2, 0)).numpy())
