from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flagmatch.wiring import ingest_options
from indexer.storage.catalog import FlagRequest
from indexer.errors import ModelMismatchError, NotFoundError
from indexer.ingest.pipeline import ingest
from indexer.ingest.sources import iter_sources
from tests.helpers import child_env, drawn_image, encode, write_images


class Counting:
    """The real embedder, counting the images it is asked to embed."""

    def __init__(self, inner) -> None:
        self.inner, self.info, self.calls, self.images = inner, inner.info, 0, 0

    def embed(self, pixels):
        self.calls += 1
        self.images += len(pixels)
        return self.inner.embed(pixels)


def run(store, embedder, paths, settings, **kw):
    return ingest(store, embedder, iter_sources([str(p) for p in paths]), ingest_options(settings), **kw)


def test_ingest_records_images_vectors_thumbnails_and_errors(store, tiny_embedder, settings, tmp_path):
    folder = tmp_path / "in"
    write_images(folder, 10)
    write_images(folder / "sub", 2, start=50, fmt="PNG", ext="png")
    broken = encode(drawn_image(99), "JPEG")
    (folder / "broken.jpg").write_bytes(broken[: len(broken) // 2])
    (folder / "notes.txt").write_text("not an image")
    counts = run(store, tiny_embedder, [folder], settings)
    assert (counts.new, counts.duplicates, counts.failed) == (12, 0, 2)
    assert counts.reasons == {"truncated": 1, "unsupported_format": 1}
    cat = store.catalog
    assert cat.max_image_id() == 12
    vectors = store.open_vectors().get(range(1, 13))  # every image's raw vector, from this run's segment
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert len(list((store.home / "vectors").glob("seg-*.f32"))) == 1
    rec = cat.get(4)
    assert rec.paths and Path(rec.paths[0]).exists()
    assert store.thumb_path(rec.thumb_key).is_file()
    assert rec.model_id == tiny_embedder.info.model_id and rec.width == 320 and rec.format in ("JPEG", "PNG")
    errs = {code for _, code, _ in cat.errors()}
    assert errs == {"truncated", "unsupported_format"}
    # the stored vector is the model's embedding of that image
    from indexer.media.decode import decode
    data = Path(rec.paths[0]).read_bytes()
    px = decode(data, tiny_embedder.info.input).pixels[None]
    emb, p = tiny_embedder.embed(px)
    assert float(store.open_vectors().get([rec.id])[0] @ emb[0]) > 0.999
    assert abs(rec.p_unsafe - float(p[0])) < 1e-3


def test_rerun_does_no_model_work_and_duplicates_are_recorded(store, tiny_embedder, settings, tmp_path):
    files = write_images(tmp_path / "in", 6)
    copy = tmp_path / "in" / "zz_same_as_0.jpg"
    copy.write_bytes(files[0].read_bytes())
    counting = Counting(tiny_embedder)
    counts = run(store, counting, [tmp_path / "in"], settings)
    assert (counts.new, counts.duplicates) == (6, 1)
    assert counting.images == 6
    rec = store.catalog.get(store.catalog.resolve(hashlib.sha256(files[0].read_bytes()).hexdigest()))
    assert sorted(rec.paths) == sorted([str(files[0]), str(copy)])

    counting2 = Counting(tiny_embedder)
    counts = run(store, counting2, [tmp_path / "in"], settings)
    assert (counts.new, counts.duplicates, counts.failed) == (0, 7, 0)
    assert counting2.calls == 0 and counting2.images == 0
    assert store.catalog.max_image_id() == 6


def test_threshold_flags_with_source_model(store, tiny_embedder, settings, tmp_path):
    write_images(tmp_path / "in", 4)
    counts = run(store, tiny_embedder, [tmp_path / "in"], settings.replace(flag_threshold=0.0))
    assert counts.flagged == 4
    rec = store.catalog.get(1)
    assert rec.flagged and rec.flag_source == "model"
    assert rec.history[0].actor == "ingest" and "threshold" in rec.history[0].reason


def test_manifest_flags_manual_and_on_known_images(store, tiny_embedder, settings, tmp_path):
    files = write_images(tmp_path / "in", 3)
    run(store, tiny_embedder, [tmp_path / "in"], settings)
    assert store.catalog.stats()["flagged"] == 0
    m = tmp_path / "reports.jsonl"
    new = write_images(tmp_path / "new", 1, start=40)[0]
    m.write_text(f'{{"path": "{files[1]}", "external_id": "case-9", "flagged": true, "label": "gore", '
                 f'"source": "manual"}}\n{{"path": "{new}", "flagged": "yes"}}\n{{"flagged": true}}\n')
    counts = run(store, tiny_embedder, [m], settings)
    assert (counts.new, counts.duplicates, counts.failed, counts.flagged) == (1, 1, 1, 2)
    known = store.catalog.get(store.catalog.resolve("case-9"))
    assert known.flagged and (known.flag_source, known.flag_label) == ("manual", "gore")
    assert known.history[-1].actor == "manifest:reports.jsonl"
    added = store.catalog.get(4)
    assert added.flagged and added.flag_source == "import"


def test_flag_history_is_never_overwritten(store, tiny_embedder, settings, tmp_path):
    files = write_images(tmp_path / "in", 2)
    run(store, tiny_embedder, [tmp_path / "in"], settings)
    cat = store.catalog
    cat.set_flag([1], FlagRequest("manual", "spam", "alice", "reported"), flag=True)
    cat.set_flag([1], FlagRequest("manual", None, "bob", "false positive"), flag=False)
    cat.set_flag([1], FlagRequest("review", "nudity", "carol", "second look"), flag=True)
    hist = cat.get(1).history
    assert [(e.action, e.actor, e.label) for e in hist] == [
        ("flag", "alice", "spam"), ("unflag", "bob", None), ("flag", "carol", "nudity")]
    assert cat.set_flag([1], FlagRequest("review", "nudity", "dave"), flag=True) == []  # no change, no event
    with pytest.raises(NotFoundError):
        cat.resolve("no-such-thing")
    assert cat.resolve(hashlib.sha256(files[1].read_bytes()).hexdigest()) == 2


def test_a_different_model_is_refused(store, tiny_embedder, opennsfw, settings, tmp_path):
    write_images(tmp_path / "in", 2)
    run(store, tiny_embedder, [tmp_path / "in"], settings)
    with pytest.raises(ModelMismatchError, match="tiny-nsfw@"):
        run(store, opennsfw, [tmp_path / "in"], settings)


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as c:
            return int(c.execute("select count(*) from images").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_kill_9_at_any_moment_then_resume(tmp_path, tiny_model_dir):
    """Kill ingest with SIGKILL several times mid-run; rerunning ends with every image once and the
    catalog, raw vectors and indexes in agreement."""
    folder = tmp_path / "in"
    files = write_images(folder, 90)
    home, ref_home = tmp_path / "home", tmp_path / "ref"
    env = child_env(FLAGMATCH_MODEL=str(tiny_model_dir), FLAGMATCH_BATCH_SIZE="6",
               FLAGMATCH_PRECISION="fp32", FLAGMATCH_INDEX_SAVE_SECONDS="0")
    cmd = [sys.executable, "-m", "flagmatch.cli", "ingest", str(folder)]
    db = home / "catalog.sqlite"
    kills = 0
    rng = np.random.default_rng(7)
    for _ in range(4):
        before = _rows(db)
        p = subprocess.Popen(cmd + ["--home", str(home)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # wait for progress past where we were, then a random extra moment, then SIGKILL
        while _rows(db) <= before and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 0.6)))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    done = subprocess.run(cmd + ["--home", str(home)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run(cmd + ["--home", str(ref_home)], env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr

    from flagmatch.settings import Settings
    from flagmatch.wiring import open_index, open_store
    st = open_store(Settings.load({"home": str(home)}, environ={}))
    rs = open_store(Settings.load({"home": str(ref_home)}, environ={}))
    cat = st.catalog
    assert cat.max_image_id() == len(files) == cat.stats()["images"]
    recs = cat.get_many(range(1, len(files) + 1))
    assert sorted(r.paths[0] for r in recs.values()) == sorted(map(str, files))  # none lost, none twice
    vec = st.open_vectors()
    ref_by_sha = {r.sha256: r.id for r in rs.catalog.get_many(range(1, len(files) + 1)).values()}
    ids = np.arange(1, len(files) + 1)
    ours = vec.get(ids)
    theirs = rs.open_vectors().get([ref_by_sha[recs[int(i)].sha256] for i in ids])
    assert np.einsum("ij,ij->i", ours, theirs).min() > 0.999  # each row is its own image's vector
    idx = open_index(st, Settings.load({"home": str(home)}, environ={}))
    assert idx.stats()["all"]["vectors"] == len(files)
    hits = idx.search(ours[:5], 1, "all")
    assert [int(h.ids[0]) for h in hits] == [1, 2, 3, 4, 5]


def test_tables_created_by_many_processes_at_once(tmp_path):
    """Server workers open the same fresh store together; none of them may fail on "already exists"."""
    code = ("import sys; from indexer.storage.store import Store; from indexer.storage.clusters import ClusterStore; "
            "from indexer.storage.audit import AuditLog; s = Store(__import__('pathlib').Path(sys.argv[1]), sys.argv[2]); "
            "ClusterStore(s); AuditLog(s.catalog.engine)")
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), url], stderr=subprocess.PIPE)
             for _ in range(6)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for e in errors if e][:1]


class _LaneRecording:
    """The real model's lanes, recording the thread and size of each batch they are given."""

    def __init__(self, inner) -> None:
        import threading
        self.inner, self.info, self.batches, self._lock = inner, inner.info, [], threading.Lock()

    def for_lanes(self, lanes: int) -> "_LaneRecording":
        rec = _LaneRecording(self.inner.for_lanes(lanes))
        self.lanes = rec
        return rec

    def embed(self, pixels):
        import threading
        import time
        out = self.inner.embed(pixels)
        time.sleep(0.05)  # a real batch takes a while: the other lane gets the next one meanwhile
        with self._lock:
            self.batches.append((threading.current_thread().name, len(pixels)))
        return out


def test_model_lanes_split_the_batch_and_keep_every_vector_with_its_image(store, tiny_embedder, settings, tmp_path):
    from dataclasses import replace
    from indexer.media.decode import decode
    folder = tmp_path / "in"
    write_images(folder, 20)
    model = _LaneRecording(tiny_embedder)
    opts = replace(ingest_options(settings), batch_size=8, model_lanes=2)
    counts = ingest(store, model, iter_sources([str(folder)]), opts)
    assert counts.new == 20
    batches = model.lanes.batches
    assert sum(n for _, n in batches) == 20 and max(n for _, n in batches) == 4  # batch_size ÷ lanes each
    assert len({name for name, _ in batches}) == 2  # both lanes ran batches
    recs = store.catalog.get_many(range(1, 21))
    px = np.stack([decode(Path(recs[i].paths[0]).read_bytes(), tiny_embedder.info.input).pixels for i in range(1, 21)])
    direct, p = tiny_embedder.embed(px)
    stored = store.open_vectors().get(range(1, 21))
    assert np.einsum("ij,ij->i", stored, direct).min() > 0.999  # each row is its own image's vector
    assert max(abs(recs[i].p_unsafe - float(p[i - 1])) for i in range(1, 21)) < 1e-3


def test_two_ingests_of_the_same_files_build_the_same_store(tmp_path, tiny_model_dir):
    """The same files ingested into two homes, then reindexed (a learned matching space, fitted from seeded
    synthetic re-uploads): the raw vectors, the space's training pairs, the space and the index are the same
    bytes — two runs answer every search alike."""
    from click.testing import CliRunner
    from flagmatch.cli import main
    from tests.helpers import clean_env
    write_images(tmp_path / "in", 70)
    files = {}
    for home in ("a", "b"):
        common = ["--home", str(tmp_path / home), "--model", str(tiny_model_dir), "--space-min-vectors", "50"]
        for command in (["ingest", str(tmp_path / "in")], ["reindex"]):
            r = CliRunner().invoke(main, [*command, *common], env=clean_env(), catch_exceptions=False)
            assert r.exit_code == 0, r.output
        files[home] = {p.relative_to(tmp_path / home).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                       for pattern in ("vectors/seg-*.f32", "index/space-*.npz", "index/*.faiss*")
                       for p in (tmp_path / home).glob(pattern)}
    assert any(name.startswith("index/space-0") for name in files["a"]), "a matching space was fitted"
    assert files["a"] == files["b"]
