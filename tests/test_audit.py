"""The audit log: append-only rows on the catalog's engine, newest first, by target, reveals remembered."""
from __future__ import annotations

from indexer.storage.audit import AuditLog
from indexer.storage.catalog import Catalog


def test_records_are_kept_in_order_with_their_detail(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    log = AuditLog(catalog.engine)
    log.record("rita", "flag", "image:1", reason="seen before", ids=[1])
    log.record("sam", "unflag", "image:1", reason="false positive")
    log.record("rita", "login", "viewer")
    events = log.events()
    assert [e.action for e in events] == ["login", "unflag", "flag"]
    assert events[2].detail == {"reason": "seen before", "ids": [1]} and events[2].actor == "rita"
    assert [e.action for e in log.events(target="image:1")] == ["unflag", "flag"]
    assert len(log.events(limit=1)) == 1
    # a second log on the same database sees the same rows (the table is created once)
    assert len(AuditLog(catalog.engine).events()) == 3
    catalog.close()


def test_reveals_are_remembered_per_actor_and_target(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    log = AuditLog(catalog.engine)
    assert not log.revealed_recently("rita", "image:5")
    log.record("rita", "reveal", "image:5")
    assert log.revealed_recently("rita", "image:5")
    assert not log.revealed_recently("sam", "image:5") and not log.revealed_recently("rita", "image:6")
    assert not log.revealed_recently("rita", "image:5", minutes=-1)  # older than the window
    catalog.close()


def test_filters_prefixes_time_and_paging(tmp_path):
    import datetime as dt
    from indexer.storage.audit import AuditQuery, to_csv
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    log = AuditLog(catalog.engine)
    for i in range(25):
        log.record("rita" if i % 2 else "sam", "flag" if i % 3 else "unflag", f"cluster:{i}" if i < 20 else f"image:{i}",
                   reason=f"r{i}")
    assert len(log.events(100, query=AuditQuery(actor="rita"))) == 12
    assert {e.target for e in log.events(100, query=AuditQuery(target="image:*"))} == {f"image:{i}" for i in range(20, 25)}
    assert [e.target for e in log.events(100, query=AuditQuery(target="cluster:1"))] == ["cluster:1"]
    assert log.events(100, query=AuditQuery(target="cluster%*")) == []  # wildcards are literal
    page1 = log.events(10, query=AuditQuery(actor="sam"))
    page2 = log.events(10, query=AuditQuery(actor="sam", before_id=page1[-1].id))
    assert len(page1) == 10 and len(page2) == 3 and page1[-1].id > page2[0].id
    future = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(minutes=5)
    assert log.events(100, query=AuditQuery(since=future)) == []
    assert len(log.events(100, query=AuditQuery(until=future))) == 25
    csv_text = to_csv(log.events(2))
    assert csv_text.splitlines()[0] == "id,at,actor,action,target,detail" and '"{""reason"": ""r24""}"' in csv_text
    catalog.close()
