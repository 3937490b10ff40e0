"""Ingest on a real Ray cluster on this machine: a head and a second worker node started with ``ray start``
on 127.0.0.1, the ingest run as the CLI would (`flagmatch ingest --ray ADDRESS`) and compared with a local
ingest of the same images; the second node's raylet killed mid-run; the driver killed and run again.
Skipped, with the reason, only where Ray is not installed or a node cannot start."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import child_env, drawn_image, encode, free_port, write_images

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

CLI = [sys.executable, "-m", "flagmatch.cli"]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
RAY = str(Path(sys.executable).with_name("ray"))


def _ray(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def cluster():
    """(address, env): a head with 2 CPUs and a worker node with 1, both bound to 127.0.0.1."""
    temp = tempfile.mkdtemp(prefix="fmray", dir="/tmp")  # Ray's socket paths must stay short
    # token authentication, as Ray recommends for any cluster: every node and driver presents this token
    token = Path(temp) / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = child_env(**RAY_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = _ray("start", "--head", "--port", str(port), "--num-cpus", "2", "--temp-dir", temp,
                "--include-dashboard", "false", *common, env=env)
    if head.returncode != 0:
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(f"the Ray head node cannot start here: {head.stderr.strip()[-500:]}")
    address = f"127.0.0.1:{port}"
    worker = _ray("start", "--address", address, "--num-cpus", "1", *common, env=env)
    if worker.returncode != 0:
        _ray("stop", "--force", env=env)
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(f"a second Ray node cannot start here: {worker.stderr.strip()[-500:]}")
    yield address, env
    _ray("stop", "--force", env=env)
    shutil.rmtree(temp, ignore_errors=True)


def ingest_env(home: Path, model: Path, ray_env: dict | None = None, **extra: str) -> dict:
    ray_vars = {k: v for k, v in (ray_env or {}).items() if k.startswith("RAY_")}
    return child_env(FLAGMATCH_HOME=str(home), FLAGMATCH_MODEL=str(model), FLAGMATCH_PRECISION="fp32",
                     FLAGMATCH_BATCH_SIZE="4", FLAGMATCH_FLAG_THRESHOLD="0.5", **ray_vars, **extra)


def contents(home: Path) -> dict[str, tuple[tuple[str, ...], bool, np.ndarray]]:
    """sha256 → (paths, flagged, vector) of a store."""
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    st = open_store(Settings.load({"home": str(home)}, environ={}))
    try:
        ids = st.catalog.image_ids()
        recs = st.catalog.get_many(ids)
        vec = st.open_vectors().get(ids)
        assert len({recs[i].sha256 for i in ids}) == len(ids), "an image stored twice"
        return {recs[i].sha256: (tuple(sorted(recs[i].paths)), recs[i].flagged, vec[n]) for n, i in enumerate(ids)}
    finally:
        st.close()


def assert_same(ray_home: Path, local_home: Path) -> None:
    ours, ref = contents(ray_home), contents(local_home)
    assert set(ours) == set(ref)
    for sha, (paths, flagged, v) in ours.items():
        rpaths, rflagged, rv = ref[sha]
        assert paths == rpaths and flagged == rflagged, sha
        assert float(v @ rv) >= 0.999, sha


def corpus(root: Path, n: int) -> Path:
    folder = root / "in"
    files = write_images(folder, n)
    (folder / "copy.jpg").write_bytes(files[3].read_bytes())  # the same bytes twice in one run
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.jpg").write_bytes(encode(drawn_image(999), "JPEG")[:300])
    return folder


def local_reference(tmp_path: Path, folder: Path, model: Path) -> Path:
    home = tmp_path / "local"
    r = subprocess.run(CLI + ["ingest", str(folder)], env=ingest_env(home, model), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return home


def test_ray_ingest_matches_a_local_ingest(cluster, tmp_path, tiny_model_dir):
    address, renv = cluster
    folder = corpus(tmp_path, 24)
    home = tmp_path / "ray"
    r = subprocess.run(CLI + ["ingest", str(folder), "--ray", address], env=ingest_env(home, tiny_model_dir, renv),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "new 24  duplicates 1" in r.stdout
    assert "failed 1" in r.stdout and "failed: corrupt" in r.stdout
    assert_same(home, local_reference(tmp_path, folder, tiny_model_dir))
    # again: everything is known, nothing reaches a model, the summary says so
    again = subprocess.run(CLI + ["ingest", str(folder), "--ray", address], env=ingest_env(home, tiny_model_dir, renv),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "new 0  duplicates 25" in again.stdout, again.stdout + again.stderr[-2000:]


def _raylets() -> list[tuple[float, int]]:
    import psutil
    out = []
    for p in psutil.process_iter(["name", "create_time"]):
        if p.info["name"] == "raylet":
            out.append((p.info["create_time"], p.pid))
    return sorted(out)


def _committed(home: Path) -> int:
    try:
        with sqlite3.connect(home / "catalog.sqlite", timeout=30) as c:
            return int(c.execute("SELECT count(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_a_worker_node_killed_mid_run_and_a_killed_driver_resumed(cluster, tmp_path, tiny_model_dir):
    address, env = cluster
    folder = corpus(tmp_path, 60)
    home = tmp_path / "ray"
    run_env = ingest_env(home, tiny_model_dir, env, FLAGMATCH_RAY_CHUNK="16")
    cmd = CLI + ["ingest", str(folder), "--ray", address]

    # 1. the second node's raylet dies mid-run: Ray retries its tasks elsewhere; the run finishes
    p = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _committed(home) < 8 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    raylets = _raylets()
    assert p.poll() is None and len(raylets) >= 2, "the run ended before the node could be killed"
    os.kill(raylets[-1][1], signal.SIGKILL)  # the newest raylet: the second node's
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert_same(home, local_reference(tmp_path, folder, tiny_model_dir))

    # 2. the driver dies mid-run; the same command again finishes without redoing committed work
    # (the cluster has the head alone now)
    home2 = tmp_path / "ray2"
    env2 = ingest_env(home2, tiny_model_dir, env, FLAGMATCH_RAY_CHUNK="16")
    p = subprocess.Popen(CLI + ["ingest", str(folder), "--ray", address], env=env2, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _committed(home2) < 12 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p.poll() is None, "the run ended before the driver could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = _committed(home2)
    again = subprocess.run(CLI + ["ingest", str(folder), "--ray", address], env=env2, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"new {60 - before}  duplicates {before + 1}" in again.stdout, (before, again.stdout)
    assert_same(home2, tmp_path / "local")


def test_a_sharded_index_built_on_the_cluster_answers_like_a_local_build(cluster, tmp_path):
    """reindex --ray: the shards are filled by tasks on both nodes, merged here with faiss.contrib.ondisk, and
    the published generation — memory-mapped lists — is what a new process opens."""
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.vectors.faiss_index import IndexConfig
    from indexer.vectors.vector_index import VectorIndex
    from tests.helpers import gaussian_mixture
    from tests.helpers.vectors import overlap, populate
    address, renv = cluster
    home = tmp_path / "home"
    cfg = IndexConfig(exact_threshold=3000, nprobe=16, rerank=10)
    vecs, _ = gaussian_mixture(12_000, 64, 40, seed=3, spread=0.5)
    rng = np.random.default_rng(2)
    flagged = rng.random(len(vecs)) < 0.9
    q = vecs[rng.choice(len(vecs), 200, replace=False)] + rng.normal(0, 0.02, (200, 64)).astype(np.float32)
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    try:
        populate(store, vecs, flagged)
        local = VectorIndex(store, cfg)
        local.save()
        before = {sc: local.search(q, 10, sc) for sc in ("all", "flagged")}
    finally:
        store.close()
    env = child_env(FLAGMATCH_HOME=str(home), FLAGMATCH_EXACT_THRESHOLD="3000", FLAGMATCH_NPROBE="16",
                    FLAGMATCH_RERANK="10", FLAGMATCH_SHARD_ROWS="5000",
                    **{k: v for k, v in renv.items() if k.startswith("RAY_")})
    for scope in ("all", "flagged"):  # one scope at a time keeps the space, so the answers compare
        r = subprocess.run(CLI + ["reindex", "--scope", scope, "--ray", address], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"memory-mapped lists {scope}-g2-" in r.stdout, r.stdout
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    try:
        index = VectorIndex(store, cfg)
        st = index.stats()
        assert st["all"]["vectors"] == len(vecs) and st["flagged"]["vectors"] == int(flagged.sum())
        for sc in ("all", "flagged"):
            assert st[sc]["on_disk"]["lists"].startswith(f"{sc}-g2-") and st[sc]["generation"] == 2
            assert (store.index_dir / st[sc]["on_disk"]["lists"]).is_file()
            assert st[sc]["recall_at_10"] >= 0.95
            assert overlap(index.search(q, 10, sc), before[sc]) >= 0.97
        assert not list(store.index_dir.glob(".shards-*"))
    finally:
        store.close()
