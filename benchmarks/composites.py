"""Pictures inside pictures: flagged originals found inside collages, grids and picture-in-picture uploads.

Uses the match benchmark's store (``benchmarks/match.py`` builds it: 300 flagged originals among 3,000
distractors from ``make-corpus``, open_nsfw) and its originals. Each original is hidden in four composites
with pictures drawn from the distractors (never the original's own):

- *2 × 2 collage*: four cells with 10-px white gutters, the original in a random cell (each picture cropped
  to fill its 4:3 cell, as collage makers do);
- *3 × 3 grid*: nine cells with 6-px black gutters;
- *2 × 2 butted*: four cells with no gutter at all;
- *picture-in-picture*: the original at 45 % of the width over a corner of a distractor photo.

and the match benchmark's *JPEG quality 30 + half size* queries stand for plain uploads (what the cascade
must not slow down). Each configuration is a served instance searched through ``POST /api/v1/search``:
the whole image with the trimmed/content views (before), + the composite's cells (default), + the grid for
uploads whose best similarity is under a threshold. Reported: R@1, R@10, the view the original was found
through, p50 latency, and the share of uploads that paid for cells or the grid.

    python benchmarks/composites.py [--per-edit 150]

Results: benchmarks/results/composites.{json,md}."""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from common import OUT, ROOT, machine, median, table, write

sys.path.insert(0, str(ROOT / "benchmarks"))
import match  # noqa: E402  (the match benchmark's corpus, originals and search helper)

EDITS = {"collage2": "2 × 2 collage, white gutters", "grid3": "3 × 3 grid, black gutters",
         "butted": "2 × 2 butted, no gutters", "pip": "picture-in-picture (45 % over a photo)"}


def composite(kind: str, original: Image.Image, others: list[Image.Image], r: random.Random) -> Image.Image:
    if kind == "pip":
        bg = ImageOps.fit(others[0], (1200, 900))
        w = int(1200 * 0.45)
        small = original.resize((w, max(1, round(original.height * w / original.width))))
        corner = r.choice([(0, 0), (1200 - small.width, 0), (0, 900 - small.height),
                           (1200 - small.width, 900 - small.height)])
        bg.paste(small, (max(0, corner[0]), max(0, corner[1])))
        return bg
    cols, gutter, colour = {"collage2": (2, 10, (255, 255, 255)), "grid3": (3, 6, (0, 0, 0)),
                            "butted": (2, 0, (0, 0, 0))}[kind]
    cells = others[: cols * cols - 1]
    cells.insert(r.randrange(cols * cols), original)
    cw, ch = 480 if cols == 2 else 340, 360 if cols == 2 else 255
    canvas = Image.new("RGB", (cols * cw + (cols + 1) * gutter, cols * ch + (cols + 1) * gutter), colour)
    for n, im in enumerate(cells):
        row, col = divmod(n, cols)
        # cropped to fill the cell, as collage makers do (never squashed)
        canvas.paste(ImageOps.fit(im, (cw, ch)), (gutter + col * (cw + gutter), gutter + row * (ch + gutter)))
    return canvas


def build(originals: list[Path], distractors: list[Path], out: Path, per_edit: int, seed: int) -> dict[str, list[Path]]:
    queries: dict[str, list[Path]] = {k: [] for k in EDITS}
    photos = [p for p in distractors if p.suffix == ".jpg"]
    for i, src in enumerate(originals[:per_edit]):
        r = random.Random(seed * 31 + i)
        im = match.load_rgb(src, 1200)
        for kind in EDITS:
            path = out / kind / f"{i:05d}.jpg"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                pool = photos if kind == "pip" else distractors
                others = [match.load_rgb(p, 800) for p in r.sample(pool, 8)]
                composite(kind, im, others, r).save(path, "JPEG", quality=88)
            queries[kind].append(path)
    return queries


