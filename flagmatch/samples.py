"""Sample images for trying flagmatch on a machine with no images of its own: seeded, photo-like pictures
(waves, blocks and noise at every scale, so PDQ has texture to hash), each with re-uploads made by the same
edits the matching space learns from (``indexer.media.augment``: recompression, crops, captions, frames,
colour, blur…). Nothing is downloaded."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.media.augment import reupload


def _picture(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.full((h, w, 3), 128.0)
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(1, 12), rng.uniform(1, 12), rng.uniform(0, 6.3)
            arr[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph) * rng.uniform(20, 50)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w - w // 8)), int(rng.integers(0, h - h // 8))
        arr[y0:y0 + int(rng.integers(h // 10, h // 3)), x0:x0 + int(rng.integers(w // 10, w // 3))] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def write_samples(out: Path, pictures: int = 40, copies: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """``pictures`` originals, each with ``copies`` re-uploads. The originals and all but the last re-upload
    of each go into ``flagged.csv`` (a manifest that flags them, label ``sample``); the last re-upload of each
    goes to ``uploads/``, never ingested: queries whose flagged look-alikes the store holds. Returns
    (the manifest, the uploads folder)."""
    images, uploads = out / "images", out / "uploads"
    images.mkdir(parents=True, exist_ok=True)
    uploads.mkdir(parents=True, exist_ok=True)
    r = random.Random(seed)
    manifest = out / "flagged.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "external_id", "flagged", "label"])
        for i in range(pictures):
            original = _picture(seed * 100_000 + i)
            path = images / f"{i:03d}.jpg"
            original.save(path, "JPEG", quality=90)
            w.writerow([str(path.resolve()), f"sample-{i:03d}", "true", "sample"])
            for c in range(copies):
                copy = reupload(original, r)
                target = (images if c < copies - 1 else uploads) / f"{i:03d}-{c + 1}.jpg"
                copy.save(target, "JPEG", quality=r.randint(60, 90))
                if c < copies - 1:
                    w.writerow([str(target.resolve()), f"sample-{i:03d}-{c + 1}", "true", "sample"])
    return manifest, uploads
