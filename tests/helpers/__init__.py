"""Test data drawn in code (seeded): images of every kind, tiny timm models, Gaussian-mixture vectors."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def drawn_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distinct RGB picture: background gradient, shapes and a little noise, all from ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = (xx / max(w - 1, 1))[..., None]
    arr = (c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
    d.text((10, 10), f"img {seed}", fill=(255, 255, 255))
    return im


def captioned(im: Image.Image, text: str = "when the weekend finally arrives", band: float = 0.2) -> Image.Image:
    """A meme-style re-upload: a white band of ``band`` of the height above the picture, with ``text`` in it."""
    top = int(im.height * band)
    canvas = Image.new("RGB", (im.width, im.height + top), (255, 255, 255))
    canvas.paste(im, (0, top))
    ImageDraw.Draw(canvas).text((10, 10), text, fill=(0, 0, 0))
    return canvas


def photo_image(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A picture with texture at every scale (waves, blocks, noise), like a photo: PDQ quality well over 50,
    where ``drawn_image``'s flat areas give many hashes too featureless to match."""
    rng = np.random.default_rng(10_000 + seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(1, 12), rng.uniform(1, 12), rng.uniform(0, 6.3)
            arr[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph) * rng.uniform(20, 50)
    arr += 128
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w - w // 8)), int(rng.integers(0, h - h // 8))
        arr[y0:y0 + int(rng.integers(h // 10, h // 3)), x0:x0 + int(rng.integers(w // 10, w // 3))] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write_images(folder: Path, n: int, start: int = 0, fmt: str = "JPEG", ext: str = "jpg") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"img_{i:04d}.{ext}"
        p.write_bytes(encode(drawn_image(i), fmt))
        out.append(p)
    return out


def ingest_flagged(settings, store, embedder, folder: Path, pictures: dict[str, Image.Image]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """``pictures`` written to ``folder`` as PNGs (name → picture), ingested and all flagged: name → image id."""
    import hashlib
    from flagmatch.wiring import ingest_into
    from indexer.ingest.sources import iter_sources
    from indexer.storage.catalog import FlagRequest
    folder.mkdir(parents=True, exist_ok=True)
    for name, im in pictures.items():
        (folder / f"{name}.png").write_bytes(encode(im, "PNG"))
    ingest_into(settings, iter_sources([str(folder)]), store=store, embedder=embedder)
    store.catalog.set_flag(store.catalog.image_ids(), FlagRequest("import", None, "test"), flag=True)
    return {name: store.catalog.resolve(hashlib.sha256((folder / f"{name}.png").read_bytes()).hexdigest())
            for name in pictures}


def save_tiny_timm(folder: Path, arch: str = "vit_tiny_patch16_384", seed: int = 0,
                   labels: tuple[str, ...] = ("NSFW", "SFW")) -> Path:
    """A timm model with random weights saved in the hub's layout (config.json + model.safetensors)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=len(labels))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    cfg = model.pretrained_cfg
    (folder / "config.json").write_text(json.dumps({
        "architecture": arch, "num_classes": len(labels), "num_features": model.num_features,
        "label_names": list(labels),
        "pretrained_cfg": {"input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"],
                           "mean": list(cfg["mean"]), "std": list(cfg["std"]), "crop_pct": cfg["crop_pct"],
                           "num_classes": len(labels), "label_names": list(labels)},
    }))
    return folder


def gaussian_mixture(n: int, dim: int, groups: int, seed: int, spread: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised vectors around ``groups`` random centres; returns (vectors, group labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, groups, n)
    v = centres[labels] + rng.normal(scale=spread / np.sqrt(dim), size=(n, dim)).astype(np.float32) * np.sqrt(dim) / 4
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32), labels


def write_families(folder: Path, families: int, per_family: int, seed: int = 0) -> list[Path]:
    """Groups of near-duplicates (the same drawing re-encoded, shifted, tinted): what re-uploads look like."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for f in range(families):
        base = drawn_image(1000 + f, (360, 280))
        for v in range(per_family):
            dx, dy = int(rng.integers(0, 24)), int(rng.integers(0, 24))
            im = base.crop((dx, dy, dx + 320, dy + 240))
            arr = np.asarray(im, np.int16) + rng.integers(-12, 12, 3)
            im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
            p = folder / f"fam{f}_{v:02d}.jpg"
            p.write_bytes(encode(im, "JPEG", quality=int(rng.integers(70, 95))))
            out.append(p)
    return out


def clean_env(env: dict | None = None) -> dict:
    """For CliRunner: no FLAGMATCH_* variable of the shell running the tests reaches the command (None
    unsets it)."""
    import os
    return {**{k: None for k in os.environ if k.startswith("FLAGMATCH_")}, **(env or {})}


def child_env(**env: str) -> dict:
    """For a subprocess: this environment without any FLAGMATCH_* variable, plus ``env``."""
    import os
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FLAGMATCH_")}, **env}


def private_copy(settings, dest: Path):  # type: ignore[no-untyped-def]
    """A copy of a built store (catalog, vectors, indexes, thumbnails) for one test to change freely;
    the module's pristine store stays as built for the next test."""
    import shutil
    shutil.copytree(settings.home_path, dest)
    if settings.catalog_url.startswith("postgresql"):  # the catalog is a database: copy it as a template
        from tests.helpers import pg
        return settings.replace(home=str(dest), catalog_url=pg.create_database(template=settings.catalog_url))
    return settings.replace(home=str(dest))


def own_peak_rss_kib() -> int:
    """This process's own peak RSS in KiB (``VmHWM``): ``ru_maxrss`` would carry the forking parent's peak across
    exec, so a child started from a large pytest worker could never show growth below it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env: dict, log_path: Path, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    """`flagmatch serve` in a subprocess (env gives FLAGMATCH_*); returns (process, base URL, log file)
    once /readyz answers 200, or raises with the end of its log."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "flagmatch.cli", "serve"],
                                env=child_env(**env, FLAGMATCH_PORT=str(port)), stdout=log, stderr=log)
    except BaseException:  # the server never started: nothing else will close its log
        log.close()
        raise
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, base, log
        except OSError:
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    log.close()
    raise RuntimeError("flagmatch serve did not become ready: " + log_path.read_text(errors="replace")[-3000:])


def stop_server(proc, log) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def thread_stats(pid: int) -> dict[int, tuple[str, int, float]]:
    """tid → (kernel name, niceness, CPU seconds so far: user + system) of every thread of a process, from
    /proc/<pid>/task/<tid>/stat (a thread that exits while it is read is left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[16]),
                               (int(fields[11]) + int(fields[12])) / tick)
    return out
