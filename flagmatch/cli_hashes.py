"""``flagmatch banks …`` and ``flagmatch hashes …``: hash banks in and out, and back-filling hashes of
stores made before hashes existed. Thin wrappers over ``indexer.hashbanks.banks`` and ``indexer.ingest.pipeline``; every
change to a bank is written to the audit log."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from flagmatch import wiring
from flagmatch.commands import Bar, SettingsCommand, main, os_user, with_settings
from flagmatch.jobmetrics import job
from flagmatch.settings import Settings
from indexer.hashbanks.banks import EXPORT_FORMATS, ROLES, BadRow, Banks
from indexer.review.banks import create_bank, delete_bank, update_bank
from indexer.storage.audit import AuditLog


@main.group()
def banks() -> None:
    """Hash banks: named lists of PDQ / MD5 hashes (industry lists, partners' exports) matched at search."""


def _banks(settings: Settings) -> tuple[Banks, AuditLog]:
    store = wiring.open_store(settings)
    return Banks(store.catalog), AuditLog(store.catalog.engine)


@banks.command("list", cls=SettingsCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@with_settings()
def banks_list(as_json: bool, settings: Settings) -> None:
    """Every bank with its role, threshold, switch and size."""
    bs, _ = _banks(settings)
    rows = bs.list()
    if as_json:
        click.echo(json.dumps([b.to_json() for b in rows], indent=2))
        return
    if not rows:
        click.echo("no banks: flagmatch banks create NAME, or flagmatch banks import FILE --bank NAME --create")
    for b in rows:
        state = "enabled" if b.enabled else "DISABLED"
        click.echo(f"{b.name:<24} {b.role:<8} {state:<8} pdq ≤ {b.pdq_threshold:<2} bits  {b.entries:>10,} entries"
                   f"  {b.source}")


@banks.command("create", cls=SettingsCommand)
@click.argument("name")
@click.option("--source", default="", help="where the list comes from (e.g. ncmec, a partner's name)")
@click.option("--role", type=click.Choice(ROLES), default="match",
              help="match: a hit is evidence; negative: known-benign hashes whose hits suppress matches")
@click.option("--threshold", type=int, default=31, show_default=True, help="PDQ match distance in bits")
@click.option("--disabled", is_flag=True, help="create it switched off")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings()
def banks_create(name: str, source: str, role: str, threshold: int, disabled: bool, actor: str | None,
                 settings: Settings) -> None:
    """Create an empty bank NAME (upper case, digits, underscores)."""
    bs, audit = _banks(settings)
    b = create_bank(bs, audit, name, actor=actor or os_user(), source=source, role=role, enabled=not disabled,
                    pdq_threshold=threshold)
    click.echo(f"created bank {b.name} ({b.role}, pdq ≤ {b.pdq_threshold} bits, {'enabled' if b.enabled else 'disabled'})")


@banks.command("set", cls=SettingsCommand)
@click.argument("name")
@click.option("--enable/--disable", "enabled", default=None, help="switch matching on or off (at once)")
@click.option("--threshold", type=int, default=None, help="PDQ match distance in bits")
@click.option("--role", type=click.Choice(ROLES), default=None)
@click.option("--source", default=None)
@click.option("--rename", default=None, help="a new name")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings()
def banks_set(name: str, enabled: bool | None, threshold: int | None, role: str | None, source: str | None,
              rename: str | None, actor: str | None, settings: Settings) -> None:
    """Change a bank: switch it, its threshold, role, source or name."""
    bs, audit = _banks(settings)
    b = update_bank(bs, audit, name, actor=actor or os_user(), enabled=enabled, pdq_threshold=threshold, role=role,
                    source=source, rename=rename)
    click.echo(f"{b.name}: {b.role}, pdq ≤ {b.pdq_threshold} bits, {'enabled' if b.enabled else 'DISABLED'}")


@banks.command("delete", cls=SettingsCommand)
@click.argument("name")
@click.option("--yes", is_flag=True, help="really delete the bank and every entry in it")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings("index")
def banks_delete(name: str, yes: bool, actor: str | None, settings: Settings) -> None:
    """Delete a bank and its entries."""
    if not yes:
        raise click.UsageError("deleting a bank removes all its entries: add --yes")
    store = wiring.open_store(settings)
    n = delete_bank(Banks(store.catalog), AuditLog(store.catalog.engine), name, actor=actor or os_user())
    index = wiring.hash_matcher(settings, store).bank_index
    index.rebuild()  # drop the deleted entries' hashes
    index.save()
    click.echo(f"deleted bank {name} and {n:,} entries")


@banks.command("import", cls=SettingsCommand)
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--bank", "bank", required=True, help="the bank to add to")
@click.option("--create", is_flag=True, help="create the bank when it does not exist")
@click.option("--source", default=None, help="with --create: where the list comes from (default: the file name)")
@click.option("--type", "default_type", default=None,
              help="signal type of rows that do not say (default: from the hash's length: 64 hex PDQ, 32 MD5)")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="write every bad row (line, reason) to this file as TSV")
@click.option("--json", "as_json", is_flag=True, help="print the import report as JSON")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings("index")
def banks_import(file: str, bank: str, create: bool, source: str | None, default_type: str | None,
                 report: str | None, as_json: bool, actor: str | None, settings: Settings) -> None:
    """Import a hash list into a bank: threatexchange's exports (dataset -P, --csv, hash output), or
    plain hex hashes one per line / CSV / TSV with optional id and tag columns. Bad rows are reported
    with their line numbers and skipped; the rest is imported."""
    store = wiring.open_store(settings)
    bs, audit = Banks(store.catalog), AuditLog(store.catalog.engine)
    if create and not any(b.name == bank for b in bs.list(counts=False)):
        bs.create(bank, source=source if source is not None else Path(file).name)
    out = open(report, "w", encoding="utf-8") if report else None

    def on_bad(row: BadRow) -> None:
        if out is not None:
            out.write(f"{row.line}\t{row.reason}\n")
    stream = sys.stdin.buffer if file == "-" else open(file, "rb")
    try:
        rep = bs.import_list(bank, stream, default_type=default_type, on_bad=on_bad)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
        if out is not None:
            out.close()
    audit.record(actor or os_user(), "bank_import", f"bank:{bank}", file=file, added=rep.added,
                 already_banked=rep.already_banked, bad_rows=rep.bad_rows)
    wiring.hash_matcher(settings, store).bank_index.save()
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
        return
    types = ", ".join(f"{n:,} {t}" for t, n in sorted(rep.by_type.items()))
    click.echo(f"{bank}: {rep.added:,} added, {rep.already_banked:,} already banked, {rep.bad_rows:,} bad rows "
               f"of {rep.lines:,} lines{f' ({types})' if types else ''}")
    for b in rep.bad[:20]:
        click.echo(f"  line {b.line}: {b.reason}", err=True)
    if rep.bad_rows > 20:
        click.echo(f"  … {rep.bad_rows - 20:,} more" + (f" (all in {report})" if report else " (--report FILE lists all)"),
                   err=True)


@banks.command("export", cls=SettingsCommand)
@click.option("--bank", "bank", default=None, help="export this bank's entries (default: the flagged images)")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="te", show_default=True,
              help="te: '<type> <hash>' lines (threatexchange's local-file list); csv: threatexchange's "
                   "dataset --csv columns; hex: bare hashes")
