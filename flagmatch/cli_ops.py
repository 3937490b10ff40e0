"""The operator's commands: ``backup``, ``restore``, ``check`` (each a thin wrapper over its function:
``indexer.storage.backup``, ``flagmatch.check``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from flagmatch import wiring
from flagmatch.commands import SettingsCommand, Stages, main, os_user, with_settings
from flagmatch.jobmetrics import job
from flagmatch.settings import Settings

if TYPE_CHECKING:
    from flagmatch.check import CheckReport


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@main.command(cls=SettingsCommand)
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--full", is_flag=True, help="copy every file (default: link what the newest backup in DEST already holds unchanged)")
@with_settings()
def backup(dest: Path, full: bool, settings: Settings) -> None:
    """Back the home up into a new folder under DEST while ingest and serving go on: the catalog (SQLite's
    online backup, or pg_dump), the indexes, raw vectors, thumbnails and models, with a manifest of checksums."""
    from indexer.storage.backup import backup as take
    stages = Stages()
    with job(settings, "backup") as figures:
        report = take(wiring.open_store(settings), dest, full=full, progress=stages)
        figures.update(files=report.files, copied_bytes=report.copied_bytes, linked_bytes=report.linked_bytes,
                       image_head=report.snapshot.image_head, audit_head=report.snapshot.audit_head)
    stages.close()
    snap = report.snapshot
    click.echo(f"backup {report.path}: catalog ({snap.engine}) up to image {snap.image_head}, flag event "
               f"{snap.flag_event_head}, audit row {snap.audit_head}; {report.files:,} files, "
               f"{_mib(report.copied_bytes)} copied, {_mib(report.linked_bytes)} linked from the previous backup")
    gone = {k: v for k, v in report.gone_since.items() if v}
    if gone:
        click.echo(f"  removed after the snapshot (deleted meanwhile): {json.dumps(gone)[:500]}")


@main.command(cls=SettingsCommand)
@click.argument("src", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--home", "new_home", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="the new home to build (must not exist, or be empty)")
@click.option("--catalog-url", "new_catalog", default="",
              help="for a PostgreSQL backup: the empty database to restore the catalog into")
@click.option("--no-check", is_flag=True, help="skip the consistency check of the restored home")
def restore(src: Path, new_home: Path, new_catalog: str, no_check: bool) -> None:
    """Build a working home from the backup SRC (one folder of a backup DEST), its files checked against the
    manifest first; then check it."""
    from indexer.errors import FlagmatchError
    from indexer.storage.backup import restore as put_back
    stages = Stages()
    try:
        report = put_back(src, new_home, new_catalog, progress=stages)
    except FlagmatchError as exc:
        raise click.ClickException(f"{exc.message} [{exc.code}]") from None
    stages.close()
    snap = report.snapshot
    click.echo(f"restored {report.files:,} files and the {snap.engine} catalog (image {snap.image_head}, audit row "
               f"{snap.audit_head}) into {report.home}")
    if not no_check:
        settings = Settings.load({"home": str(new_home), "catalog_url": new_catalog or None})
        _check(settings, repair=False, as_json=False)


@main.command(cls=SettingsCommand)
@click.option("--repair", is_flag=True, help="rebuild what can be rebuilt from the raw data, and check again")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@with_settings("index", "ingest", "decode")
def check(repair: bool, as_json: bool, settings: Settings) -> None:
    """Check that the catalog, raw vectors, indexes, hashes, thumbnails and audit trail agree; exit 1 when
    something is (still) wrong."""
    _check(settings, repair, as_json)


def _check(settings: Settings, repair: bool, as_json: bool) -> None:
    from flagmatch.check import check as run_check
    store = wiring.open_store(settings)
    stages = Stages()
    with job(settings, "check", key="code") as figures:
        report = run_check(store, open_index=lambda: wiring.open_index(store, settings, for_rebuild=True),
                           matcher=wiring.hash_matcher(settings, store), opts=wiring.ingest_options(settings),
                           repair=repair, progress=stages)
        figures.update(whole=float(report.ok), findings={f.code: f.count - f.repaired for f in report.findings})
        stages.close()
        _print_check(report, repair, as_json)
        if not report.ok:
            sys.exit(1)


def _print_check(report: "CheckReport", repair: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "checked": report.checked,
                               "findings": [f.to_json() for f in report.findings]}, indent=1))
    else:
        click.echo("checked: " + ", ".join(f"{n:,} {what}" for what, n in report.checked.items()))
        for f in report.findings:
            fixed = f" — repaired {f.repaired}" if f.repaired else (" (repairable: --repair)" if f.repairable and not repair
                                                                     else "")
            examples = f" e.g. {', '.join(map(str, f.ids[:10]))}" if f.ids else ""
            click.echo(f"  {f.part:<10} {f.code:<20} {f.count:>6}  {f.message}{examples}{fixed}")
        click.echo("whole" if report.ok else "NOT whole")


@main.command(cls=SettingsCommand)
@click.option("--url", default="", help="ask a running server (its /status) instead of reading the home")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@with_settings()
def status(url: str, as_json: bool, settings: Settings) -> None:
    """The health of every part, as /status reports it: catalog, model, indexes and their lag, matching
    space, disk, replica lag; exit 1 when a critical part fails, 0 when healthy or degraded."""
    if url:
        import urllib.error
        import urllib.request
        req = urllib.request.Request(url.rstrip("/") + "/status", headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"{url} does not answer /status: {exc}") from None
    else:
        body = local_health(settings)
    if as_json:
        click.echo(json.dumps(body, indent=1, default=str))
    else:
        click.echo(f"status: {body['status']}")
        for name, c in body.get("checks", {}).items():
            figures = ", ".join(f"{k} {v}" for k, v in c.items() if k != "ok")
            click.echo(f"  {'ok  ' if c['ok'] else 'FAIL'} {name:<10} {figures}")
        if body.get("error"):
            click.echo(f"  {body['error']}")
    if body["status"] not in ("ok", "degraded"):
        sys.exit(1)


def local_health(settings: Settings) -> dict:
    """``search.health`` from the home itself: the published indexes' checkpoints, the model the store is
    bound to (this command loads none)."""
    from search.health import Limits, health
    store = wiring.open_store(settings)
    try:
        meta = store.catalog.model_meta()
        cps = {sc: store.catalog.checkpoint(sc) for sc in ("all", "flagged")}
        scopes = {sc: (cp.generation, cp.image_id) for sc, cp in cps.items() if cp is not None}
        space = next((int(cp.params.get("space_version", 0)) for cp in cps.values() if cp is not None), None)
        model = ({"ok": True, "model_id": meta["model_id"], "loaded": False} if meta.get("model_id")
                 else {"ok": True, "model_id": None, "note": "no image ingested yet"})
        return health(store, scopes=scopes, space=space, model=model, limits=Limits.of(settings))
    finally:
        store.close()


@main.command(cls=SettingsCommand)
@click.option("--dry-run", is_flag=True, help="count what would go; change nothing")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings()
def retention(dry_run: bool, actor: str | None, settings: Settings) -> None:
    """Apply the retention settings: thumbnails of long-unflagged images, old audit rows (365 days at least),
    old viewer sessions; thumbnail removals and audit purges are audited."""
    import datetime as dt

    from indexer.review.retention import Policy, apply_retention
    from indexer.storage.audit import AuditLog
    from indexer.storage.sessions import SessionStore
    store = wiring.open_store(settings)
    policy = Policy(settings.retain_unflagged_thumbs_days, settings.retain_audit_days, settings.retain_sessions_days)
    sessions = SessionStore(store.catalog.engine, idle=dt.timedelta(minutes=settings.session_idle),
                            absolute=dt.timedelta(hours=settings.session_max))
    with job(settings, "retention") as figures:
        done = apply_retention(store, AuditLog(store.catalog.engine), sessions, policy, actor=actor or os_user(),
                               dry_run=dry_run)
        figures.update(thumbnails=done.thumbnails, audit_rows=done.audit_rows, sessions=done.sessions)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb}: {done.thumbnails:,} thumbnails of unflagged images, {done.audit_rows:,} audit rows, "
               f"{done.sessions:,} viewer sessions" + (" (first batch of thumbnails only)" if dry_run and done.thumbnails else ""))