def run(env: dict[str, str], queries: dict[str, list[Path]], truth: list[int], log: Path) -> dict[str, Any]:
    from tests.helpers import start_server, stop_server
    proc, base, logf = start_server({**env, "FLAGMATCH_WORKERS": "1", "FLAGMATCH_THREADS": "2"}, log, timeout=600)
    token = env["FLAGMATCH_API_TOKENS"].split(":")[1]
    out: dict[str, Any] = {}
    try:
        match.search(base, token, queries[next(iter(queries))][0])  # warm
        for name, paths in queries.items():
            r1 = r10 = paid = 0
            times: list[float] = []
            views: dict[str, int] = {}
            for path, want in zip(paths, truth):
                ids, vs, ms = match.search(base, token, path)
                times.append(ms)
                r1 += ids[:1] == [want]
                r10 += want in ids[:10]
                paid += any(v.startswith(("cell", "grid")) for v in vs)
                if want in ids:
                    v = vs[ids.index(want)].rstrip("0123456789")
                    views[v] = views.get(v, 0) + 1
            out[name] = {"r1": r1 / len(paths), "r10": r10 / len(paths), "p50_ms": median(times),
                         "views": views, "hits_from_parts": paid / len(paths)}
            print(f"  {name:<10} R@1 {out[name]['r1']:.3f} R@10 {out[name]['r10']:.3f} p50 {median(times):.0f} ms "
                  f"views {views}", flush=True)
    finally:
        stop_server(proc, logf)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/fm-match-corpus")
    ap.add_argument("--work", default="/tmp/fm-bench-match")
    ap.add_argument("--per-edit", type=int, default=150)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--grid-below", default="0.6,0.75", help="thresholds of the grid configurations")
    ap.add_argument("--only", default="", help="run only the configurations whose label contains this; the others "
                                                "keep their figures from the last run")
    a = ap.parse_args()
    import hashlib
    corpus, work = Path(a.corpus), Path(a.work)
    home = work / "home"
    if not (home / "catalog.sqlite").exists():
        sys.exit("run benchmarks/match.py first: it builds the store and the originals this benchmark searches")
    files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    random.Random(a.seed).shuffle(files)
    sources = match.photo_sources(corpus, a.seed, sum(1 for f in files if f.suffix == ".jpg"))
    originals = match.distinct_originals(files, 300, sources)
    chosen = set(originals)
    distractors = [f for f in files if f not in chosen][:3000]
    queries = build(originals, distractors, work / "composites", a.per_edit, a.seed)
    queries["plain"] = sorted((work / "queries" / "jpeg_half").glob("*.png"))[: a.per_edit]
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    store = open_store(Settings.load({"home": str(home)}, environ={}))
    truth = [store.catalog.resolve(hashlib.sha256(p.read_bytes()).hexdigest()) for p in originals[: a.per_edit]]
    store.close()
    env = {"FLAGMATCH_MODEL": "opennsfw", "FLAGMATCH_API_TOKENS": "bench:bench-token",
           "FLAGMATCH_MAX_PIXELS": str(match.MAX_PIXELS), "FLAGMATCH_HOME": str(home)}
    configs = {"whole image + trimmed/content views (before)": {"FLAGMATCH_QUERY_VIEWS": "trimmed,content",
                                                                "FLAGMATCH_QUERY_GRID_BELOW": "-1"},
               "+ cells (default)": {"FLAGMATCH_QUERY_GRID_BELOW": "-1"}}
    for t in a.grid_below.split(","):
        configs[f"+ cells + grid below {t}"] = {"FLAGMATCH_QUERY_GRID_BELOW": t}
    res: dict[str, Any] = {"machine": machine(), "per_edit": a.per_edit, "runs": {}}
    last = OUT / "composites.json"
    if a.only and last.exists():  # the same machine's earlier figures for the configurations not rerun
        res["runs"] = {k: v for k, v in json.loads(last.read_text())["runs"].items() if k in configs}
    print(machine(), flush=True)
    for label, extra in configs.items():
        if a.only and a.only not in label:
            continue
        print(label, flush=True)
        res["runs"][label] = run({**env, **extra}, queries, truth, work / "serve-composites.log")
    names = {**EDITS, "plain": "plain re-upload (JPEG q30, half size)"}
    rows = [[names[e]] + [f"{r[e]['r1']:.3f} / {r[e]['r10']:.3f}" for r in res["runs"].values()] for e in names]
    rows.append(["p50 latency over all (ms)"] + [f"{median([v['p50_ms'] for v in r.values()]):.0f}"
                                                  for r in res["runs"].values()])
    rows.append(["plain uploads that searched parts"] + [f"{r['plain']['hits_from_parts']:.2f}"
                                                          for r in res["runs"].values()])
    md = (f"Pictures inside pictures on {res['machine']}: {a.per_edit} of the match benchmark's flagged originals "
          "(open_nsfw, 3,300 images) hidden in composites built from the distractors, searched through the API; "
          "R@1 / R@10 per configuration; *searched parts*: a hit came through a cell or the grid.\n\n"
          + table(["upload"] + list(res["runs"]), rows)
          + (f"\n\nOnly the configurations matching “{a.only}” were rerun; the others are from the run before "
             "(same machine, same store), before hits through the grid were verified on the grid's own pixels."
             if a.only else ""))
    write("composites", res, md)


if __name__ == "__main__":
    main()