@click.option("--signal", "signals", default="pdq", show_default=True,
              help="with the flagged images: comma-separated signal types (pdq, md5, vpdq)")
@click.option("--collab", default="flagmatch", show_default=True, help="csv: the collab column")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@with_settings()
def banks_export(bank: str | None, fmt: str, signals: str, collab: str, out_path: str, settings: Settings) -> None:
    """Write the flagged images' hashes (or a bank's) as a list other teams and tools can import."""
    from indexer.media.hashes import canonical_type
    bs, _ = _banks(settings)
    types = tuple(canonical_type(t) for t in signals.split(",") if t.strip())
    out = sys.stdout if out_path == "-" else open(out_path, "w", encoding="utf-8")
    try:
        n = bs.export_bank(bank, out, fmt=fmt) if bank else bs.export_flagged(out, fmt=fmt, signal_types=types,
                                                                               collab=collab)
    finally:
        if out is not sys.stdout:
            out.close()
    click.echo(f"wrote {n:,} hashes", err=True)


@main.group()
def hashes() -> None:
    """The images' own hashes (PDQ, MD5)."""


@hashes.command("backfill", cls=SettingsCommand)
@with_settings("ingest", "decode", "index")
def hashes_backfill(settings: Settings) -> None:
    """Hash the stored images that have none yet (stores made before hashes), from their originals on disk."""
    from indexer.ingest.pipeline import backfill_hashes
    store = wiring.open_store(settings)
    bar = Bar(store.catalog.count_unhashed())
    with job(settings, "hashes_backfill", key="code") as figures:
        try:
            counts = backfill_hashes(store, wiring.ingest_options(settings), progress=bar)
        finally:
            bar.close()
        matcher = wiring.hash_matcher(settings, store)
        matcher.image_index.rebuild()  # back-filled ids are below what the index covers: build it again
        matcher.image_index.save()
        figures.update(images_hashed=counts.hashed, images_failed=counts.failed, failures=dict(counts.reasons))
    click.echo(f"hashed {counts.hashed:,}  failed {counts.failed:,}")
    for code, n in sorted(counts.reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  failed: {code:<22} {n}")
    if counts.failed:
        click.echo("details: flagmatch errors (the images stay unhashed; run backfill again once the files are back)")


@main.group()
def exchanges() -> None:
    """Hash exchanges (threatexchange's APIs: ThreatExchange, NCMEC, StopNCII, a local file, the sample),
    each fetched into the bank of its name."""


@exchanges.command("create", cls=SettingsCommand)
@click.argument("name")
@click.argument("api")
@click.option("--config", "config_json", default="{}", show_default=True,
              help="the API's collaboration config as JSON (e.g. '{\"filename\": \"/lists/pdq.txt\"}')")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings()
def exchanges_create(name: str, api: str, config_json: str, actor: str | None, settings: Settings) -> None:
    """Configure exchange NAME of API (a local_file exchange made here may read any file this user can)."""
    from indexer.hashbanks import exchanges as xapi
    from indexer.review.banks import create_exchange
    from indexer.storage.exchanges import ExchangeStore
    try:
        body = json.loads(config_json)
    except ValueError:
        raise click.UsageError("--config is JSON") from None
    banks, audit = _banks(settings)
    cfg = xapi.parse_config(api, name, body)
    create_exchange(banks, ExchangeStore(banks.catalog), audit, name, api, xapi.dump_config(cfg),
                    actor=actor or os_user())
    click.echo(f"exchange {name} ({api}) fills bank {name}")


@exchanges.command("fetch", cls=SettingsCommand)
@click.argument("names", nargs=-1)
@with_settings()
def exchanges_fetch(names: tuple[str, ...], settings: Settings) -> None:
    """Fetch exchanges (every enabled one when none is named) from their checkpoints into their banks."""
    from indexer.hashbanks import exchanges as xapi
    from indexer.storage.exchanges import ExchangeStore
    banks, audit = _banks(settings)
    store = ExchangeStore(banks.catalog)
    todo = list(names) or [e.name for e in store.list() if e.enabled]
    failed = 0
    for name in todo:
        report = xapi.fetch(store, banks, audit, name, actor=os_user())
        status = "ok" if report.ok else f"FAILED: {report.error}"
        click.echo(f"{name}: +{report.added:,} -{report.removed:,} skipped {report.skipped:,} "
                   f"in {report.batches} batch(es)  {status}")
        failed += not report.ok
    if failed:
        sys.exit(1)
