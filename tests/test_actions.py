"""Decisions are all-or-nothing with their audit row (indexer.review.actions, .clusters, .banks), on both
engines: a failure or a killed process at any step between the state change and the audit row leaves the
catalog as it was — never a flag change, a deletion, a cluster decision or a bank change without its
audit entry. The faults are injected by the tests (patching the storage writers), never by production code."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from indexer.review import actions
from indexer.review.banks import add_entries, create_bank, delete_bank, remove_entry, update_bank
from indexer.review.clusters import Decision, decide_cluster
from indexer.hashbanks.banks import Banks, NewEntry
from indexer.storage import verdicts
from indexer.storage.audit import AuditLog
from indexer.storage.catalog import NewImage
from indexer.storage.clusters import ClusterStore, Member, NewCluster
from tests.helpers import child_env


class Boom(RuntimeError):
    pass


def _images(store, n: int = 4) -> list[int]:
    res = store.catalog.write_images(
        [NewImage(0, f"{i:064x}", 10, "PNG", 1, 1, 1, 0.5, "", ((f"/in/{i}.png", None),)) for i in range(1, n + 1)],
        "test-model")
    return [int(i) for i in res.ids]


def _state(store, audit: AuditLog) -> tuple:
    """Everything a decision touches: flags, flag history, verdicts, queue, deletions, audit rows."""
    recs = store.catalog.get_many(store.catalog.image_ids(flagged=None) or [])
    flags = sorted((i, r.flagged, r.flag_label, r.deleted) for i, r in recs.items())
    return (flags, store.catalog.head(), verdicts.count(store.catalog),
            len(verdicts.candidates(store.catalog, 1000)), [(e.action, e.target) for e in audit.events(1000)],
            [(b.name, b.enabled, b.pdq_threshold) for b in Banks(store.catalog).list()])


# each step a decision takes inside its transaction, and the call that takes the decision
STEPS = ["indexer.storage.catalog.Catalog.set_flag", "indexer.storage.verdicts.record",
         "indexer.storage.audit.AuditLog.record"]


def _fail_after(monkeypatch, target: str) -> None:
    """Let ``target`` do its work, then fail: the step after it never happens."""
    mod, _, attr = target.rpartition(".")
    owner: object
    if mod.endswith(("Catalog", "AuditLog", "ClusterStore", "BankStore")):
        modname, _, cls = mod.rpartition(".")
        owner = getattr(__import__(modname, fromlist=[cls]), cls)
    else:
        owner = __import__(mod, fromlist=[attr])
    real = getattr(owner, attr)

    def wrapped(*a, **kw):
        real(*a, **kw)
        raise Boom(f"failed after {target}")
    monkeypatch.setattr(owner, attr, wrapped)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("flag", [True, False])
def test_a_flag_change_never_outlives_a_failure_before_its_audit_row(store, monkeypatch, step, flag):
    ids = _images(store)
    audit = AuditLog(store.catalog.engine)
    if not flag:
        actions.set_flags(store, None, audit, ids[:2], flag=True, actor="rita", source="manual", reason="seen")
    before = _state(store, audit)
    _fail_after(monkeypatch, step)
    with pytest.raises(Boom):
        actions.set_flags(store, None, audit, ids[:2], flag=flag, actor="sam", source="manual", reason="why",
                          label="spam")
    monkeypatch.undo()
    assert _state(store, audit) == before
    # and the same decision, taken again, lands whole
    changed = actions.set_flags(store, None, audit, ids[:2], flag=flag, actor="sam", source="manual", reason="why",
                                label="spam")
    assert changed == ids[:2]
    assert audit.events(1)[0].action == ("flag" if flag else "unflag")
    assert all(store.catalog.get(i).flagged is flag for i in ids[:2])


@pytest.mark.parametrize("step", ["indexer.storage.catalog.Catalog.mark_deleted", "indexer.storage.audit.AuditLog.record"])
def test_a_delete_is_all_or_nothing_with_its_audit_row(store, monkeypatch, step):
    ids = _images(store)
    audit = AuditLog(store.catalog.engine)
    actions.set_flags(store, None, audit, ids[:1], flag=True, actor="rita", source="manual")
    before = _state(store, audit)
    _fail_after(monkeypatch, step)
    with pytest.raises(Boom):
        actions.delete_images(store, None, audit, ids[:1], actor="sam", reason="legal request")
    monkeypatch.undo()
    assert _state(store, audit) == before
    assert actions.delete_images(store, None, audit, ids[:1], actor="sam", reason="legal request") == ids[:1]
    assert store.catalog.get(ids[0]).deleted and audit.events(1)[0].action == "delete"


def _one_cluster(store, ids: list[int]) -> tuple[ClusterStore, int]:
    cstore = ClusterStore(store)
    run = cstore.start_run("test-model", {}, "full", None)
    cstore.finish_run(run, [NewCluster(identity=None, label=0, size=len(ids), prev_size=None, change="new",
                                       persistence=0.5, mean_probability=0.9, exemplars=ids[:3], x=0.0, y=0.0)],
                      [Member(image_id=i, cluster_id=0, probability=0.9, outlier_score=0.1, x=0.0, y=0.0,
                              provisional=False) for i in ids], n_noise=0, summary={}, timings={})
    return cstore, cstore.clusters(run)[0].id


@pytest.mark.parametrize("step", ["indexer.storage.catalog.Catalog.set_flag",
                                  "indexer.storage.clusters.ClusterStore.update_identity",
                                  "indexer.storage.audit.AuditLog.record"])
def test_a_cluster_dismissal_is_all_or_nothing(store, monkeypatch, step):
    ids = _images(store)
    audit = AuditLog(store.catalog.engine)
    actions.set_flags(store, None, audit, ids, flag=True, actor="rita", source="manual")
    cstore, cid = _one_cluster(store, ids)
    before = (_state(store, audit), cstore.cluster(cstore.current_run().id, cid).status)
    _fail_after(monkeypatch, step)
    with pytest.raises(Boom):
        decide_cluster(store, None, audit, cstore, cid, Decision("dismissed", "not_unsafe", note="memes"),
                       actor="sam", labels=["spam"], reasons=["not_unsafe"])
    monkeypatch.undo()
    assert (_state(store, audit), cstore.cluster(cstore.current_run().id, cid).status) == before
    res = decide_cluster(store, None, audit, cstore, cid, Decision("dismissed", "not_unsafe", note="memes"),
                         actor="sam", labels=["spam"], reasons=["not_unsafe"])
    assert sorted(res.unflagged) == ids and res.cluster.status == "dismissed"
    assert [e.action for e in audit.events(2)] == ["cluster_dismissed", "unflag"]


@pytest.mark.parametrize("step", ["indexer.storage.banks.BankStore.create", "indexer.storage.banks.BankStore.update",
                                  "indexer.storage.banks.BankStore.delete", "indexer.storage.banks.BankStore.add",
                                  "indexer.storage.banks.BankStore.remove_entry"])
def test_bank_changes_are_all_or_nothing_with_their_audit_row(store, monkeypatch, step):
    audit = AuditLog(store.catalog.engine)
    banks = Banks(store.catalog)
    if not step.endswith("create"):
        create_bank(banks, audit, "PARTNER", actor="rita")
    if step.endswith("remove_entry"):
        [entry], _ = add_entries(banks, audit, "PARTNER", [NewEntry("pdq", "f" * 64)], actor="rita")
    before = _state(store, audit) + ([(e.id, e.signal) for e in banks.page("PARTNER")] if banks.list() else [],)
    _fail_after(monkeypatch, step)
    with pytest.raises(Boom):
        if step.endswith("create"):
            create_bank(banks, audit, "PARTNER", actor="rita")
        elif step.endswith("update"):
            update_bank(banks, audit, "PARTNER", actor="rita", enabled=False, pdq_threshold=20)
        elif step.endswith(".add"):
            add_entries(banks, audit, "PARTNER", [NewEntry("pdq", "e" * 64)], actor="rita")
        elif step.endswith("remove_entry"):
            remove_entry(banks, audit, "PARTNER", entry, actor="rita")
        else:
            delete_bank(banks, audit, "PARTNER", actor="rita")
    monkeypatch.undo()
    assert _state(store, audit) + ([(e.id, e.signal) for e in banks.page("PARTNER")] if banks.list() else [],) \
        == before


KILL = textwrap.dedent("""
    import os, sys
    from flagmatch.settings import Settings
    from flagmatch.wiring import open_store
    from indexer.review import actions
    from indexer.storage.audit import AuditLog
    from indexer.storage import verdicts
    store = open_store(Settings.load({"home": sys.argv[1], "catalog_url": sys.argv[2]}, environ={}))
    ids = [int(i) for i in sys.argv[3].split(",")]
    real = verdicts.record
    def record_then_die(*a, **kw):   # the flag change and its verdicts are written; the audit row is not
        real(*a, **kw)
        os._exit(9)
    verdicts.record = record_then_die
    actions.set_flags(store, None, AuditLog(store.catalog.engine), ids, flag=True, actor="sam", source="manual")
