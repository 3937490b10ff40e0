"""Copy the settings table into docs/settings.md and the benchmark tables (benchmarks/results/*.md) into
docs/benchmarks.md, between their <!-- settings --> and <!-- benchmarks --> markers.

    python benchmarks/readme.py"""
from __future__ import annotations

import re

from common import OUT, ROOT

SECTIONS = [("match", "Matching quality (re-uploads found and grouped)"), ("match-hard", "Hard edits: the copy-detection space, region vectors, verification depth"), ("composites", "Pictures inside pictures"), ("video", "Video: re-uploaded clips, ingest, memory"), ("ingest", "Ingest"), ("decode", "Decoding: libvips against Pillow, per format"), ("ray_ingest", "Ingest on Ray"), ("sharded_index", "Sharded index builds, memory-mapped serving"), ("catalog", "Catalog: SQLite against PostgreSQL"), ("index-1m-192", "Vector index, 1M × 192-d (timm default)"),
            ("index-1m-1024", "Vector index, 1M × 1024-d (open_nsfw)"), ("search_api", "Search API"), ("ops_overhead", "Metrics and JSON logs: what they cost a search"), ("request_priority", "Request threads against the model: priority"),
            ("cluster", "Clustering job"), ("hashes", "Hashes: PDQ cost, bank lookups, PDQ vs embedding"),
            ("heads", "Heads: train and score time, quality on a synthetic policy"),
            ("web", "Viewer"), ("soak", "Soak: 10 minutes of mixed load")]


def main() -> None:
    from flagmatch.settings import settings_table
    parts = []
    for name, title in SECTIONS:
        f = OUT / f"{name}.md"
        body = f.read_text().strip() if f.exists() else "_not measured yet: run the script_"
        parts.append(f"## {title} — `benchmarks/{name.split('-')[0]}.py`\n\n{body}\n")
    for page, marker, content in (("settings.md", "settings", settings_table()),
                                  ("benchmarks.md", "benchmarks", "\n".join(parts))):
        path = ROOT / "docs" / page
        text = re.sub(rf"<!-- {marker} -->.*?<!-- /{marker} -->",
                      lambda _: f"<!-- {marker} -->\n{content}\n<!-- /{marker} -->", path.read_text(), flags=re.S)
        path.write_text(text)


if __name__ == "__main__":
    main()
