"""The schema's upgrade path (indexer.storage.schema): a store made by the release before one schema —
built here by that release's own code, taken from this repository's history — opens with today's code on
both engines, reaches the newest revision, and keeps every row of every table it had."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import io
import textwrap
from pathlib import Path

from sqlalchemy import MetaData, create_engine, inspect, select, text

from indexer.storage import schema
from indexer.storage.catalog import Catalog, engine_url
from indexer.storage.tables import Base
from tests.helpers import child_env

# main before the tables moved onto one metadata: the audit log, the clustering job's tables and the
# viewer's session and request tables each had a DeclarativeBase of their own, made with create_all
PREVIOUS_RELEASE = "c7e600c"
REPO = Path(__file__).resolve().parents[1]

BUILD = textwrap.dedent("""
    import datetime as dt, sys
    old = sys.argv[1]
    sys.path.insert(0, old)
    import indexer
    assert indexer.__file__.startswith(old), indexer.__file__   # the previous release's code, not today's
    from indexer.catalog import Catalog, FlagRequest, NewImage
    from indexer.audit import AuditLog
    from indexer import verdicts
    from indexer.banks import Banks, NewEntry
    from clustering.store import ClusterStore, Member, NewCluster
    from search.sessions import RequestLedger, SessionStore

    class Home:  # what ClusterStore reads of a store
        def __init__(self, catalog): self.catalog = catalog
    cat = Catalog(sys.argv[2])
    res = cat.write_images([NewImage(0, f"{i:064x}", 10 + i, "PNG", 8, 8, 1, i / 10, f"k{i}",
                                     ((f"/in/{i}.png", f"ext-{i}"),)) for i in range(1, 7)], "test-model",
                           flags=[(1, FlagRequest("manual", "spam", "rita", "seen"))])
    cat.set_flag([2, 3], FlagRequest("review", "nudity", "sam", None), flag=True)
    verdicts.record(cat, [verdicts.Verdict(2, "nudity", True, "sam", "why", "viewer")])
    verdicts.add_candidates(cat, [(4, "nudity", 2, 0.91)])
    audit = AuditLog(cat.engine)
    audit.record("rita", "flag", "image:1", reason="seen", ids=[1])
    audit.record("sam", "login", "viewer")
    banks = Banks(cat)
    banks.create("PARTNER", source="list.txt")
    banks.add("PARTNER", [NewEntry("pdq", "f" * 64), NewEntry("md5", "a" * 32)])
    cs = ClusterStore(Home(cat))
    run = cs.start_run("test-model", {"min_cluster_size": 2}, "full", None)
    cs.finish_run(run, [NewCluster(None, 0, 2, None, "new", 0.4, 0.9, [2, 3], 0.5, -0.5)],
                  [Member(2, 0, 0.9, 0.1, 0.5, -0.5, False), Member(3, 0, 0.8, 0.2, 0.6, -0.4, False),
                   Member(1, None, 0.0, 0.9, 2.0, 2.0, False)], n_noise=1, summary={"n": 3}, timings={"t": 1.0})
    cs.update_identity(cs.clusters(run)[0].id, actor="sam", name="memes", label="spam", status="confirmed")
    sessions = SessionStore(cat.engine, idle=dt.timedelta(minutes=30), absolute=dt.timedelta(hours=8))
    sessions.open("rita", "fp" * 32)
    RequestLedger(cat.engine).claim("rita", "req-1")
    cat.close()
""")


def _old_code(tmp: Path) -> Path:
    """The previous release's tree, from git (CI runs from a clone of main, which holds it)."""
    out = tmp / "previous-release"
    proc = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS_RELEASE],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, (f"the upgrade test needs commit {PREVIOUS_RELEASE} of this repository's history "
                                  f"(a full clone): {proc.stderr.decode()[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(out, filter="data")
    return out


def _dump(url: str, columns: dict[str, list[str]] | None = None) -> dict[str, list[tuple]]:
    """Every table's rows, by the database's own account (reflection: neither release's models); with
    ``columns``, only those tables' named columns (what an older release wrote, beside columns added since)."""
    engine = create_engine(engine_url(url))
    md = MetaData()
    md.reflect(engine)
    with engine.connect() as c:
        out = {name: sorted(tuple(map(repr, r)) for r in c.execute(
                   select(*[t.c[n] for n in (columns[name] if columns else t.columns.keys())])).all())
               for name, t in md.tables.items() if name != "alembic_version" and (not columns or name in columns)}
    engine.dispose()
    return out


def _columns(url: str) -> dict[str, list[str]]:
    engine = create_engine(engine_url(url))
    md = MetaData()
    md.reflect(engine)
    engine.dispose()
    return {name: list(t.columns.keys()) for name, t in md.tables.items() if name != "alembic_version"}


def test_a_store_from_the_previous_release_upgrades_with_its_data_intact(catalog_url, tmp_path):
    url = catalog_url or f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    old = _old_code(tmp_path)
    proc = subprocess.run([sys.executable, "-c", BUILD, str(old), url], env=child_env(), cwd=str(old),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, before_columns = _dump(url), _columns(url)
    assert before["audit_log"] and before["cluster_members"] and before["viewer_sessions"] and before["write_requests"]
    engine = create_engine(engine_url(url))
    assert schema.current_revision(engine) == "0002"
    engine.dispose()

    catalog = Catalog(url)  # today's code opens it: the upgrade runs
    assert schema.current_revision(catalog.engine) == schema.head_revision()
    have = set(inspect(catalog.engine).get_table_names())
    assert set(Base.metadata.tables) <= have
    catalog.close()
    after = _dump(url, before_columns)
    assert after == before  # every row of every table, unchanged, in the columns it had
    # columns added since are filled: each bank entry its own content, each bank at its old switch
    raw = create_engine(engine_url(url))
    with raw.connect() as c:
        assert c.execute(text("SELECT count(*) FROM bank_entries WHERE content_id IS NULL OR content_id <> id")
                         ).scalar() == 0
        assert c.execute(text("SELECT count(*) FROM banks WHERE enabled_ratio <> 1.0")).scalar() == 0
    raw.dispose()
    # and today's code reads what the previous release wrote
    from indexer.storage.audit import AuditLog
    from indexer.storage.clusters import ClusterStore
    catalog = Catalog(url)
    assert [e.action for e in AuditLog(catalog.engine).events()] == ["login", "flag"]

    class Home:
        def __init__(self, c: Catalog) -> None:
            self.catalog = c
    cs = ClusterStore(Home(catalog))  # type: ignore[arg-type]
    [cl] = cs.clusters(cs.current_run().id)  # type: ignore[union-attr]
    assert (cl.name, cl.status, cl.size) == ("memes", "confirmed", 2)
    assert catalog.get(1).flagged and catalog.get(2).flag_label == "nudity"
    # bank entry ids are never given twice once upgraded (the PDQ bank index follows them by id)
    from indexer.hashbanks.banks import Banks, NewEntry
    banks = Banks(catalog)
    top = max(e.id for e in banks.page("PARTNER"))
    banks.remove_entry("PARTNER", top)
    [new], _ = banks.add("PARTNER", [NewEntry("pdq", "e" * 64)])
    assert new > top
    catalog.close()


def test_a_new_store_has_every_table_at_the_newest_revision(catalog_url, tmp_path):
    url = catalog_url or f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    catalog = Catalog(url)
    assert schema.current_revision(catalog.engine) == schema.head_revision()
    assert set(Base.metadata.tables) <= set(inspect(catalog.engine).get_table_names())
    catalog.close()
