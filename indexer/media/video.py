"""Video from bytes (PyAV: FFmpeg's libraries in a wheel), decoded the way ``indexer.media.decode`` decodes
images: an allow-list read from the bytes, never the name; a budget checked against the headers before
any frame is decoded; a coded ``DecodeError`` for everything refused.

- **Allow-list**: the container is recognised from its first bytes (ISO BMFF ``ftyp``: MP4/MOV; EBML:
  Matroska/WebM; ``RIFF…AVI``; GIF, when it has more than one frame) and must be what FFmpeg then finds; the video codec must be one of
  ``CODECS``. Audio and every other stream are never decoded.
- **Budget** (``VideoLimits``), from the headers first: bytes, duration, frame size, frames (the count
  the container states, or duration × frame rate); then while decoding, because headers lie: frames
  actually decoded, the frame size of each, and wall time.
- **Bounded memory**: frames are decoded one at a time and dropped at once; what is kept is a 32×32 grey
  copy of the last sampled frame (for scene cuts) and the keyframes chosen so far, each shrunk to
  ``keyframe_side`` — never more than ``max_keyframes`` of them.
- **Keyframes**: the first frame, every frame that differs from the last sampled one by more than
  ``scene_cut`` (mean absolute difference of the grey copies, 0–1: a scene cut), and one every
  ``every_s`` seconds; frames are looked at ``sample_fps`` times a second at most. A frame of one colour
  (grey copy's standard deviation under ``flat``: a fade, a black or white card) is never kept — it would
  match every blank picture in a store at similarity 1 — unless the clip has nothing else (then its first)."""
from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image

from indexer.errors import DecodeError

if TYPE_CHECKING:
    from indexer.media.decode import DecodedImage, InputSpec

# the first bytes of each allowed container → the names FFmpeg gives the demuxer that must read it
CONTAINERS = {"mp4": ("mov,mp4,m4a,3gp,3g2,mj2",), "matroska": ("matroska,webm",), "avi": ("avi",),
              "gif": ("gif",)}
CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg", "gif",
                    "theora", "msmpeg4v3", "msmpeg4v2", "h263"})


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 512 * 1024 * 1024
    max_duration_s: float = 3 * 3600.0
    max_side: int = 8192              # a frame's width or height
    max_frame_pixels: int = 40_000_000
    max_frames: int = 1_000_000        # frames stated or decoded
    wall_s: float = 300.0
    every_s: float = 5.0               # one keyframe at least this often
    max_keyframes: int = 64
    scene_cut: float = 0.12            # mean absolute grey difference (0-1) that starts a new scene
    sample_fps: float = 4.0            # frames looked at per second, at most
    keyframe_side: int = 512           # a kept keyframe's long side, at most
    flat: float = 0.008                # a frame whose grey copy varies less than this (std, 0-1) is not kept


@dataclass(frozen=True)
class VideoInfo:
    container: str
    codec: str
    width: int
    height: int
    duration_s: float
    frames: int           # stated by the container, or estimated from duration × rate
    fps: float


@dataclass(frozen=True)
class Keyframe:
    offset_s: float
    image: Image.Image    # RGB, long side at most ``keyframe_side``
    scene_cut: bool       # a cut (or the first frame), not only the periodic sample


def sniff(data: bytes) -> str | None:
    """The allowed container these bytes start like, or None."""
    head = data[:16]
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _open(data: bytes, limits: VideoLimits):  # type: ignore[no-untyped-def]
    try:
        import av
    except ImportError:
        raise DecodeError("video needs PyAV: install flagmatch's video extra (pip install 'flagmatch[video]')",
                          code="unsupported_format") from None
    if len(data) > limits.max_bytes:
        raise DecodeError(f"video is {len(data):,} bytes, over the cap of {limits.max_bytes:,}", code="too_large")
    kind = sniff(data)
    if kind is None:
        raise DecodeError("not an allowed video container (MP4/MOV, WebM/MKV, AVI, GIF)", code="unsupported_format")
    try:
        container = av.open(io.BytesIO(data), mode="r", format=None, metadata_errors="ignore",
                            options={"probesize": "5000000", "analyzeduration": "5000000"})
    except av.error.InvalidDataError as exc:
        raise DecodeError(f"the video's container cannot be read ({exc.strerror or exc})", code="corrupt") from None
    except av.error.FFmpegError as exc:
        raise DecodeError(f"the video cannot be opened ({exc.strerror or exc})", code="corrupt") from None
    if container.format.name not in CONTAINERS[kind]:
        container.close()
        raise DecodeError(f"the bytes start like {kind} but FFmpeg reads {container.format.name}",
                          code="unsupported_format")
    return container


