"""Hashes and banks against a real peer: the ``threatexchange`` package (Meta's, the library HMA is built
on) computes PDQ for the same files, exports a list through its own CLI that flagmatch imports, and reads
flagmatch's export back; uploads of transformed copies match banks of images never ingested; negative and
disabled banks; bad lists; the PDQ indexes' persistence and the back-fill of an old store."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flagmatch.cli import main
from indexer.hashbanks.banks import Banks, read_list, BadRow, NewEntry
from indexer.storage.catalog import FlagRequest
from indexer.errors import InvalidInputError
from indexer.media.hashes import PDQ_MIN_QUALITY, pdq_distance
from search.service import SearchParams
from tests.helpers import clean_env, drawn_image, encode, photo_image
from tests.helpers.peers import PEER_TOLERANCE, transformed

threatexchange = pytest.importorskip("threatexchange")
from threatexchange.signal_type.pdq.pdq_hasher import pdq_from_bytes  # noqa: E402

def _te(home: Path, *args: str) -> str:
    """The threatexchange CLI, with its state in ``home``."""
    exe = Path(sys.executable).with_name("threatexchange")
    out = subprocess.run([str(exe), *args], env={**os.environ, "HOME": str(home)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    """Photo-like files in the shapes stores hold: JPEG, PNG, a large JPEG, greyscale, RGBA."""
    d = tmp_path / "photos"
    d.mkdir()
    files = {
        "a.jpg": encode(photo_image(1), "JPEG", quality=90),
        "b.png": encode(photo_image(2, (1600, 1200)), "PNG"),
        "c.jpg": encode(photo_image(3, (3000, 2000)), "JPEG", quality=85),
        "d.jpg": encode(photo_image(4).convert("L"), "JPEG", quality=90),
        "e.png": encode(photo_image(5).convert("RGBA"), "PNG"),
        "f.webp": encode(photo_image(6, (800, 800)), "WEBP", quality=80),
    }
    out = []
    for name, data in files.items():
        (d / name).write_bytes(data)
        out.append(d / name)
    return out


@pytest.fixture
def svc(settings, store, tiny_embedder, photos):
    from flagmatch.wiring import ingest_into, open_index, search_service
    from indexer.ingest.sources import iter_sources
    ingest_into(settings.replace(flag_threshold=1.1), iter_sources([str(p) for p in photos]), store=store,
                embedder=tiny_embedder)
    return search_service(settings, store, open_index(store, settings), tiny_embedder)


def test_stored_pdq_and_md5_agree_with_threatexchange(svc, store, photos):
    sigs = store.catalog.signals(range(1, len(photos) + 1))
    by_sha = {store.catalog.get(i).sha256: s for i, s in sigs.items()}
    assert len(by_sha) == len(photos)
    distances = []
    for p in photos:
        data = p.read_bytes()
        ours = by_sha[hashlib.sha256(data).hexdigest()]
        theirs, quality = pdq_from_bytes(data)
        assert ours.md5 == hashlib.md5(data).hexdigest()
        assert ours.pdq is not None and abs(ours.pdq.quality - quality) <= 10, p.name
        distances.append(pdq_distance(ours.pdq.hash, theirs))
    assert max(distances) <= PEER_TOLERANCE, distances
    assert sum(distances) / len(distances) <= 6, distances


def test_a_list_exported_by_threatexchange_matches_transformed_uploads_of_images_never_seen(
        svc, settings, tmp_path, tiny_embedder):
    te_home = tmp_path / "te"
    te_home.mkdir()
    originals = []
    for i in range(3):
        p = tmp_path / f"banked_{i}.jpg"
        photo_image(100 + i).save(p, quality=92)
        originals.append(p)
    listed = tmp_path / "peer.txt"
    listed.write_text(_te(te_home, "hash", "photo", *map(str, originals)))
    _te(te_home, "config", "collab", "edit", "local_file", "--create", "--filename", str(listed), "PEER_LIST")
    _te(te_home, "fetch")
    exported = tmp_path / "peer.csv"
    exported.write_text(_te(te_home, "dataset", "-P", "--csv"))
    assert exported.read_text().startswith("signal_type,signal_str,collab,category,tags")

    r = CliRunner(env=clean_env()).invoke(main, ["banks", "import", str(exported), "--bank", "PEER", "--create",
                                                 "--home", str(settings.home_path)])
    assert r.exit_code == 0, r.output
    assert "3 added" in r.output and "0 bad rows" in r.output

    uploads = [("copy.jpg", transformed(Image.open(originals[1]))),
               ("unrelated.jpg", encode(photo_image(999), "JPEG"))]
    res = svc.search_uploads(uploads, SearchParams(k=3, scope="all")).results
    ev = res[0].evidence
    assert ev is not None and ev.matched
    assert [(m.bank, m.signal_type) for m in ev.bank_matches] == [("PEER", "pdq")]
    m = ev.bank_matches[0]
    assert 0 < m.distance <= m.threshold == 31
    assert m.signal == pdq_from_bytes(originals[1].read_bytes())[0]
    assert res[0].query.known_id is None  # never ingested: the bank alone knew it
    assert not res[1].evidence.matched and res[1].evidence.bank_matches == []
    # the CLI prints the same evidence under the neighbours
    q = tmp_path / "copy.jpg"
    q.write_bytes(uploads[0][1])
    r = CliRunner(env=clean_env()).invoke(main, ["search", str(q), "--scope", "all", "--home", str(settings.home_path),
                                                 "--model", str(settings.model)])
    assert r.exit_code == 0, r.output
    assert f"BANK MATCH: bank PEER entry {m.entry_id}" in r.output and f"distance {m.distance} ≤ 31" in r.output


def test_flagmatch_export_is_read_by_threatexchange(svc, settings, store, photos, tmp_path):
    store.catalog.set_flag([1, 2], FlagRequest("manual", "spam", "rita"), flag=True)
    out = tmp_path / "ours.txt"
    r = CliRunner(env=clean_env()).invoke(main, ["banks", "export", "-o", str(out), "--home", str(settings.home_path)])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("pdq ") for line in lines)
    te_home = tmp_path / "te"
    te_home.mkdir()
    _te(te_home, "config", "collab", "edit", "local_file", "--create", "--filename", str(out), "FLAGMATCH")
    _te(te_home, "fetch")
    flagged_file = next(p for p in photos if hashlib.sha256(p.read_bytes()).hexdigest() == store.catalog.get(1).sha256)
    assert "(FLAGMATCH)" in _te(te_home, "match", "photo", str(flagged_file))
    other = next(p for p in photos if hashlib.sha256(p.read_bytes()).hexdigest() == store.catalog.get(4).sha256)
    assert "(FLAGMATCH)" not in _te(te_home, "match", "photo", str(other))
    # the CSV export has threatexchange's dataset columns
    csv_out = tmp_path / "ours.csv"
    CliRunner(env=clean_env()).invoke(main, ["banks", "export", "--format", "csv", "-o", str(csv_out),
                                             "--home", str(settings.home_path)])
    head, first = csv_out.read_text().splitlines()[:2]
    assert head == "signal_type,signal_str,collab,category,tags" and first.endswith(",flagmatch,POSITIVE_CLASS,spam")


def test_negative_banks_suppress_and_disabled_banks_stop_at_once(svc, store):
    banks = Banks(store.catalog)
    target = photo_image(200)
    banked = pdq_from_bytes(encode(target, "PNG"))[0]
    banks.create("CSAM_LIKE")
    banks.add("CSAM_LIKE", [NewEntry("pdq", banked, external_id="case-17")])
    upload = [("u.jpg", transformed(target))]
    ev = svc.search_uploads(upload, SearchParams()).results[0].evidence
    assert ev.matched and ev.bank_matches[0].external_id == "case-17"

    banks.create("BENIGN", role="negative")
    banks.add("BENIGN", [NewEntry("pdq", banked)])
    ev = svc.search_uploads(upload, SearchParams()).results[0].evidence
    assert not ev.matched and [m.bank for m in ev.negative_matches] == ["BENIGN"]
    assert [m.bank for m in ev.bank_matches] == ["CSAM_LIKE"]  # still shown, as suppressed

    banks.update("BENIGN", enabled=False)
    assert svc.search_uploads(upload, SearchParams()).results[0].evidence.matched
    banks.update("CSAM_LIKE", enabled=False)  # the same service, no reload
    ev = svc.search_uploads(upload, SearchParams()).results[0].evidence
    assert not ev.matched and ev.bank_matches == []
    banks.update("CSAM_LIKE", enabled=True, pdq_threshold=0)  # a tighter threshold: this copy is too far
    assert not svc.search_uploads(upload, SearchParams()).results[0].evidence.matched


def test_md5_banks_match_the_exact_bytes(svc, store, photos):
    banks = Banks(store.catalog)
    banks.create("EXACT")
    data = photos[0].read_bytes()
    banks.add("EXACT", [NewEntry("md5", hashlib.md5(data).hexdigest())])
    ev = svc.search_uploads([("x.jpg", data)], SearchParams(scope="all")).results[0].evidence
    assert [(m.bank, m.signal_type, m.distance) for m in ev.bank_matches] == [("EXACT", "md5", 0)]
    ev2 = svc.search_uploads([("y.jpg", transformed(Image.open(photos[0])))], SearchParams()).results[0].evidence
    assert not any(m.signal_type == "md5" for m in ev2.bank_matches)


def test_low_quality_hashes_are_kept_but_never_match(svc, store):
    flat = Image.new("RGB", (400, 300), (120, 130, 140))
    data = encode(flat, "PNG")
    theirs, quality = pdq_from_bytes(data)
    assert quality < PDQ_MIN_QUALITY
    banks = Banks(store.catalog)
    banks.create("FLAT")
    banks.add("FLAT", [NewEntry("pdq", theirs)])
    ev = svc.search_uploads([("flat.png", data)], SearchParams()).results[0].evidence
    assert ev.signals.pdq is not None and not ev.pdq_usable and not ev.matched
    # a banked entry that says its own quality is low is kept, and never indexed
    banks.add("FLAT", [NewEntry("pdq", "f" * 64, quality=10)])
    assert banks.get("FLAT").entries == 2
    assert all(h != "f" * 64 for _, h in banks.pdq_rows_after(0))


def test_stored_images_sharing_a_hash_are_reported_by_scope(svc, store, photos):
    data = transformed(Image.open(photos[0]))
    ev = svc.search_uploads([("x.jpg", data)], SearchParams(scope="all")).results[0].evidence
    first = store.catalog.get(ev.image_matches[0].record.id)
    assert first.sha256 == hashlib.sha256(photos[0].read_bytes()).hexdigest()
    assert ev.image_matches[0].signal_type == "pdq" and ev.image_matches[0].distance <= 31
    assert svc.search_uploads([("x.jpg", data)], SearchParams()).results[0].evidence.image_matches == []
    store.catalog.set_flag([first.id], FlagRequest("manual", None, "rita"), flag=True)
    ev = svc.search_uploads([("x.jpg", data)], SearchParams()).results[0].evidence
    assert [m.record.id for m in ev.image_matches] == [first.id]
    # a stored image's query leaves itself out, and finds no other copy
    assert svc.search_ids([first.id], SearchParams(scope="all")).results[0].evidence.image_matches == []


# ------------------------------------------------------------------ bad lists

def _rows(text: bytes, **kw) -> list:
    return list(read_list(io.BytesIO(text), **kw))


def test_bad_rows_are_reported_with_their_line_numbers_and_the_rest_imported(store):
    pdq_a, pdq_b = "a" * 64, "0123456789abcdef" * 4
    md5 = "d41d8cd98f00b204e9800998ecf8427e"
    text = "\n".join([
        "# a list from a partner",
        f"pdq {pdq_a}",             # 2 ok
        f"pdq {pdq_a[:-2]}",        # 3 wrong length
        f"pdq {'g' * 64}",          # 4 not hex
        f"pdq {pdq_a}",             # 5 duplicate of 2
        f"md5 {md5}",               # 6 ok: mixed signal types
        f"video_tmk_pdqf {pdq_b}",  # 7 a type flagmatch does not match
        "",
        f"PDQ {pdq_b.upper()}",     # 9 ok: case folded
        "pdq",                      # 10 no hash
    ]).encode()
    banks = Banks(store.catalog)
    banks.create("PARTNER")
    bad: list[BadRow] = []
    rep = banks.import_list("PARTNER", io.BytesIO(text), on_bad=bad.append)
    assert (rep.added, rep.bad_rows, rep.by_type) == (3, 5, {"pdq": 2, "md5": 1})
    assert [(b.line, b.reason.split(" ")[0]) for b in bad] == [
        (3, "a"), (4, "a"), (5, "duplicate"), (7, "unsupported"), (10, "no")]
    assert "64 hex digits, not 62" in bad[0].reason and "line 2" in bad[2].reason
    again = banks.import_list("PARTNER", io.BytesIO(text))  # idempotent: nothing new, the same bad rows
    assert (again.added, again.already_banked, again.bad_rows) == (0, 3, 5)


def test_csv_and_tsv_lists_with_ids_and_tags():
    rows = _rows(b"hash,id,tags\n" + ("b" * 64).encode() + b",case-1,nudity;csam\n")
    assert rows == [NewEntry("pdq", "b" * 64, None, "case-1", ("nudity", "csam"), None, 2)]
    rows = _rows(("c" * 64).encode() + b"\tX9\tspam\n" + b"d41d8cd98f00b204e9800998ecf8427e\tX10\n")
    assert [(r.signal_type, r.external_id, r.tags) for r in rows] == [("pdq", "X9", ("spam",)), ("md5", "X10", ())]
    rows = _rows(b"signal_type,signal_str,collab,category,tags\npdq," + ("e" * 64).encode() + b",C,POSITIVE_CLASS,a b\n")
    assert rows[0].tags == ("POSITIVE_CLASS", "a", "b") and rows[0].external_id is None
    # a value whose length says nothing needs --type
    bad = _rows(b"abcd\n")
    assert isinstance(bad[0], BadRow) and "give --type" in bad[0].reason
    with pytest.raises(InvalidInputError):
        _rows(b"abcd\n", default_type="sha1")


def test_a_100_mb_list_streams_in_bounded_memory(store, tmp_path):
    big = tmp_path / "big.txt"
    good = [f"pdq {i:064x}\n".encode() for i in range(1, 501)]
    with open(big, "wb") as f:
        f.writelines(good[:250])
        chunk = b"z" * (1 << 20)
        for _ in range(100):      # a 100 MB line with no newline: a broken export
            f.write(chunk)
        f.write(b"\n")
        f.writelines(good[250:])
    assert big.stat().st_size > 100 * 1024 * 1024
    banks = Banks(store.catalog)
    banks.create("HUGE")
    tracemalloc.start()
    with open(big, "rb") as f:
        rep = banks.import_list("HUGE", f)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rep.added == 500 and rep.bad_rows == 1 and rep.bad[0].line == 251
    assert "longer than 8192 KiB" in rep.bad[0].reason
    assert peak < 32 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_bank_names_thresholds_and_roles_are_checked(store):
    banks = Banks(store.catalog)
    for bad in ("lower", "", "X" * 65, "A-B"):
        with pytest.raises(InvalidInputError):
            banks.create(bad)
    with pytest.raises(InvalidInputError):
        banks.create("OK", pdq_threshold=65)
    with pytest.raises(InvalidInputError):
        banks.create("OK", role="maybe")
    banks.create("OK")
    with pytest.raises(InvalidInputError) as e:
        banks.create("OK")
    assert e.value.code == "conflict"


# ------------------------------------------------------------------ persistence and back-fill

def test_pdq_index_is_saved_caught_up_and_rebuilt_when_corrupt(svc, settings, store):
    from flagmatch.wiring import hash_matcher
    banks = Banks(store.catalog)
    banks.create("P")
    banks.add("P", [NewEntry("pdq", f"{i:064x}") for i in range(1, 101)])
    m = hash_matcher(settings, store)
    m.save()
    cp = store.catalog.checkpoint("pdq:banks")
    assert cp is not None and cp.ntotal == 100 and cp.image_id == max(e.id for e in banks.page("P", limit=1000))
    banks.add("P", [NewEntry("pdq", f"{i:064x}") for i in range(101, 111)])  # after the save
    m2 = hash_matcher(settings, store)
    assert m2.bank_index.ntotal == 110  # the saved file, then the rows past its checkpoint
    path = store.index_dir / "pdq-banks.faissb"
    path.write_bytes(path.read_bytes()[:100])  # truncated on disk
    m3 = hash_matcher(settings, store)
    assert m3.bank_index.ntotal == 110
    hits = m3.bank_index.search([f"{5:064x}"], 1)[0]
    assert {h.distance for h in hits} <= {0, 1} and any(h.distance == 0 for h in hits)


def test_multi_index_hashing_finds_exactly_what_the_exhaustive_index_finds(store, tmp_path):
    """The multi-index (a mapped file plus a flat tail for rows added since) answers exactly as the flat scan,
    at every radius (probing within 31 bits, counting every hash beyond), before and after a save folds the
    tail in, and from its file in a new process's index; a damaged file is rebuilt from the catalog."""
    from indexer.hashbanks.hash_index import PdqIndex
    rng = np.random.default_rng(3)
    stored = [bytes(r).hex() for r in rng.integers(0, 256, (3000, 32), dtype=np.uint8)]
    rows = [(i + 1, h) for i, h in enumerate(stored[:2000])]

    def source(after: int, limit: int) -> list[tuple[int, str]]:
        return [r for r in rows if r[0] > after][:limit]
    bits = np.unpackbits(np.frombuffer(bytes.fromhex("".join(stored[:200] + stored[2000:2200])), np.uint8)
                         .reshape(400, 32), axis=1)
    for row in bits:
        row[rng.choice(256, int(rng.integers(0, 40)), replace=False)] ^= 1
    queries = [bytes(r).hex() for r in np.packbits(bits, axis=1)]
    flat = PdqIndex(tmp_path / "f.faissb", store.catalog, "pdq:t-flat", source, kind="flat")
    mih = PdqIndex(tmp_path / "m.faissb", store.catalog, "pdq:t-mih", source, kind="mih")
    assert not flat.is_mih and mih.is_mih and mih.ntotal == 2000

    def same() -> list[list[tuple[int, int]]]:
        for radius in (0, 15, 31, 40):
            a = [[(h.id, h.distance) for h in r] for r in flat.search(queries, radius)]
            assert a == [[(h.id, h.distance) for h in r] for r in mih.search(queries, radius)]
            assert all(d <= radius for r in a for _, d in r)
        return [[(h.id, h.distance) for h in r] for r in flat.search(queries, 31)]
    same()
    rows.extend((i + 1, h) for i, h in enumerate(stored) if i >= 2000)  # committed after the build: the tail
    mih._seen = flat._seen = None  # the rows came from a list, not a commit the change token would show
    a = same()
    assert mih.ntotal == 3000 and mih.index.ntotal == 1000
    assert sum(any(i == n + 1 for i, _ in r) for n, r in enumerate(a[:200])) == sum(
        pdq_distance(q, stored[n]) <= 31 for n, q in enumerate(queries[:200]))
    assert sum(any(i == n + 2001 for i, _ in r) for n, r in enumerate(a[200:])) == sum(
        pdq_distance(q, stored[2000 + n]) <= 31 for n, q in enumerate(queries[200:]))
    mih.save()  # folds the tail into the mapped file
    assert mih.index.ntotal == 0 and mih.sealed is not None and mih.sealed.n == 3000
    same()
    again = PdqIndex(tmp_path / "m.faissb", store.catalog, "pdq:t-mih", source, kind="mih")
    assert again.is_mih and again.ntotal == 3000 and again.index.ntotal == 0
    mih = again
    same()
    path = tmp_path / "m.faissb"
    path.write_bytes(path.read_bytes()[:5000])
    mih = PdqIndex(path, store.catalog, "pdq:t-mih", source, kind="mih")
    assert mih.is_mih and mih.ntotal == 3000
    same()


