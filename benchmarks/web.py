"""Viewer speed with 100k flagged images in 1k clusters: server-side time of the clusters page, a
1k-member cluster page and the map's data endpoint (Flask test client, median of 20), the map data's
size, the map's first draw (fetch + decode + draw) in headless Chromium against `flagmatch serve`, and
"review one cluster" driven in that browser: open a cluster, name it, pick a label and a reason,
confirm — counting the page loads and the reviewer's actions (target: one page load, ≤ 3 actions for
name + confirm) and timing the confirm until the page shows it — and a bulk unflag of that cluster undone
from its message.

    python benchmarks/web.py [--images 100000] [--clusters 1000]"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, median, table, write

TOKEN = "bench-token"


def build(work: Path, n: int, k: int) -> tuple[object, Path]:
    from sqlalchemy import insert
    sys.path.insert(0, str(ROOT))
    from tests.helpers import save_tiny_timm
    from indexer.storage.clusters import ClusterStore, Member, NewCluster
    from flagmatch.settings import Settings
    from flagmatch.wiring import load_embedder, open_index, open_store
    from indexer.storage.tables import ImageRow, utcnow

    model = work / "model"
    if not (model / "model.safetensors").exists():
        save_tiny_timm(model)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    s = Settings.load({"home": str(home), "model": str(model), "api_tokens": f"bench:{TOKEN}"}, environ={})
    emb = load_embedder(s)
    store = open_store(s)
    vs = store.bind_model(emb.info.model_id, emb.info.dim, emb.info.preprocessing)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, emb.info.dim)).astype(np.float32)
    sizes = np.full(k, (n - 1000) // (k - 1))
    sizes[0] = 1000
    sizes[-1] += n - sizes.sum()
    labels = np.repeat(np.arange(k), sizes)
    v = centres[labels] + rng.normal(scale=0.3, size=(n, emb.info.dim)).astype(np.float32)
    vs.append(1, v / np.linalg.norm(v, axis=1, keepdims=True))
    now = utcnow()
    with store.catalog.engine.begin() as c:
        for i in range(1, n + 1, 50_000):
            c.execute(insert(ImageRow), [dict(
                id=j, sha256=hashlib.sha256(str(j).encode()).hexdigest(), size_bytes=1, format="JPEG", width=1,
                height=1, frames=1, p_unsafe=0.9, model_id=emb.info.model_id, thumb_key="", flagged=True,
                flag_source="import", flagged_at=now, deleted=False, created_at=now, updated_at=now)
                for j in range(i, min(i + 50_000, n + 1))])
    open_index(store, s).save()
    cs = ClusterStore(store)
    run = cs.start_run(emb.info.model_id, {}, "full", None)
    xy = rng.normal(size=(k, 2)) * 10
    clusters, members, start = [], [], 1
    for c_, size in enumerate(sizes):
        ids = list(range(start, start + int(size)))
        clusters.append(NewCluster(None, c_, int(size), None, "new", None, 0.9, ids[:6],
                                   float(xy[c_, 0]), float(xy[c_, 1])))
        pts = xy[c_] + rng.normal(scale=0.3, size=(len(ids), 2))
        members += [Member(i, c_, float(rng.uniform(0.5, 1)), float(rng.uniform(0, 1)), float(p[0]), float(p[1]), False)
                    for i, p in zip(ids, pts)]
        start += int(size)
    cs.finish_run(run, clusters, members, n_noise=0, summary={"new": k}, timings={})
    big = clusters[0].identity
    store.close()
    return s, model, big  # type: ignore[return-value]


def timed(client, path: str, reps: int = 20) -> tuple[float, int, float]:
    t = time.perf_counter()
    client.get(path)  # the first (cold) request: caches empty
    cold = (time.perf_counter() - t) * 1000
    ts = []
    size = 0
    for _ in range(reps):
        t = time.perf_counter()
        r = client.get(path)
        ts.append((time.perf_counter() - t) * 1000)
        size = len(r.data)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code}")
    return median(ts), size, cold


def review_one_cluster(page, base: str, cluster_id: int) -> dict[str, float]:
    """Name + label + confirm one cluster as a reviewer would, counting page loads and actions."""
    from playwright.sync_api import expect
    loads: list[str] = []
    page.on("framenavigated", lambda f: loads.append(f.url) if f == page.main_frame else None)
    page.goto(f"{base}/clusters/{cluster_id}")
    page.wait_for_load_state("networkidle")  # the reviewer sees the page and its thumbnails first
    actions = 0
    page.fill("#decision-form input[name=name]", "reviewed in one go")
    actions += 1
    page.select_option("#decision-form select[name=label]", "adult_nudity")
    actions += 1
    page.select_option("#decision-form select[name=reason_code]", "matches_policy")
    actions += 1
    t = time.perf_counter()
    page.click("#decision-form button:has-text('Confirm')")
    actions += 1
    expect(page.locator("#cluster-status")).to_have_text("confirmed")
    confirm_ms = (time.perf_counter() - t) * 1000
    return {"page_loads": len(loads), "actions_with_label": actions, "actions_name_confirm": actions - 1,
            "confirm_ms": confirm_ms}


def bulk_undo(page, base: str, cluster_id: int) -> dict[str, float]:
    """Unflag every member of a cluster, then undo it from the message: actions (select all, reason, Unflag,
    the confirmation, Undo) and the time from each click until the page shows it."""
    from playwright.sync_api import expect
    page.goto(f"{base}/clusters/{cluster_id}")
    page.wait_for_load_state("networkidle")
    actions = 0
    page.click("button.select-every")
    actions += 1
    expect(page.locator(".selected-count").first).not_to_have_text("0 selected")  # (every member's id is fetched)
    n = int(page.locator(".selected-count").first.inner_text().split()[0])
    page.fill("form.members input[name=reason]", "bulk undo benchmark")
    actions += 1
    page.once("dialog", lambda d: d.accept())
    t = time.perf_counter()
    page.click("button:has-text('Unflag selected')")
    actions += 2  # the click and the confirmation
    expect(page.locator(".flash")).to_contain_text(f"Unflagged {n:,}".replace(",", ""))
    unflag_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    page.click(".flash button.undo-change")
    actions += 1
    expect(page.locator(".flash")).to_contain_text(f"Undone: {n} image(s) flagged again")
    undo_ms = (time.perf_counter() - t) * 1000
    return {"images": n, "actions": actions, "unflag_ms": unflag_ms, "undo_ms": undo_ms}


def first_draw(s, model: Path, work: Path, cluster_id: int) -> tuple[float, dict[str, float]]:
    from playwright.sync_api import sync_playwright
    sys.path.insert(0, str(ROOT))
    from tests.helpers import start_server, stop_server
    from tests.test_browser import ARGS, CHROMIUM
    proc, base, log = start_server({"FLAGMATCH_HOME": s.home, "FLAGMATCH_MODEL": str(model),
                                    "FLAGMATCH_API_TOKENS": f"bench:{TOKEN}"}, work / "server.log", timeout=600)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base + "/login")
            page.fill("input[name=token]", TOKEN)
            page.click("form button:has-text('Sign in')")
            page.wait_for_url(base + "/clusters")
            draws = []
            for _ in range(5):
                page.goto(base + "/map")
                page.wait_for_selector("body[data-map-ready='1']", timeout=60_000)
                draws.append(float(page.locator("#map").get_attribute("data-draw-ms")))
            review = review_one_cluster(page, base, cluster_id)
            review["bulk_undo"] = bulk_undo(page, base, cluster_id)  # type: ignore[assignment]
            browser.close()
        return median(draws), review
    finally:
        stop_server(proc, log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/fm-bench-web")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    s, model, big = build(work, a.images, a.clusters)
    from flagmatch.runtime import build_app
    app = build_app(s)
    c = app.test_client()
    page = c.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    c.post("/login", data={"csrf": csrf, "token": TOKEN})
    rows, data = [], {"machine": machine(), "images": a.images, "clusters": a.clusters}
    for name, path in (("clusters page", "/clusters"), ("cluster page (1,000 members)", f"/clusters/{big}"),
                       ("map data", "/map/data")):
        ms, size, cold = timed(c, path)
        data[name] = {"ms": ms, "bytes": size, "cold_ms": cold}
        rows.append([name, ms, cold, f"{size / 1e6:.2f} MB"])
    draw, review = first_draw(s, model, work, big)
    data["map first draw ms"] = draw
    data["review one cluster"] = review
    rows.append(["map first draw (Chromium: fetch + decode + draw)", draw, "", ""])
    rows.append(["review one cluster: Confirm until the page shows it (page and thumbnails loaded)",
                 review["confirm_ms"], "", ""])
    bu = review["bulk_undo"]  # type: ignore[index]
    rows.append([f"bulk unflag of {bu['images']:,} images: Unflag until the page shows it", bu["unflag_ms"], "", ""])
    rows.append(["bulk undo of it: Undo until the page shows it", bu["undo_ms"], "", ""])
    md = (f"Viewer on {machine()}: {a.images:,} flagged images in {a.clusters:,} clusters; server-side medians "
          f"of 20 requests (Flask test client), first draw = median of 5 page loads in headless Chromium "
          f"against `flagmatch serve`.\n\n" + table(["what", "median ms", "first request ms", "size"], rows)
          + f"\n\nReview one cluster (1,000 members) in Chromium: open it, type a name, pick a label and a reason "
          f"code, Confirm — {review['page_loads']} page load(s), {review['actions_name_confirm']} actions for name + "
          f"confirm ({review['actions_with_label']} with the label); before the decision bar it took 8 clicks, 3 "
          f"text fields and 4 page loads. A bulk unflag of the whole cluster takes {bu['actions']} actions (select all, "
          f"reason, Unflag, the confirmation it asks for from 20 images) and is undone with one more click from its "
          f"message; before, it took 3 actions with no confirmation and could only be undone image by image.")
    write("web", data, md)


if __name__ == "__main__":
    main()
