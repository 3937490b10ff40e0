"""The learning loop's costs and quality.

1. **Train and score time.** A synthetic store of N images (192-d vectors, the default timm model's
   dimension, from a Gaussian mixture whose components carry a learnable label) through the real code:
   ``train_head`` on 10k and 100k verdicts (read from the catalog, split by time, fitted, calibrated,
   saved) and ``score_catalog`` over every image (vectors streamed from disk, scores stored, flags raised).
2. **Head quality** on the match benchmark's real corpus (photos and clipart from ``make-corpus``,
   embedded by open_nsfw in ``/tmp/fm-bench-match/home``) with a synthetic policy a team could have —
   "clipart" (positive) against photos — from 1,000 verdicts given in random order: held-out precision,
   recall and average precision at the target precision 0.95.

    python benchmarks/heads.py [--images 1000000] [--verdicts 10000,100000]

Run it from the repository root. Results: benchmarks/results/heads.{json,md}."""
from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import machine, table, write


def synthetic_store(work: Path, n: int, dim: int = 192, groups: int = 64, seed: int = 0) -> tuple[Any, np.ndarray]:
    from sqlalchemy import insert
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.storage.tables import ImageRow, utcnow
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    vs = store.bind_model("synthetic@bench", dim, "none")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim)).astype(np.float32)
    labels = np.zeros(n, np.int8)
    now = utcnow()
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        g = rng.integers(0, groups, m)
        v = centres[g] + rng.normal(0, 1.2, (m, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        labels[start:start + m] = (g % 2 == 0)
        vs.append(start + 1, v)
        with store.catalog.engine.begin() as c:
            c.execute(insert(ImageRow), [{"id": start + i + 1, "sha256": f"{start + i + 1:064x}", "size_bytes": 1,
                                          "format": "JPEG", "width": 1, "height": 1, "frames": 1, "p_unsafe": 0.0,
                                          "model_id": "synthetic@bench", "thumb_key": "", "flagged": False,
                                          "deleted": False, "created_at": now, "updated_at": now}
                                         for i in range(m)])
    return store, labels


def timing(work: Path, n_images: int, verdict_sizes: list[int]) -> list[dict[str, Any]]:
    from indexer.storage import verdicts as vd
    from indexer.review.heads import load_active, score_catalog, train_head
    from sqlalchemy import delete
    t = time.perf_counter()
    store, labels = synthetic_store(work, n_images)
    print(f"built {n_images:,} images in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    rng = np.random.default_rng(1)
    for nv in verdict_sizes:
        with store.catalog.session() as s, s.begin():
            s.execute(delete(vd.VerdictRow))
        ids = rng.choice(n_images, nv, replace=False) + 1
        for k in range(0, nv, 20_000):  # given over time, in sittings
            vd.record(store.catalog, [vd.Verdict(int(i), "policy", bool(labels[i - 1]), "bench", None, "bench")
                                      for i in ids[k:k + 20_000]])
            time.sleep(0.01)
        t = time.perf_counter()
        _, rep = train_head(store, "policy", target_precision=0.95)
        train_s = time.perf_counter() - t
        rows.append({"verdicts": nv, "train_s": train_s, "method": rep.method, "precision": rep.precision,
                     "recall": rep.recall, "ap": rep.average_precision})
        print(rows[-1], flush=True)
    heads = load_active(store)
    t = time.perf_counter()
    counts, newly = score_catalog(store, heads)
    score_s = time.perf_counter() - t
    rows.append({"score_images": counts.scored, "score_s": score_s, "flagged": len(newly)})
    print(rows[-1], flush=True)
    store.close()
    return rows


def quality(home: Path, corpus: Path, n_verdicts: int = 1000, seed: int = 3) -> dict[str, Any]:
    import hashlib
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.storage import verdicts as vd
    from indexer.review.heads import train_head
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    files = [p for p in corpus.rglob("*") if p.suffix.lower() in (".jpg", ".png")]
    random.Random(seed).shuffle(files)
    picked = []
    for p in files:
        i = store.catalog.known_sha(hashlib.sha256(p.read_bytes()).hexdigest())
        if i is not None:
            picked.append((i, p.parent.name == "clipart"))
        if len(picked) >= n_verdicts:
            break
    from sqlalchemy import delete
    with store.catalog.session() as s, s.begin():
        s.execute(delete(vd.VerdictRow).where(vd.VerdictRow.label == "clipart"))
    for k in range(0, len(picked), 50):
        vd.record(store.catalog, [vd.Verdict(i, "clipart", pos, "bench", None, "bench") for i, pos in picked[k:k + 50]])
        time.sleep(0.01)
    _, rep = train_head(store, "clipart", target_precision=0.95)
    store.close()
    return {"verdicts": len(picked), "positive": sum(p for _, p in picked), "precision": rep.precision,
            "recall": rep.recall, "ap": rep.average_precision, "threshold": rep.threshold, "brier": rep.brier,
            "method": rep.method, "target_met": rep.target_met}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--verdicts", default="10000,100000")
    ap.add_argument("--work", default="/tmp/fm-bench-heads")
    ap.add_argument("--match-home", default="/tmp/fm-bench-match/home")
    ap.add_argument("--corpus", default="/tmp/fm-match-corpus")
    a = ap.parse_args()
    print(machine(), flush=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": machine(), "images": a.images,
                           "timing": timing(work, a.images, [int(v) for v in a.verdicts.split(",")])}
    if Path(a.match_home).exists():
        res["quality"] = quality(Path(a.match_home), Path(a.corpus))
        print(res["quality"], flush=True)
    md = [f"Heads on {res['machine']}: a synthetic store of {a.images:,} images (192-d), real code paths.", ""]
    train_rows = [r for r in res["timing"] if "verdicts" in r]
    md.append(table(["verdicts", "train (s)", "calibration", "held-out precision", "recall", "AP"],
                    [[f"{r['verdicts']:,}", r["train_s"], r["method"], r["precision"], r["recall"], r["ap"]]
                     for r in train_rows]))
    sc = next(r for r in res["timing"] if "score_images" in r)
    md += ["", f"`score_catalog` over {sc['score_images']:,} images (vectors streamed from disk, scores stored, "
               f"{sc['flagged']:,} flagged): {sc['score_s']:.0f} s ({sc['score_images'] / sc['score_s']:,.0f} images/s)."]
    q = res.get("quality")
    if q:
        md += ["", f"Head quality on the match benchmark's corpus (open_nsfw embeddings), policy \"clipart\" against "
                   f"photos, {q['verdicts']} verdicts ({q['positive']} positive) in random order, newest 20 % held out: "
                   f"precision {q['precision']:.3f}, recall {q['recall']:.3f}, AP {q['ap']:.3f} at threshold "
                   f"{q['threshold']:.3f} ({q['method']}; target 0.95 {'met' if q['target_met'] else 'NOT met'})."]
    write("heads", res, "\n".join(md))


if __name__ == "__main__":
    main()
