"""The audit log: append-only rows on the catalog's engine, newest first, by target, reveals remembered."""
from __future__ import annotations

from indexer.audit import AuditLog
from indexer.catalog import Catalog


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