def test_backfill_hashes_an_old_store_and_records_what_it_cannot_read(svc, settings, store, photos):
    from sqlalchemy import delete
    from indexer.storage.tables import ImageSignalRow
    with store.catalog.session() as s, s.begin():  # a store made before hashes existed
        s.execute(delete(ImageSignalRow))
    gone = photos[2]
    sha_gone = hashlib.sha256(gone.read_bytes()).hexdigest()
    gone.unlink()
    r = CliRunner(env=clean_env()).invoke(main, ["hashes", "backfill", "--home", str(settings.home_path)])
    assert r.exit_code == 0, r.output
    assert f"hashed {len(photos) - 1}" in r.output and "failed 1" in r.output and "unreadable" in r.output
    sigs = store.catalog.signals(range(1, len(photos) + 1))
    missing = [i for i in range(1, len(photos) + 1) if i not in sigs]
    assert len(missing) == 1 and store.catalog.get(missing[0]).sha256 == sha_gone
    assert any(code == "unreadable" for _, code, _ in store.catalog.errors())
    for p in photos:
        if p.exists():
            rec = store.catalog.get(store.catalog.known_sha(hashlib.sha256(p.read_bytes()).hexdigest()))
            assert sigs[rec.id].pdq.hash and pdq_distance(sigs[rec.id].pdq.hash,
                                                          pdq_from_bytes(p.read_bytes())[0]) <= PEER_TOLERANCE
    # the rebuilt PDQ index answers for the back-filled images
    data = transformed(Image.open(photos[0]))
    ev = svc.search_uploads([("x.jpg", data)], SearchParams(scope="all")).results[0].evidence
    assert ev.image_matches and ev.image_matches[0].signal_type == "pdq"