""")


def test_a_process_killed_between_the_flag_and_its_audit_row_leaves_neither(store, settings, tmp_path):
    ids = _images(store)
    audit = AuditLog(store.catalog.engine)
    before = _state(store, audit)
    proc = subprocess.run([sys.executable, "-c", KILL, str(settings.home), settings.catalog_url or "",
                           ",".join(map(str, ids[:2]))], env=child_env(), capture_output=True, text=True, timeout=300,
                          cwd=os.getcwd())
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert _state(store, audit) == before


def test_undo_brings_back_a_replaced_name_and_keeps_a_first_one(store):
    from indexer.review.clusters import name_cluster, undo_decision
    ids = _images(store)
    audit = AuditLog(store.catalog.engine)
    actions.set_flags(store, None, audit, ids, flag=True, actor="rita", source="manual")
    cstore, cid = _one_cluster(store, ids)
    decide_cluster(store, None, audit, cstore, cid, Decision("confirmed", "matches", name="Posters"),
                   actor="sam", labels=["spam"], reasons=["matches"])
    assert undo_decision(store, None, audit, cstore, cid, actor="sam").name == "Posters"  # given to an unnamed one
    name_cluster(store, cstore, audit, cid, actor="rita", name="Wall posters", label="spam")
    decide_cluster(store, None, audit, cstore, cid, Decision("dismissed", "matches", name="Memes"),
                   actor="sam", labels=["spam"], reasons=["matches"])
    info = undo_decision(store, None, audit, cstore, cid, actor="sam")
    assert (info.name, info.label, info.status) == ("Wall posters", "spam", "unreviewed")
    assert all(store.catalog.get(i).flagged for i in ids)


def test_a_flag_change_is_undone_once_with_the_labels_it_took(store):
    ids = _images(store)
    audit = AuditLog(store.catalog.engine)
    actions.set_flags(store, None, audit, ids[:2], flag=True, actor="rita", source="manual", label="spam")
    actions.set_flags(store, None, audit, ids[2:], flag=True, actor="rita", source="manual", label="scam")
    change = actions.change_flags(store, None, audit, ids, flag=False, actor="sam", source="review", reason="fp")
    undone = actions.undo_flags(store, None, audit, change.audit_id, actor="sam")
    assert sorted(undone.changed) == ids
    assert [store.catalog.get(i).flag_label for i in ids] == ["spam", "spam", "scam", "scam"]
    with pytest.raises(Exception, match="already undone"):
        actions.undo_flags(store, None, audit, change.audit_id, actor="sam")
