from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from indexer.media.decode import decode
from indexer.models.embed import (BF16_MIN_COSINE, TimmEmbedder, on_model_thread, bf16_supported, calibration_pixels, cosine_rows,
                           export_onnx, load_model)
from indexer.errors import ModelLoadError
from tests.helpers import drawn_image, encode, save_tiny_timm


def pixels_for(embedder, n: int = 6, start: int = 100) -> np.ndarray:
    spec = embedder.info.input
    return np.stack([decode(encode(drawn_image(i), "JPEG"), spec).pixels
                     for i in range(start, start + n)])


def test_timm_directory_in_hub_layout_loads(tiny_embedder):
    info = tiny_embedder.info
    assert info.dim == 192 and info.backend == "timm"
    assert info.input.size == 384 and info.norm.mean == (0.5, 0.5, 0.5)
    assert info.model_id.startswith("tiny-nsfw@")
    emb, p = tiny_embedder.embed(pixels_for(tiny_embedder, 3))
    assert emb.shape == (3, 192) and p.shape == (3,)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert ((p >= 0) & (p <= 1)).all()


def test_bare_safetensors_needs_an_architecture(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(str(weights))
    m = load_model(str(weights), arch="vit_tiny_patch16_384", precision="fp32")
    assert m.info.dim == 192
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(weights), arch="resnet18")


def test_hub_id_offline_fails_with_an_actionable_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("Marqo/nsfw-image-detection-384")
    msg = str(e.value)
    assert "hf download Marqo/nsfw-image-detection-384 --local-dir DIR" in msg and "--model opennsfw" in msg


def test_unknown_unsafe_label_is_refused(tmp_path):
    d = save_tiny_timm(tmp_path / "m", arch="vit_tiny_patch16_224", labels=("cat", "dog"))
    with pytest.raises(ModelLoadError, match="unsafe"):
        load_model(str(d))


def test_opennsfw_real_weights(opennsfw):
    info = opennsfw.info
    assert info.dim == 1024 and info.input.size == 224 and info.norm.channels == "BGR"
    emb, p = opennsfw.embed(pixels_for(opennsfw, 4))
    assert emb.shape == (4, 1024)
    assert ((p >= 0) & (p <= 1)).all()
    # drawings of shapes are not NSFW for a real model
    assert p.max() < 0.5
    # different images give different embeddings, the same image the same one
    sims = emb @ emb.T
    assert sims[0, 1] < 0.999
    again, _ = opennsfw.embed(pixels_for(opennsfw, 1))
    assert float(again[0] @ emb[0]) > 0.9999


def test_export_onnx_agrees_with_torch(tiny_model_dir, tmp_path):
    fp32 = load_model(str(tiny_model_dir), precision="fp32")
    assert isinstance(fp32, TimmEmbedder)
    out = tmp_path / "tiny.onnx"
    export_onnx(fp32, out)
    onnx_model = load_model(str(out))
    assert onnx_model.info.backend == "onnx"
    assert onnx_model.info.model_id == fp32.info.model_id  # same weights: the store accepts either
    px = pixels_for(fp32, 8)
    e_t, p_t = fp32.embed(px)
    e_o, p_o = onnx_model.embed(px)
    assert cosine_rows(e_t, e_o).min() >= 0.999
    assert np.abs(p_t - p_o).max() < 1e-3


def test_bf16_is_used_only_when_it_agrees_with_fp32(tiny_model_dir):
    auto = load_model(str(tiny_model_dir), precision="auto")
    if not bf16_supported():
        assert auto.info.precision == "fp32"
        pytest.skip("this CPU has no bf16")
    forced = load_model(str(tiny_model_dir), precision="bf16")
    px = pixels_for(forced, 8, start=300)
    ref, _ = forced.embed_raw(px, bf16=False)
    low, _ = forced.embed_raw(px, bf16=True)
    cos = cosine_rows(ref, low)
    # the auto choice follows the measured agreement on its calibration set …
    assert (auto.info.precision == "bf16") == (auto.bf16_cosine >= BF16_MIN_COSINE)
    # … and when bf16 is chosen it agrees on real decoded images too
    if auto.info.precision == "bf16":
        assert cos.min() >= BF16_MIN_COSINE


def test_calibration_pixels_are_deterministic():
    assert np.array_equal(calibration_pixels(32, 2, seed=1), calibration_pixels(32, 2, seed=1))


