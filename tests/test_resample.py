"""The decoder's resampling (indexer.media.resample) and the model input it makes, against Pillow and the model's own
evaluation transform, on real images (make-corpus: photos and clipart from Debian packages)."""
from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from indexer.media.decode import InputSpec, decode, needed_side, to_rgb
from indexer.media.resample import resize
from tests.helpers import photo_image

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("corpus")
    done = subprocess.run([sys.executable, str(SHARED / "corpus" / "make-corpus"), str(out), "--photos", "40",
                           "--clipart", "20", "--no-install"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail("make-corpus needs its Debian packages (gnome-backgrounds, mate-backgrounds, "
                    f"plasma-workspace-wallpapers, openclipart-png; .ci/run installs them): {done.stderr[-500:]}")
    return sorted((out / "photos").glob("*.jpg")) + sorted((out / "clipart").glob("*.png"))


def _pil(a: np.ndarray, size: tuple[int, int], f: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, f))


def test_resize_is_pillows_filter_down_and_up(corpus):
    picks = [np.asarray(to_rgb(Image.open(p))) for p in corpus[::7]] + [np.asarray(photo_image(3, (97, 61)))]
    checked = 0
    for a in picks:
        h, w = a.shape[:2]
        for size in ((max(1, w // 3), max(1, h // 3)), (384, 384), (w * 2, h * 2), (max(1, w - 1), h)):
            for name, f in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
                ours, theirs = resize(a, size, name), _pil(a, size, f)
                assert ours.shape == theirs.shape and ours.dtype == np.uint8 and ours.flags.c_contiguous
                d = np.abs(ours.astype(int) - theirs.astype(int))
                assert d.max() <= 2 and d.mean() < 0.05, (a.shape, size, name, d.max(), d.mean())
                checked += 1
        grey = np.ascontiguousarray(a[:, :, 1])
        d = np.abs(resize(grey, (max(1, w // 2), max(1, h // 2))).astype(int)
                   - _pil(grey, (max(1, w // 2), max(1, h // 2)), Image.BICUBIC).astype(int))
        assert d.max() <= 2
    assert checked >= 8 * len(picks)
    same = picks[0][:10, :10]  # a view: handed back as a contiguous copy, not resampled
    assert np.array_equal(resize(same, (10, 10)), same) and resize(same, (10, 10)).flags.c_contiguous


def test_a_resampling_thread_runs_one_torch_thread_and_starts_no_team():
    import torch
    mine = torch.get_num_threads()
    a = np.asarray(photo_image(5, (1600, 1200)))
    seen: dict[str, int] = {}

    def work() -> None:
        before = len(list(Path("/proc/self/task").iterdir()))
        resize(a, (512, 384))
        seen["threads"] = torch.get_num_threads()
        seen["new_tasks"] = len(list(Path("/proc/self/task").iterdir())) - before

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"threads": 1, "new_tasks": 0}
    assert torch.get_num_threads() == mine  # the calling thread's own setting only


def _reference(data: bytes, spec: InputSpec) -> np.ndarray:
    """The model input as the model's evaluation transform makes it (and the decoder made it when the work on
    throughput began): EXIF orientation, RGB on white, the short side resized to size/crop_pct by Pillow,
    the centre crop. JPEGs decoded at the same DCT scale (the decoder's memory bound)."""
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        need = needed_side(spec, 0)
        im.draft("RGB", (need, need))
    rgb = to_rgb(ImageOps.exif_transpose(im))
    w, h = rgb.size
    scale = spec.size / spec.crop_pct / min(w, h)
    nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    filt = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[spec.interpolation]
    big = rgb.resize((nw, nh), filt)
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    return np.asarray(big.crop((left, top, left + spec.size, top + spec.size)))


@pytest.mark.parametrize("kernels", ["torch", "pillow"])
@pytest.mark.parametrize("which", ["opennsfw", "timm"])
def test_model_input_embeds_as_the_models_own_transform_on_the_corpus(corpus, which, kernels, opennsfw,
                                                                      tiny_embedder, monkeypatch):
    """Both ways of making it: torch's kernels on the whole region (a process with torch loaded), Pillow's
    fractional box over the crop alone (a process without, e.g. the ONNX backend's)."""
    import indexer.media.decode
    monkeypatch.setattr(indexer.media.decode, "vectorised", lambda: kernels == "torch")
    emb = opennsfw if which == "opennsfw" else tiny_embedder
    spec = emb.info.input
    ours, theirs = [], []
    for p in corpus:
        data = p.read_bytes()
        ours.append(decode(data, spec, thumb_size=256).pixels)
        theirs.append(_reference(data, spec))
    a, b = emb.embed(np.stack(ours))[0], emb.embed(np.stack(theirs))[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999, sorted(zip(cos.round(5), (p.name for p in corpus)))[:5]
    # and the pixels themselves: within a couple of levels on average (the box reduction of large sources)
    diffs = [np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(ours, theirs)]
    assert float(np.median(diffs)) < 1.0, max(diffs)


def test_thumbnail_from_the_models_resampled_region_is_the_pictures_thumbnail(corpus):
    spec = InputSpec(384)
    for p in corpus[:12]:
        data = p.read_bytes()
        thumb = np.asarray(Image.open(io.BytesIO(decode(data, spec, thumb_size=256).thumbnail)).convert("RGB"))
        ref = to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
        ref.thumbnail((256, 256), Image.BICUBIC)
        # the same geometry to the pixel (its short side rounded from the resampled region's)
        assert max(thumb.shape[:2]) == 256 and abs(thumb.shape[0] - ref.height) + abs(thumb.shape[1] - ref.width) <= 1
        ref = ref.resize((thumb.shape[1], thumb.shape[0]), Image.BICUBIC)
        # WebP at quality 75 against an exact thumbnail of the full picture: close, not equal
        assert np.abs(thumb.astype(int) - np.asarray(ref).astype(int)).mean() < 6, p.name