def test_the_bank_index_catch_up_reads_through_an_index_on_both_engines(store):
    """The query the PDQ bank index runs before every lookup is planned as an index seek (no scan of the
    bank, no sort) on SQLite and PostgreSQL, with the engine's statistics fresh."""
    from sqlalchemy import text
    from indexer.storage.banks import pdq_rows_after_query
    banks = Banks(store.catalog)
    banks.create("BIG")
    rng = np.random.default_rng(0)
    banks.add("BIG", [NewEntry("pdq", bytes(r).hex()) for r in rng.integers(0, 256, (20_000, 32), dtype=np.uint8)]
              + [NewEntry("md5", hashlib.md5(str(i).encode()).hexdigest()) for i in range(5000)])
    head = banks.head()
    engine = store.catalog.engine
    with engine.connect() as c:
        c.execute(text("ANALYZE"))
        sql = str(pdq_rows_after_query(head - 10, 100_000).compile(dialect=engine.dialect,
                                                                  compile_kwargs={"literal_binds": True}))
        if engine.dialect.name == "sqlite":
            plan = " ".join(str(r[-1]) for r in c.execute(text("EXPLAIN QUERY PLAN " + sql)))
            assert "USING INDEX ix_bank_entries_type_id" in plan or "USING INTEGER PRIMARY KEY" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
        else:
            plan = " ".join(r[0] for r in c.execute(text("EXPLAIN " + sql)))
            assert "Index" in plan and "Seq Scan" not in plan and "Sort" not in plan, plan
    assert banks.pdq_rows_after(head) == []