def probe(data: bytes, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """The video's facts from its headers, refused before any frame is decoded when over the budget."""
    container = _open(data, limits)
    try:
        return _info(container, limits)
    finally:
        container.close()


def _info(container, limits: VideoLimits) -> VideoInfo:  # type: ignore[no-untyped-def]
    videos = [s for s in container.streams if s.type == "video"]
    if not videos:
        raise DecodeError("the file holds no video stream", code="unsupported_format")
    stream = videos[0]
    codec = stream.codec_context.name
    if codec not in CODECS:
        raise DecodeError(f"video codec {codec!r} is not accepted", code="unsupported_format")
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width <= 0 or height <= 0:
        raise DecodeError("the video states no frame size", code="corrupt")
    if max(width, height) > limits.max_side or width * height > limits.max_frame_pixels:
        raise DecodeError(f"frames are {width}×{height}, over the cap of {limits.max_side} px a side and "
                          f"{limits.max_frame_pixels:,} pixels", code="too_large")
    durations = [float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0,
                 container.duration / 1_000_000 if container.duration else 0.0]
    duration = max(durations)
    if duration > limits.max_duration_s:
        raise DecodeError(f"the video lasts {duration / 3600:.1f} h, over the cap of "
                          f"{limits.max_duration_s / 3600:.1f} h", code="too_long")
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    frames = max(int(stream.frames or 0), int(duration * rate))
    if frames > limits.max_frames:
        raise DecodeError(f"the video has {frames:,} frames, over the cap of {limits.max_frames:,}",
                          code="too_many_frames")
    return VideoInfo(container.format.name.split(",")[0], codec, width, height, duration, frames, rate)


def _grey(frame_image: Image.Image) -> np.ndarray:
    return np.asarray(frame_image.convert("L").resize((32, 32), Image.BILINEAR), np.float32) / 255.0


def keyframes(data: bytes, limits: VideoLimits = VideoLimits()) -> tuple[VideoInfo, list[Keyframe]]:
    """Probe, then decode and choose the keyframes (module docstring)."""
    container = _open(data, limits)
    try:
        info = _info(container, limits)
        return info, list(_choose(container, info, limits))
    finally:
        container.close()


def _choose(container, info: VideoInfo, limits: VideoLimits) -> Iterator[Keyframe]:  # type: ignore[no-untyped-def]
    import av
    stream = next(s for s in container.streams if s.type == "video")
    stream.thread_type = "AUTO"
    started = time.monotonic()
    decoded = kept = 0
    last_look = last_kept = -1e9
    prev: np.ndarray | None = None
    blank: Keyframe | None = None  # the first frame, held while every frame so far is flat
    try:
        for frame in container.decode(stream):
            decoded += 1
            if decoded > limits.max_frames:
                raise DecodeError(f"the video has more than {limits.max_frames:,} frames", code="too_many_frames")
            if time.monotonic() - started > limits.wall_s:
                raise DecodeError(f"decoding took longer than {limits.wall_s:.0f} s", code="timeout")
            if frame.width > limits.max_side or frame.height > limits.max_side or \
                    frame.width * frame.height > limits.max_frame_pixels:
                raise DecodeError(f"a frame is {frame.width}×{frame.height}, over the cap", code="too_large")
            t = float(frame.time) if frame.time is not None else decoded / (info.fps or 25.0)
            if t - last_look < 1.0 / limits.sample_fps:
                continue
            last_look = t
            image = frame.to_image()  # RGB; the frame's buffer goes back to the decoder
            grey = _grey(image)
            cut = prev is None or float(np.abs(grey - prev).mean()) > limits.scene_cut
            prev = grey
            if cut or t - last_kept >= limits.every_s:
                if float(grey.std()) < limits.flat:
                    if blank is None and not kept:
                        image.thumbnail((limits.keyframe_side, limits.keyframe_side), Image.BILINEAR)
                        blank = Keyframe(round(t, 3), image, cut)
                    continue
                image.thumbnail((limits.keyframe_side, limits.keyframe_side), Image.BILINEAR)
                yield Keyframe(round(t, 3), image, cut)
                kept += 1
                last_kept = t
                if kept >= limits.max_keyframes:
                    return
    except av.error.FFmpegError as exc:  # a damaged stream is refused, as a damaged image is
        raise DecodeError(f"the video stream is damaged after {decoded} frames ({exc.strerror or exc})",
                          code="corrupt") from None
    if decoded == 0:
        raise DecodeError("the video holds no decodable frame", code="truncated")
    if not kept and blank is not None:  # a clip of one colour throughout: its first frame stands for it
        yield blank
    if info.frames and decoded < 0.9 * info.frames and decoded + 2 < info.frames:
        raise DecodeError(f"the video ends after {decoded} of the {info.frames} frames it states", code="truncated")


# ---------------------------------------------------------------- a clip made ready for the model

VIDEO_CONTAINERS = ("mp4", "matroska", "avi")


def is_video(data: bytes) -> bool:
    """Whether these bytes are taken as video: they start like MP4/MOV, WebM/MKV or AVI, or they are a GIF of
    more than one frame (an animated GIF is a clip: its unsafe frame need not be its first). A still GIF is an
    image; frames are counted by walking the GIF's blocks, nothing is decoded."""
    kind = sniff(data)
    if kind == "gif":
        from indexer.media.decode import gif_frames
        return gif_frames(data, 2) > 1
    return kind in VIDEO_CONTAINERS


@dataclass(frozen=True)
class Frame:
    offset_s: float
    scene_cut: bool
    image: "DecodedImage"  # the model's pixels, the thumbnail and the query views of the keyframe


@dataclass(frozen=True)
class DecodedVideo:
    info: VideoInfo
    frames: list[Frame]    # the keyframes, in clip order (at least one)
    vpdq: str | None       # threatexchange's vPDQ signal string; None when not asked for (or vpdq is missing)


def decode_video(data: bytes, spec: "InputSpec", limits: VideoLimits = VideoLimits(), *, thumb_size: int = 0,
                 views: tuple[str, ...] = (), want_vpdq: bool = True) -> DecodedVideo:
    """Keyframes (``keyframes``: budgets first) each made ready as an image (``decode_frame``), and the vPDQ of
    the whole clip — hashed by ``vpdq`` from a private temporary file, only after the clip passed the budget."""
    from indexer.media.decode import decode_frame
    info, kept = keyframes(data, limits)
    frames = [Frame(k.offset_s, k.scene_cut, decode_frame(k.image, spec, thumb_size=thumb_size, views=views))
              for k in kept]
    return DecodedVideo(info, frames, vpdq_of_bytes(data) if want_vpdq and vpdq_available() else None)


@functools.lru_cache(maxsize=1)
def vpdq_available() -> bool:
    """Whether Meta's vpdq library is installed (the video extra): without it a clip is embedded, not vPDQ-hashed."""
    import importlib.util
    return importlib.util.find_spec("vpdq") is not None


def vpdq_of_bytes(data: bytes, seconds_per_hash: float = 1.0) -> str:
    """``vpdq_json`` of bytes (the library reads a file: a private temporary one, removed at once)."""
    import tempfile
    with tempfile.NamedTemporaryFile(prefix="flagmatch-vpdq-", suffix=".video") as f:
        f.write(data)
        f.flush()
        try:
            return vpdq_json(f.name, seconds_per_hash)
        except Exception as exc:  # the library's own decoder refused what FFmpeg's keyframes took
            raise DecodeError(f"the video cannot be vPDQ-hashed ({exc})", code="corrupt") from None


# ---------------------------------------------------------------- vPDQ (threatexchange's signal type)

@dataclass(frozen=True)
class VpdqMatch:
    match: bool
    query_match_percent: float     # of the query's frames, the share that matched one of the other's
    compared_match_percent: float  # and the other way round


def vpdq_json(path: "str | Path", seconds_per_hash: float = 1.0) -> str:
    """The video's vPDQ — one PDQ hash per ``seconds_per_hash`` with its quality and timestamp — in
    threatexchange's format (``VPDQSignal``'s signal string: what HMA stores and exchanges), computed by
    Meta's ``vpdq`` library as threatexchange calls it. The file must have passed ``keyframes`` first: the
    library decodes every frame with no budget of its own."""
    from threatexchange.extensions.vpdq.vpdq import VPDQSignal
    return str(VPDQSignal.hash_from_file(Path(path), seconds_per_hash))


def vpdq_match(query: str, other: str) -> VpdqMatch:
    """Compare two vPDQ signal strings with HMA's semantics (threatexchange's thresholds: frame distance,
    frame quality, and both match percentages)."""
    from threatexchange.extensions.vpdq.vpdq import VPDQSignal
    result = VPDQSignal.compare_hash(query, other)
    info = result.distance  # a VPDQSimilarityInfo
    return VpdqMatch(bool(result.match), float(info.query_match_percent), float(info.compared_match_percent))
