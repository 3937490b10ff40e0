from __future__ import annotations

import io
import json

from indexer.ingest.sources import SourceError, SourceItem, count_sources, iter_sources
from tests.helpers import write_images


def test_folders_walk_recursively_in_order_and_skip_hidden(tmp_path):
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "a" / "deep", 1, start=5)
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    items = list(iter_sources([str(tmp_path / "a")]))
    assert [i.path.split("/")[-1] for i in items] == ["img_0000.jpg", "img_0001.jpg", "img_0005.jpg"]
    assert count_sources([str(tmp_path / "a")]) == 3


def test_paths_on_stdin_and_missing_paths(tmp_path):
    files = write_images(tmp_path, 2)
    stdin = io.StringIO(f"{files[0]}\n\n{files[1]}\n{tmp_path / 'gone.jpg'}\n")
    out = list(iter_sources(["-"], stdin))
    assert [type(o) for o in out] == [SourceItem, SourceItem, SourceError]
    assert out[2].code == "not_found"
    assert count_sources(["-"]) is None


def test_csv_manifest_with_bad_rows(tmp_path):
    files = write_images(tmp_path / "imgs", 3)
    m = tmp_path / "m.csv"
    m.write_text("path,external_id,flagged,label,source\n"
                 f"imgs/{files[0].name},ext-1,true,csam-adjacent,manual\n"
                 f"{files[1]},ext-2,no,,\n"
                 ",ext-3,true,,\n"
                 f"{files[2]},ext-4,maybe,,\n"
                 f"{files[2]},ext-5,1,,model\n"
                 f"{files[2]},ext-6,1,x,import,extra\n")
    out = list(iter_sources([str(m)]))
    assert len(out) == 6
    first = out[0]
    assert isinstance(first, SourceItem) and first.path == str(files[0])
    assert first.external_id == "ext-1" and first.flag is not None
    assert (first.flag.source, first.flag.label) == ("manual", "csam-adjacent")
    assert isinstance(out[1], SourceItem) and out[1].flag is None
    errors = [o for o in out if isinstance(o, SourceError)]
    assert [e.path.rsplit(":", 1)[1] for e in errors] == ["4", "5", "6", "7"]
    assert all(e.code == "bad_manifest_row" for e in errors)
    assert "no path" in errors[0].message and "true/false" in errors[1].message
    assert "source must be" in errors[2].message and "more cells" in errors[3].message
    assert count_sources([str(m)]) == 6


def test_jsonl_manifest_with_bad_lines(tmp_path):
    files = write_images(tmp_path, 2)
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([
        json.dumps({"path": str(files[0]), "external_id": 17, "flagged": True}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"path": str(files[1]), "flagged": False, "source": "import"}),
    ]) + "\n")
    out = list(iter_sources([str(m)]))
    assert isinstance(out[0], SourceItem) and out[0].external_id == "17"
    assert out[0].flag is not None and out[0].flag.source == "import"
    assert isinstance(out[1], SourceError) and "not JSON" in out[1].message
    assert isinstance(out[2], SourceError) and "JSON object" in out[2].message
    assert isinstance(out[3], SourceItem) and out[3].flag is None


def test_csv_without_path_column(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("file,flagged\na.jpg,1\n")
    out = list(iter_sources([str(m)]))
    assert len(out) == 1 and isinstance(out[0], SourceError) and out[0].code == "bad_manifest"