def test_the_change_token_holds_until_anyone_commits_and_the_bank_index_reads_only_then(store, tmp_path):
    """The catalog's change token (SQLite's data_version on a connection that never writes, PostgreSQL's
    snapshot) stays equal while nothing is committed and changes for a commit made through this catalog,
    through another catalog object on the same database, and by another process; the bank index reads
    the catalog only when it changed, and still sees every new entry at the next lookup."""
    from indexer.hashbanks.hash_index import PdqIndex
    from indexer.storage.catalog import Catalog
    url = str(store.catalog.engine.url.render_as_string(hide_password=False))
    cat = store.catalog
    banks = Banks(cat)
    banks.create("P")
    t0 = cat.change_token()
    assert cat.change_token() == t0 and cat.change_token() == t0  # reads change nothing
    banks.add("P", [NewEntry("pdq", f"{1:064x}")])
    t1 = cat.change_token()
    assert t1 != t0
    other = Catalog(url)
    Banks(other).add("P", [NewEntry("pdq", f"{2:064x}")])
    t2 = cat.change_token()
    assert t2 != t1
    other.close()

    reads: list[int] = []

    def source(after: int, limit: int) -> list[tuple[int, str]]:
        reads.append(after)
        return banks.pdq_rows_after(after, limit)
    idx = PdqIndex(tmp_path / "p.faissb", cat, "pdq:t-token", source, kind="flat")
    assert idx.ntotal == 2
    reads.clear()
    for _ in range(5):
        assert [h.distance for h in idx.search([f"{1:064x}"], 0)[0]] == [0]
    assert reads == []  # nothing committed: no catch-up read
    code = ("import sys; from indexer.storage.catalog import Catalog; from indexer.hashbanks.banks import Banks, "
            "NewEntry; Banks(Catalog(sys.argv[1])).add('P', [NewEntry('pdq', 'f' * 64)])")
    subprocess.run([sys.executable, "-c", code, url], check=True, cwd=Path(__file__).parent.parent)
    assert [h.distance for h in idx.search(["f" * 64], 0)[0]] == [0]  # banked by another process, seen at once
    assert reads and idx.ntotal == 3


def test_sqlite_statistics_are_refreshed_as_a_catalog_closes(tmp_path):
    """SQLite's planner statistics follow the data: a connection that ran the catch-up over a bank analyses
    it as it closes (``PRAGMA optimize``), so a store never runs on the statistics of its first, empty day.
    (PostgreSQL's autovacuum analyses on its own.)"""
    import sqlite3
    from indexer.storage.catalog import Catalog
    path = tmp_path / "c.sqlite"
    cat = Catalog(f"sqlite:///{path}")
    banks = Banks(cat)
    banks.create("B")
    rng = np.random.default_rng(0)
    banks.add("B", [NewEntry("pdq", bytes(r).hex()) for r in rng.integers(0, 256, (5000, 32), dtype=np.uint8)])
    banks.pdq_rows_after(10, 100)
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()[0] == 0
    cat.close()
    with sqlite3.connect(path) as raw:
        analysed = {idx for tbl, idx in raw.execute("SELECT tbl, idx FROM sqlite_stat1") if tbl == "bank_entries"}
    assert "ix_bank_entries_type_id" in analysed, analysed
