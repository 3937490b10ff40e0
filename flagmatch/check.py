"""``flagmatch check [--repair]``: is a home whole? After a disk incident, a restore or a crash nobody
saw, each part is checked against the catalog, the record everything else is rebuilt from:

- **vectors**: every live image has its raw row in its segment, and the row is sane (finite, not the
  zeros a deletion leaves, its norm near the store's median). A lost row cannot be rebuilt from the
  store (the model's input is gone with it): reported, with the image ids.
- **index**: each FAISS scope's file matches its checkpoint's checksum, and the index, caught up with the
  catalog, holds exactly the catalog's members (every live image in ``all``, every flagged one in
  ``flagged``). Repair: rebuild the scope from the raw vectors and publish it.
- **hashes**: every live image has its hashes (PDQ, MD5), and each PDQ index file matches its
  checkpoint. Repair: hash the images again from their originals (``hashes backfill``), rebuild the PDQ
  indexes.
- **thumbnails**: every live image's thumbnail is there and decodes. Repair: made again from the
  original where it is still at a recorded path with the same sha256; otherwise reported.
- **keyframes**: every live video has keyframes, each with its thumbnail and a sane raw row. Repair of
  thumbnails: the video's keyframes chosen again from its original (the same offsets, so the same names);
  a lost keyframe row is reported, as a lost image row is.
- **audit**: the trail is continuous — ids never skip on SQLite (rows are never deleted; PostgreSQL's
  sequences skip on a rolled-back insert, so gaps are not evidence there) and times never run backwards
  by more than ``AUDIT_SKEW`` (hosts' clocks differ a little). Nothing repairs an audit trail: reported.

The check reads the whole store (vectors in chunks). ``--repair`` publishes indexes as ``reindex`` does (under
the index lock) and hashes as ``hashes backfill`` does (under the writer's lock)."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from indexer.errors import DecodeError, FlagmatchError
from indexer.storage.audit import AuditLog
from indexer.storage.files import file_sha256
from indexer.storage.store import Store, read_original

if TYPE_CHECKING:
    from indexer.ingest.pipeline import IngestOptions
    from indexer.vectors.vector_index import VectorIndex
    from search.hashmatch import HashMatcher

AUDIT_SKEW_S = 300.0
INDEX_FILES = {"all": "all.faiss", "flagged": "flagged.faiss"}  # checkpoint scope: file in index/
PDQ_FILES = {"pdq:images": "pdq-images.faissb", "pdq:banks": "pdq-banks.faissb"}
EXAMPLES = 10
Say = Callable[[str, int, int], None]


@dataclass
class Finding:
    part: str
    code: str
    message: str
    ids: list[int] = field(default_factory=list)
    repairable: bool = False
    repaired: int = 0
    scope: str = ""  # the index scope a finding is about

    @property
    def count(self) -> int:
        return len(self.ids) or 1

    def to_json(self) -> dict:
        return {"part": self.part, "code": self.code, "scope": self.scope, "message": self.message, "count": self.count,
                "examples": self.ids[:EXAMPLES], "repairable": self.repairable, "repaired": self.repaired}


@dataclass
class CheckReport:
    checked: dict[str, int] = field(default_factory=dict)  # part: items looked at
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.repaired >= f.count for f in self.findings)


# ---------------------------------------------------------------- vectors

def check_vectors(store: Store, ids: np.ndarray, say: Say) -> list[Finding]:
    if not len(ids):
        return []
    vs = store.open_vectors()
    try:
        present = vs.present(ids)
    except FlagmatchError as exc:
        return [Finding("vectors", "vector_unlocated", exc.message)]
    out = []
    if not present.all():
        out.append(Finding("vectors", "vector_missing", "raw vectors missing (their segment was cut short): "
                           "these images cannot be searched or re-indexed; delete them and ingest their "
                           "originals again", ids[~present].tolist()))
    have = ids[present]
    norms = np.empty(len(have), np.float32)
    for k in range(0, len(have), 65536):
        rows = vs.get(have[k:k + 65536])
        with np.errstate(over="ignore", invalid="ignore"):
            norms[k:k + 65536] = np.linalg.norm(rows.astype(np.float64), axis=1)
        say("vectors", min(k + 65536, len(have)), len(have))
    finite = np.isfinite(norms)
    zero = finite & (norms == 0)
    median = float(np.median(norms[finite & ~zero])) if (finite & ~zero).any() else 0.0
    odd = finite & ~zero & ((norms < 0.5 * median) | (norms > 2 * median))
    if zero.any():
        out.append(Finding("vectors", "vector_erased", "raw vectors are all zeros (erased, as a deletion erases "
                           "them) for live images", have[zero].tolist()))
    if (~finite | odd).any():
        out.append(Finding("vectors", "vector_corrupt", f"raw vectors are not finite or far from the store's "
                           f"norm ({median:.3g})", have[~finite | odd].tolist()))
    return out


# ---------------------------------------------------------------- indexes

def check_index_files(store: Store, files: dict[str, str]) -> list[Finding]:
    """{checkpoint scope: file name in index/} against their checkpoints."""
    out = []
    for scope, name in files.items():
        cp = store.catalog.checkpoint(scope)
        path = store.index_dir / name
        part = "index" if scope in ("all", "flagged") else "hashes"
        if cp is None:
            if path.exists():
                out.append(Finding(part, "index_no_checkpoint", f"{name} has no checkpoint in the catalog",
                                   repairable=True, scope=scope))
            continue
        try:
            ok = file_sha256(path) == cp.checksum
        except OSError:
            ok = False
        if not ok:
            out.append(Finding(part, "index_checksum", f"{name} is missing or does not match its checkpoint "
                               f"(generation {cp.generation})", repairable=True, scope=scope))
    return out


def check_members(store: Store, index: "VectorIndex") -> list[Finding]:
    out = []
    want = {"all": set(store.catalog.image_ids()), "flagged": set(store.catalog.image_ids(flagged=True))}
    for scope, ids in want.items():
        held = index.members(scope)
        extra, lost = sorted(held - ids), sorted(ids - held)
        if extra:
            out.append(Finding("index", "index_extra", f"the {scope} index holds images the catalog does not have "
                               f"there", extra, repairable=True, scope=scope))
        if lost:
            out.append(Finding("index", "index_lacks", f"the {scope} index lacks images the catalog has there",
                               lost, repairable=True, scope=scope))
    return out


# ---------------------------------------------------------------- thumbnails

def check_thumbnails(store: Store, ids: np.ndarray, say: Say) -> tuple[list[int], list[int]]:
    """(images whose thumbnail is missing, images whose thumbnail does not decode)."""
    from PIL import Image
    missing, broken = [], []
    for k in range(0, len(ids), 1000):
        for rec in store.catalog.get_many(ids[k:k + 1000].tolist()).values():
            if not rec.thumb_key:
                continue  # removed by retention, and recorded so
            path = store.thumb_path(rec.thumb_key)
            try:
                data = path.read_bytes()
            except OSError:
                missing.append(rec.id)
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except Exception:  # any decoder's complaint: the file is not a thumbnail any more
                broken.append(rec.id)
        say("thumbnails", min(k + 1000, len(ids)), len(ids))
    return missing, broken


def check_keyframes(store: Store, ids: np.ndarray) -> list[Finding]:
    """Live videos without keyframes, whose keyframes' thumbnails are missing, or whose keyframe rows are gone
    or zero."""
    videos = [r.id for k in range(0, len(ids), 1000)
              for r in store.catalog.get_many(ids[k:k + 1000].tolist()).values() if r.kind == "video"]
    if not videos:
        return []
    frames = store.catalog.keyframes(videos)
    vs = store.open_vectors()
    none, thumbs, rows = [], [], []
    for v in videos:
        fs = frames.get(v, [])
        if not fs:
            none.append(v)
            continue
        if any(f.thumb_key and not store.thumb_path(f.thumb_key).is_file() for f in fs):
            thumbs.append(v)
        try:
            got = vs.get_rows(np.array([f.vec_segment for f in fs]), np.array([f.vec_row for f in fs]))
            if not np.isfinite(got).all() or not np.abs(got).sum(axis=1).all():
                rows.append(v)
        except FlagmatchError:
            rows.append(v)
    out = []
    if none:
        out.append(Finding("keyframes", "keyframes_missing", "live videos without keyframes", none))
    if thumbs:
        out.append(Finding("keyframes", "keyframe_thumb_missing", "videos with keyframe thumbnails missing", thumbs,
                           repairable=True))
    if rows:
        out.append(Finding("keyframes", "keyframe_vector_missing", "videos whose keyframes' raw vectors are missing "
                           "or erased", rows))
    return out


def remake_thumbnails(store: Store, ids: list[int], opts: "IngestOptions") -> int:
    """Thumbnails made again from the originals that are still where they were seen (a video's: each of its
    keyframes'); how many."""
    from indexer.ingest.pipeline import keyframe_name
    from indexer.media.decode import decode
    from indexer.media.video import decode_video, is_video
    from indexer.models.embed import InputSpec
    from indexer.storage.files import publish
    done = 0
    for rec in store.catalog.get_many(ids).values():
        found = read_original(rec.paths, rec.sha256, opts.max_file_bytes)
        if found.data is None:
            continue
        try:
            if is_video(found.data):
                clip = decode_video(found.data, InputSpec(224), opts.video, thumb_size=opts.thumb_size,
                                    want_vpdq=False)
                for f in clip.frames:
                    path = store.thumb_path(store.thumb_key(keyframe_name(rec.sha256, f.offset_s)))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    publish(path, f.image.thumbnail)
                done += 1
                continue
            thumb = decode(found.data, InputSpec(224), opts.limits, thumb_size=opts.thumb_size).thumbnail
        except DecodeError:
            continue
        path = store.thumb_path(rec.thumb_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        publish(path, thumb)
        done += 1
    return done


# ---------------------------------------------------------------- audit

def check_audit(store: Store) -> list[Finding]:
    gaps, backwards = [], []
    sqlite = store.catalog.engine.dialect.name == "sqlite"
    prev_id, prev_at = 0, None
    for row_id, at in AuditLog(store.catalog.engine).trail():
        if sqlite and row_id != prev_id + 1 and prev_id:
            gaps.append(prev_id + 1)
        if prev_at is not None and (prev_at - at).total_seconds() > AUDIT_SKEW_S:
            backwards.append(row_id)
        prev_id, prev_at = row_id, at if prev_at is None or at > prev_at else prev_at
    out = []
    if gaps:
        out.append(Finding("audit", "audit_gap", "audit rows are missing after these ids' predecessors (rows are "
                           "never deleted by flagmatch: restore them from a backup)", gaps))
    if backwards:
        out.append(Finding("audit", "audit_order", f"audit rows dated more than {AUDIT_SKEW_S:.0f} s before an "
                           f"earlier row (altered times)", backwards))
    return out


# ---------------------------------------------------------------- the job

def check(store: Store, *, open_index: Callable[[], "VectorIndex"], matcher: "HashMatcher", opts: "IngestOptions",
          repair: bool = False, progress: Say | None = None) -> CheckReport:
    """Check every part (module docstring); with ``repair``, rebuild what the raw data allows and check the
    repaired parts again (a repair counts only once the second look finds the part whole)."""
    say = progress or (lambda stage, done, total: None)
    report = CheckReport()
    ids = np.asarray(store.catalog.image_ids(), np.int64)
    report.checked["images"] = len(ids)
    if len(ids):
        report.findings += check_vectors(store, ids, say)
    report.findings += check_index_files(store, {**INDEX_FILES, **PDQ_FILES})
    report.checked["index files"] = sum((store.index_dir / n).exists() for n in {**INDEX_FILES, **PDQ_FILES}.values())
    index = None
    if len(ids):
        try:
            index = open_index()  # a scope whose file is damaged is rebuilt in memory as it opens
        except FlagmatchError as exc:
            report.findings.append(Finding("index", "index_unopenable", f"the vector indexes cannot be opened: "
                                           f"{exc.message}"))
    if index is not None:
        report.findings += check_members(store, index)
    unhashed = [i for i, _, _ in store.catalog.unhashed(0, 10**9)]
    if unhashed:
        report.findings.append(Finding("hashes", "unhashed", "live images without hashes (PDQ, MD5)", unhashed,
                                       repairable=True))
    missing, broken = check_thumbnails(store, ids, say)
    report.checked["thumbnails"] = len(ids)
    if missing:
        report.findings.append(Finding("thumbnails", "thumb_missing", "thumbnails missing", missing, repairable=True))
    if broken:
        report.findings.append(Finding("thumbnails", "thumb_corrupt", "thumbnails that do not decode", broken,
                                       repairable=True))
    report.findings += check_keyframes(store, ids)
    report.findings += check_audit(store)
    if repair:
        _repair(store, report, index, matcher, opts, say)
    return report


def _repair(store: Store, report: CheckReport, index: "VectorIndex | None", matcher: "HashMatcher",
            opts: "IngestOptions", say: Say) -> None:
    todo = [f for f in report.findings if f.repairable]
    codes = {f.code for f in todo}

    lost = [f for f in report.findings if f.code in ("vector_missing", "vector_unlocated")]
    if lost:
        for f in todo:
            if f.part == "index":
                f.message += ("; not rebuilt: raw vectors are missing (delete the images they belonged to, then "
                              "check --repair again)")
    elif index is not None and any(f.part == "index" for f in todo):
        say("repair index", 0, 1)
        for scope in sorted({f.scope for f in todo if f.part == "index"}):
            index.rebuild(scope, refit=False)
        index.save()
        again = check_index_files(store, INDEX_FILES) + check_members(store, index)
        for f in todo:
            if f.part == "index" and not again:
                f.repaired = f.count
    if "unhashed" in codes:
        from indexer.ingest.pipeline import backfill_hashes
        say("repair hashes", 0, 1)
        backfill_hashes(store, opts)
    if "unhashed" in codes or any(f.part == "hashes" and f.code == "index_checksum" for f in todo):
        matcher.rebuild()
        left = {i for i, _, _ in store.catalog.unhashed(0, 10**9)}
        pdq_ok = not check_index_files(store, PDQ_FILES)
        for f in todo:
            if f.code == "unhashed":
                f.repaired = sum(i not in left for i in f.ids)
            elif f.part == "hashes" and pdq_ok:
                f.repaired = f.count
    thumbs = [f for f in todo if f.part == "thumbnails"]
    if thumbs:
        say("repair thumbnails", 0, 1)
        remake_thumbnails(store, sorted({i for f in thumbs for i in f.ids}), opts)
        missing, broken = check_thumbnails(store, np.asarray(sorted({i for f in thumbs for i in f.ids}), np.int64),
                                           say)
        bad = set(missing) | set(broken)
        for f in thumbs:
            f.repaired = sum(i not in bad for i in f.ids)
    frames = [f for f in todo if f.code == "keyframe_thumb_missing"]
    if frames:
        say("repair keyframe thumbnails", 0, 1)
        ids = sorted({i for f in frames for i in f.ids})
        remake_thumbnails(store, ids, opts)
        left = {i for f in check_keyframes(store, np.asarray(ids, np.int64)) if f.code == "keyframe_thumb_missing"
                for i in f.ids}
        for f in frames:
            f.repaired = sum(i not in left for i in f.ids)