def test_missing_model_path(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_serial_embedder_batches_concurrent_calls_and_keeps_results_apart(tiny_embedder):
    from concurrent.futures import ThreadPoolExecutor
    from indexer.models.embed import SerialEmbedder
    serial = SerialEmbedder(tiny_embedder, max_batch=8)
    px = pixels_for(tiny_embedder, 6, start=700)
    direct, p_direct = tiny_embedder.embed(px)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: serial.embed(px[i:i + 1]), range(6)))
    for i, (e, p) in enumerate(results):
        assert e.shape == (1, 192) and float(e[0] @ direct[i]) > 0.999 and abs(float(p[0] - p_direct[i])) < 1e-3
    with pytest.raises(AssertionError, match="doesn't match model"):
        serial.embed(np.zeros((1, 8, 8, 3), np.uint8))  # the model's error reaches the caller
    assert serial.embed(px[:1])[0].shape == (1, 192)  # and the thread keeps serving


class _Recording:
    """An embedder that records the thread each call ran on, its images and its torch threads; ``hold_s``
    keeps each call busy for that long (a real model's batch takes tens of milliseconds)."""

    def __init__(self, inner, hold_s: float = 0.0) -> None:
        import threading
        self.inner, self.info, self.calls, self.hold_s = inner, inner.info, [], hold_s
        self._lock = threading.Lock()

    def embed(self, pixels: np.ndarray):
        import threading
        import time
        import torch
        out = self.inner.embed(pixels)
        time.sleep(self.hold_s)
        with self._lock:
            self.calls.append((threading.current_thread().name, len(pixels), torch.get_num_threads()))
        return out


def test_timm_lanes_run_one_thread_each_and_agree_with_the_model(tiny_embedder):
    from concurrent.futures import ThreadPoolExecutor
    import torch
    lanes = tiny_embedder.for_lanes(2)
    assert tiny_embedder.for_lanes(1) is tiny_embedder
    px = pixels_for(tiny_embedder, 8, start=800)
    direct, p_direct = tiny_embedder.embed(px)
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda i: (lanes.embed(px[i * 4:i * 4 + 4]), torch.get_num_threads()), range(2)))
    emb = np.concatenate([h[0][0] for h in halves])
    p = np.concatenate([h[0][1] for h in halves])
    assert [h[1] for h in halves] == [1, 1]  # each lane thread runs torch on one thread
    assert float(np.einsum("ij,ij->i", emb, direct).min()) > 0.999 and np.abs(p - p_direct).max() < 1e-3
    assert on_model_thread(torch.get_num_threads) == (os.cpu_count() or 1)  # the model thread keeps every core


def test_serial_embedder_lanes_take_concurrent_batches_and_a_lone_batch_runs_on_every_core(tiny_embedder):
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from indexer.models.embed import SerialEmbedder
    serial = SerialEmbedder(tiny_embedder, max_batch=8, lanes=2)
    assert serial.lanes == 2 and serial.max_batch == 4
    serial.alone, serial.inner = _Recording(serial.alone), _Recording(serial.inner, hold_s=0.2)
    px = pixels_for(tiny_embedder, 12, start=1000)
    direct, _ = tiny_embedder.embed(px)
    e, _ = serial.embed(px[:1])  # nothing else waiting: the model's own threads
    assert serial.alone.calls and not serial.inner.calls and float(e[0] @ direct[0]) > 0.999
    go = threading.Barrier(12)

    def one(i: int) -> float:
        go.wait()
        return float(serial.embed(px[i:i + 1])[0][0] @ direct[i])
    with ThreadPoolExecutor(12) as pool:
        sims = list(pool.map(one, range(12)))
    assert min(sims) > 0.999  # every request gets its own image's vector back
    lane_calls = serial.inner.calls
    assert lane_calls, "concurrent requests ran in lanes"
    assert all(n <= 4 and threads == 1 for _, n, threads in lane_calls), lane_calls
    assert len({name for name, _, _ in lane_calls}) == 2, lane_calls  # both lanes took batches
    # a request still decoding its upload is on its way: a lone batch leaves it a core (runs in a lane)
    from indexer.models.embed import coming
    lane_calls.clear()
    decoding, done = threading.Event(), threading.Event()

    def other_request() -> None:
        with coming(serial):
            decoding.set()
            done.wait(30)  # its decode fails: it never embeds, and must not be waited for
    t = threading.Thread(target=other_request)
    t.start()
    decoding.wait(30)
    alone_before = len(serial.alone.calls)
    serial.embed(px[:1])
    assert len(lane_calls) == 1 and len(serial.alone.calls) == alone_before
    done.set()
    t.join()
    serial.embed(px[:1])  # nobody on the way any more: every core again
    assert len(serial.alone.calls) == alone_before + 1 and len(lane_calls) == 1
    assert coming(tiny_embedder).__enter__() is None  # a plain model: saying so does nothing
