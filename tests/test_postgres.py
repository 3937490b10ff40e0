"""Many machines, one catalog, on a real PostgreSQL server: concurrent ingest processes, a writer killed
with SIGKILL and resumed, two serving replicas of one catalog, a reindex under a request burst, and a
store from before migrations upgraded in place (on SQLite too). Skipped with the reason where no server
is configured (tests/helpers/pg.py)."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import pg
from tests.helpers import child_env, start_server, stop_server, write_images

TOKEN = "pg-token"
CLI = [sys.executable, "-m", "flagmatch.cli"]


@pytest.fixture
def pg_url():
    url = pg.create_database()
    yield url
    pg.drop_database(url)


def env_for(home: Path, url: str, model: Path, **extra: str) -> dict:
    return child_env(FLAGMATCH_HOME=str(home), FLAGMATCH_CATALOG_URL=url, FLAGMATCH_MODEL=str(model),
                     FLAGMATCH_PRECISION="fp32", FLAGMATCH_BATCH_SIZE="4", FLAGMATCH_FLAG_THRESHOLD="0.0",
                     FLAGMATCH_INDEX_SAVE_SECONDS="0", FLAGMATCH_API_TOKENS=f"ops:{TOKEN}", **extra)


def open_settings(home: Path, url: str):  # type: ignore[no-untyped-def]
    from flagmatch.settings import Settings
    return Settings.load({"home": str(home), "catalog_url": url}, environ={})


def overlapping_folders(root: Path) -> tuple[list[Path], list[Path]]:
    """Two folders sharing 20 images (the same bytes under other names) plus 20 of their own each."""
    a = write_images(root / "a", 40)
    b = write_images(root / "b", 40, start=20)
    return a, b


def assert_union_once(home: Path, url: str, files: list[Path], ref_vectors: dict[str, np.ndarray]) -> None:
    from flagmatch.wiring import open_index, open_store
    s = open_settings(home, url)
    st = open_store(s)
    try:
        cat = st.catalog
        ids = cat.image_ids()
        recs = cat.get_many(ids)
        shas = [r.sha256 for r in recs.values()]
        assert len(shas) == len(set(shas)) == len(ref_vectors), "every distinct image once"
        paths = sorted(p for r in recs.values() for p in r.paths)
        assert paths == sorted(map(str, files)), "every path recorded, none twice"
        assert ids == list(range(1, len(ids) + 1)), "ids from the database, without gaps"
        vec = st.open_vectors().get(ids)
        want = np.stack([ref_vectors[recs[i].sha256] for i in ids])
        assert np.einsum("ij,ij->i", vec, want).min() > 0.999, "each image's own vector"
        idx = open_index(st, s)
        assert idx.stats()["all"]["vectors"] == len(ids)
        hits = idx.search(vec[:8], 1, "all")
        assert [int(h.ids[0]) for h in hits] == ids[:8]
    finally:
        st.close()


def reference_vectors(tmp_path: Path, files: list[Path], model: Path) -> dict[str, np.ndarray]:
    """The vectors a plain single SQLite ingest of the same images gives, by sha256."""
    from flagmatch.wiring import open_store
    home = tmp_path / "ref"
    env = env_for(home, "", model)
    env.pop("FLAGMATCH_CATALOG_URL")
    for folder in sorted({f.parent for f in files}):
        subprocess.run(CLI + ["ingest", str(folder)], env=env, check=True, capture_output=True, timeout=300)
    st = open_store(open_settings(home, ""))
    try:
        ids = st.catalog.image_ids()
        recs = st.catalog.get_many(ids)
        vec = st.open_vectors().get(ids)
        return {recs[i].sha256: vec[n] for n, i in enumerate(ids)}
    finally:
        st.close()


def test_two_ingests_at_once_write_the_union_once_each(tmp_path, tiny_model_dir, pg_url):
    a, b = overlapping_folders(tmp_path)
    home = tmp_path / "home"
    env = env_for(home, pg_url, tiny_model_dir)
    procs = [subprocess.Popen(CLI + ["ingest", str(folder)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for folder in (tmp_path / "a", tmp_path / "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert (home / "catalog.url").read_text().strip() == pg_url  # the home knows its catalog
    assert len(list((home / "vectors").glob("seg-*.f32"))) == 2  # one segment per writer run
    assert_union_once(home, pg_url, a + b, reference_vectors(tmp_path, a + b, tiny_model_dir))


def test_a_writer_killed_mid_run_is_resumed_without_loss_or_duplicates(tmp_path, tiny_model_dir, pg_url):
    a, b = overlapping_folders(tmp_path)
    home = tmp_path / "home"
    env = env_for(home, pg_url, tiny_model_dir)
    from sqlalchemy import create_engine, text
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))

    def images() -> int:
        try:
            with engine.connect() as c:
                return int(c.execute(text("SELECT count(*) FROM images")).scalar() or 0)
        except Exception:  # the tables do not exist yet
            return 0

    victim = subprocess.Popen(CLI + ["ingest", str(tmp_path / "a")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    other = subprocess.Popen(CLI + ["ingest", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while images() < 8 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the writer finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    engine.dispose()
    again = subprocess.run(CLI + ["ingest", str(tmp_path / "a")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert_union_once(home, pg_url, a + b, reference_vectors(tmp_path, a + b, tiny_model_dir))


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else {})
    finally:
        conn.close()


def test_replicas_share_flags_and_pick_up_a_reindex_without_dropping_requests(tmp_path, tiny_model_dir, pg_url):
    write_images(tmp_path / "in", 30)
    home = tmp_path / "home"
    env = env_for(home, pg_url, tiny_model_dir, FLAGMATCH_WORKERS="1",
                  FLAGMATCH_THREADS="4")
    subprocess.run(CLI + ["ingest", str(tmp_path / "in")], env=env, check=True, capture_output=True, timeout=300)
    servers = [start_server(env, tmp_path / f"replica{n}.log") for n in range(2)]
    ports = [int(base.rsplit(":", 1)[1]) for _, base, _ in servers]
    try:
        ready = [call(p, "GET", "/readyz")[1] for p in ports]
        assert all(r["status"] == "ready" for r in ready)
        gen0 = ready[0]["generation"]["all"]
        assert ready[1]["generation"]["all"] == gen0

        # a flag change through replica 0 reaches replica 1's answers within the refresh interval
        status, _ = call(ports[0], "POST", "/api/v1/images/3/unflag", {"reason": "false positive"})
        assert status == 200
        deadline = time.monotonic() + 10  # stated: within index_refresh_seconds (+ one catch-up)
        seen_at = None
        while time.monotonic() < deadline:
            st, body = call(ports[1], "POST", "/api/v1/search", {"id": 3, "k": 30, "scope": "flagged"})
            assert st == 200, body
            if all(h["id"] != 3 for h in body["results"][0]["hits"]):
                seen_at = time.monotonic()
                break
            time.sleep(0.1)
        assert seen_at is not None, "replica 1 still answers with the unflagged image"
        st, img = call(ports[1], "GET", "/api/v1/images/3")
        assert st == 200 and img["flagged"] is False

        # a reindex during a burst against both replicas: no request fails, both serve the new generation
        def burst(port: int) -> list[int]:
            codes = []
            end = time.monotonic() + 12
            while time.monotonic() < end:
                codes.append(call(port, "POST", "/api/v1/search", {"id": 5, "k": 5, "scope": "all"})[0])
            return codes

        with ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(burst, p) for p in ports + ports]
            time.sleep(1.0)
            r = subprocess.run(CLI + ["reindex"], env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            codes = [c for f in futures for c in f.result()]
        assert len(codes) > 20 and set(codes) == {200}, sorted(set(codes))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            gens = [call(p, "GET", "/readyz")[1]["generation"]["all"] for p in ports]
            if all(g > gen0 for g in gens):
                break
            time.sleep(0.2)
        assert all(g > gen0 for g in gens), gens
    finally:
        for proc, _, log in servers:
            stop_server(proc, log)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_store_from_before_migrations_is_upgraded_in_place(tmp_path, engine):
    """An older flagmatch's catalog: no alembic_version, images without the vector location columns,
    vectors in the single vectors.f32 (row = id). Opening it migrates it and keeps every row readable."""
    from sqlalchemy import create_engine, inspect, text
    from indexer.storage.catalog import Catalog, FlagRequest, NewImage
    from indexer.storage.schema import current_revision, head_revision
    from indexer.storage.store import Store

    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}" if engine == "sqlite" else pg.create_database()
    old = Catalog(url)  # today's schema, then made into the old one
    old.bind_model("m@1", 4, "{}")
    old.write_batch([NewImage(i, f"{i:064x}", 10, "PNG", 1, 1, 1, 0.5, "k", ((f"/in/{i}.png", None),))
                     for i in (1, 2, 3)], "m@1", flags=[(2, FlagRequest("model", None, "ingest"))])
    old.close()
    raw = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with raw.begin() as c:
        c.execute(text("DROP TABLE alembic_version"))
        c.execute(text("ALTER TABLE images DROP COLUMN vec_segment"))
        c.execute(text("ALTER TABLE images DROP COLUMN vec_row"))
    assert current_revision(raw) is None
    home = tmp_path / "home"
    vec_dir = home / "vectors"
    vec_dir.mkdir(parents=True)
    rows = np.eye(4, dtype=np.float32)  # row 0 unused, rows 1-3: images 1-3
    (vec_dir / "vectors.f32").write_bytes(rows.tobytes())

    store = Store(home, url)  # opening migrates
    try:
        assert current_revision(raw) == head_revision()
        assert {"vec_segment", "vec_row"} <= {c["name"] for c in inspect(raw).get_columns("images")}
        assert store.catalog.get(2).flagged and store.catalog.max_image_id() == 3
        vs = store.open_vectors()
        assert np.array_equal(vs.get([1, 2, 3]), rows[1:])
        # and new writes land in a segment beside the old file
        seg = vs.segment(7)
        first = seg.append(np.full((1, 4), 0.5, np.float32))
        res = store.catalog.write_images([NewImage(0, "f" * 64, 10, "PNG", 1, 1, 1, 0.1, "k", (("/in/new.png", None),),
                                                   vec_segment=7, vec_row=first)], "m@1")
        assert res.ids == [4] and res.new == [True]
        assert np.allclose(vs.get([4, 1]), [[0.5] * 4, rows[1]])
    finally:
        store.close()
        raw.dispose()
        if engine == "postgresql":
            pg.drop_database(url)
