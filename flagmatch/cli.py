"""The ``flagmatch`` commands for the store, search, review and clustering (banks and hashes: ``cli_hashes``;
learning: ``cli_heads``). Each command shows the settings it reads (``flagmatch.commands``); domain errors
become a clear message and a non-zero exit."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from flagmatch import cli_hashes, cli_heads, cli_ops, wiring  # noqa: F401  (the banks/hashes, learning and operator's commands)
from flagmatch.commands import Bar, SettingsCommand, Stages, main, os_user, with_settings
from flagmatch.jobmetrics import job
from flagmatch.settings import Settings
from indexer.storage.audit import AuditLog


@main.command(cls=SettingsCommand)
@click.argument("paths", nargs=-1, required=True)
@with_settings("model", "ingest", "decode", "index")
def ingest(paths: tuple[str, ...], settings: Settings) -> None:
    """Index folders, files, manifests (.csv/.jsonl) or '-' (paths on stdin)."""
    from indexer.ingest.sources import count_sources, iter_sources

    bar = Bar(count_sources(paths))
    with job(settings, "ingest", key="code") as figures:
        started = time.perf_counter()
        try:
            result = wiring.ingest_into(settings, iter_sources(paths, sys.stdin), progress=bar)
        finally:
            bar.close()
        counts, info = result.counts, result.model
        figures.update(images_new=counts.new, images_duplicate=counts.duplicates, images_flagged=counts.flagged,
                       images_failed=counts.failed, failures=dict(counts.reasons), decode_cpu_seconds=counts.decode_cpu_s,
                       images_per_second=(counts.new + counts.duplicates) / max(time.perf_counter() - started, 1e-9))
    click.echo(f"model {info.model_id} ({info.backend}, {info.precision})")
    click.echo(f"new {counts.new}  duplicates {counts.duplicates}  flagged {counts.flagged}  failed {counts.failed}")
    for code, n in sorted(counts.reasons.items(), key=lambda kv: -kv[1]):
        click.echo(f"  failed: {code:<22} {n}")
    if counts.failed:
        click.echo("details: flagmatch errors")


@main.command(cls=SettingsCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@with_settings()
def stats(as_json: bool, settings: Settings) -> None:
    """What the catalog holds."""
    store = wiring.open_store(settings)
    st = store.catalog.stats()
    st["index"] = wiring.index_stats(store, settings)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    click.echo(f"images       {st['images']}" + (f"  (videos: {st['videos']}, {st['keyframes']} keyframes)"
                                                 if st["videos"] else ""))
    click.echo(f"flagged      {st['flagged']}  " + "  ".join(f"{k}: {v}" for k, v in st["flagged_by_source"].items()))
    click.echo(f"paths seen   {st['paths']}")
    click.echo(f"errors       {sum(st['errors'].values())}  " + "  ".join(f"{k}: {v}" for k, v in st["errors"].items()))
    click.echo(f"model        {st['model_id']} ({st['dim']}-d)")
    h = st["hashes"]
    unhashed = st["images"] - h["images_hashed"]
    click.echo(f"hashes       {h['images_hashed']} images with PDQ/MD5"
               + (f" ({unhashed} without: flagmatch hashes backfill)" if unhashed > 0 else "")
               + f"; {h['banks']} bank(s), {h['banked_signals']} banked signals")
    run = st["last_run"]
    if run:
        click.echo(f"last ingest  #{run['id']} {run['started_at']}  backend {run['backend']}, "
                   f"precision {run['precision']}")
    for scope, ix in st["index"].items():
        click.echo(f"{'matching space' if scope == 'space' else 'index ' + scope:<14} {ix}")


@main.command(cls=SettingsCommand)
@click.option("--limit", default=50, show_default=True)
@with_settings()
def errors(limit: int, settings: Settings) -> None:
    """The latest ingest errors (path, reason)."""
    for path, code, message in wiring.open_store(settings).catalog.errors(limit):
        click.echo(f"{code:<20} {path}: {message}")


@main.command(cls=SettingsCommand)
@click.option("--actor", default=None, help="only this actor")
@click.option("--action", default=None, help="only this action (flag, unflag, delete, reveal, login, …)")
@click.option("--target", default=None, help="only this target; a prefix ending in * ('cluster:*')")
@click.option("--since", default=None, help="ISO time, or an age such as 7d or 12h")
@click.option("--until", default=None, help="ISO time")
@click.option("--before-id", type=int, default=None, help="page: events older than this id")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@with_settings()
def audit(actor: str | None, action: str | None, target: str | None, since: str | None, until: str | None,
          before_id: int | None, limit: int, fmt: str, settings: Settings) -> None:
    """The audit log, newest first: every reveal and decision from the viewer, the API and the CLI."""
    from indexer.storage.audit import parse_query, to_csv, to_json
    args = {"actor": actor, "action": action, "target": target, "until": until,
            "since": parse_since(since).isoformat() if since else None,
            "before_id": str(before_id) if before_id else None, "limit": str(limit)}
    q, n = parse_query({k: v for k, v in args.items() if v is not None})
    events = AuditLog(wiring.open_store(settings).catalog.engine).events(n, query=q)
    if fmt == "csv":
        click.echo(to_csv(events), nl=False)
    elif fmt == "json":
        click.echo(json.dumps({"events": [to_json(e) for e in events],
                               "next_before_id": events[-1].id if len(events) == n else None}, indent=2))
    else:
        for e in events:
            click.echo(f"{e.id:>7} {e.at:%Y-%m-%d %H:%M:%S} {e.actor:<14} {e.action:<12} {e.target:<20} "
                       f"{json.dumps(e.detail, ensure_ascii=False)}")
        if len(events) == n:
            click.echo(f"… older: flagmatch audit --before-id {events[-1].id}")


@main.command(cls=SettingsCommand)
@click.argument("cluster_id", type=int)
@click.option("--status", type=click.Choice(["confirmed", "dismissed"]), required=True,
              help="dismissed unflags every flagged member with the reason")
@click.option("--reason-code", required=True, help="one of --review-reasons")
@click.option("--note", default=None)
@click.option("--name", default=None)
@click.option("--label", default=None, help="one of --review-labels")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings("index", "server")
def decide(cluster_id: int, status: str, reason_code: str, note: str | None, name: str | None, label: str | None,
           actor: str | None, settings: Settings) -> None:
    """Record a review decision on a cluster of the current run (as the viewer's decision bar)."""
    from indexer.review.clusters import Decision, decide_cluster
    from indexer.storage.clusters import ClusterStore
    store = wiring.open_store(settings)
    result = decide_cluster(store, wiring.open_index(store, settings), AuditLog(store.catalog.engine),
                            ClusterStore(store), cluster_id,
                            Decision(status, reason_code, name, label, note), actor=actor or os_user(),
                            labels=settings.review_labels, reasons=settings.review_reasons)
    click.echo(f"cluster {cluster_id}: {result.cluster.status}" +
               (f", {len(result.unflagged)} image(s) unflagged" if result.unflagged else "") +
               (f"; next unreviewed: {result.next_unreviewed}" if result.next_unreviewed else ""))


@main.command(cls=SettingsCommand)
@click.argument("cluster_id", type=int)
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings("index")
def undo(cluster_id: int, actor: str | None, settings: Settings) -> None:
    """Undo the latest decision on a cluster (its previous state and flags come back)."""
    from indexer.review.clusters import undo_decision
    from indexer.storage.clusters import ClusterStore
    store = wiring.open_store(settings)
    info = undo_decision(store, wiring.open_index(store, settings), AuditLog(store.catalog.engine),
                         ClusterStore(store), cluster_id, actor=actor or os_user())
    click.echo(f"cluster {cluster_id}: decision undone, now {info.status}")


def _flag_command(flag: bool) -> Callable[..., Any]:
    @click.argument("refs", nargs=-1, required=True)
    @click.option("--reason", default=None, help="why (kept in the flag history)")
    @click.option("--label", default=None, help="label of the flag")
    @click.option("--actor", default=None, help="who (default: the OS user)")
    @click.option("--source", default="manual", show_default=True, type=click.Choice(["manual", "import", "review"]))
    @with_settings("index")
    def command(refs: tuple[str, ...], reason: str | None, label: str | None, actor: str | None,
                source: str, settings: Settings) -> None:
        from indexer.review.actions import set_flags
        store = wiring.open_store(settings)
        ids = [store.catalog.resolve(r) for r in refs]
        index = wiring.open_index(store, settings) if store.catalog.model_meta() else None
        changed = set_flags(store, index, AuditLog(store.catalog.engine), ids, flag=flag,
                            actor=actor or os_user(), source=source, reason=reason, label=label)
        if index is not None:
            index.save(("flagged",))
        verb = "flagged" if flag else "unflagged"
        click.echo(f"{verb} {len(changed)} of {len(ids)}" + (f": {', '.join(map(str, changed))}" if changed else ""))
    return command


@main.command(cls=SettingsCommand)
@click.argument("refs", nargs=-1, required=True)
@click.option("--reason", required=True, help="why (kept in the audit log)")
@click.option("--actor", default=None, help="who (default: the OS user)")
@with_settings("index")
def delete(refs: tuple[str, ...], reason: str, actor: str | None, settings: Settings) -> None:
    """Delete images by id, sha256 or external id: thumbnail, raw vector and index entries go; the sha256
    (so the same bytes are never ingested again) and the audit trail stay."""
    from indexer.review.actions import delete_images
    store = wiring.open_store(settings)
    ids = [store.catalog.resolve(r) for r in refs]
    index = wiring.open_index(store, settings) if store.catalog.model_meta() else None
    done = delete_images(store, index, AuditLog(store.catalog.engine), ids, actor=actor or os_user(), reason=reason)
    if index is not None:
        index.save()
    click.echo(f"deleted {len(done)}: {', '.join(map(str, done))}")


@main.command(cls=SettingsCommand)
@click.argument("refs", nargs=-1)
@click.option("--cluster", "cluster_id", type=int, default=None, help="seed with a cluster's most central members")
@click.option("--min-similarity", default=None, type=float,
              help="default: suggested from the seeds (as alike as they are to each other)")
@click.option("--limit", default=200, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@with_settings("search")
def sweep(refs: tuple[str, ...], cluster_id: int | None, min_similarity: float | None, limit: int, as_json: bool,
          settings: Settings) -> None:
    """Unflagged images anywhere in the corpus near flagged images (REFS) or a cluster (--cluster)."""
    from indexer.storage.clusters import ClusterStore
    store = wiring.open_store(settings)
    seeds = [store.catalog.resolve(r) for r in refs]
    if cluster_id is not None:
        cstore = ClusterStore(store)
        run = cstore.current_run()
        if run is None:
            raise click.ClickException("no clustering run yet: flagmatch cluster")
        seeds += [m.image_id for m in cstore.members(run.id, cluster_id, limit=50)]
    if not seeds:
        raise click.UsageError("give image references or --cluster")
    svc = wiring.search_service(settings, store, wiring.open_index(store, settings), None)
    if min_similarity is None:
        min_similarity = svc.suggest_sweep_threshold(seeds)
        if not as_json:
            click.echo(f"similarity ≥ {min_similarity:.2f} (suggested from the seeds; --min-similarity to change)")
    hits = svc.sweep(seeds, min_similarity=min_similarity, limit=limit)
    AuditLog(store.catalog.engine).record(os_user(), "sweep", f"cluster:{cluster_id}" if cluster_id else "images",
                                          seeds=seeds, min_similarity=min_similarity, found=len(hits))
    if as_json:
        from search.serialize import image_json
        click.echo(json.dumps([{**image_json(h.record), "similarity": round(h.similarity, 6), "seed": h.seed}
                               for h in hits], indent=2))
        return
    click.echo(f"{len(hits)} unflagged image(s) with similarity >= {min_similarity} to {len(seeds)} seed(s)")
    for h in hits:
        click.echo(f"  {h.record.id:>8} {h.similarity:6.3f}  near {h.seed:<8} "
                   f"{h.record.paths[0] if h.record.paths else ''}")


main.command("flag", cls=SettingsCommand, help="Flag images by id, sha256 or external id.")(_flag_command(True))
main.command("unflag", cls=SettingsCommand, help="Unflag images by id, sha256 or external id.")(_flag_command(False))


@main.command(cls=SettingsCommand)
@click.argument("refs", nargs=-1)
@with_settings("model", "search")
def regions(refs: tuple[str, ...], settings: Settings) -> None:
    """Give flagged images their region vectors (9 windows of the stored thumbnail, through which a heavy crop
    or one cell of a collage finds the flagged picture) and drop those of images no longer flagged. Nine model
    passes per newly flagged image: run it after an ingest or a review session, or from cron (servers pick the
    file up; until then a newly flagged image is searched whole). With REFS (ids, sha256 or external ids), only
    those images get theirs."""
    from indexer.vectors.regions import load_rows, update_regions
    store = wiring.open_store(settings)
    embedder = wiring.load_embedder(settings, store)
    t = time.perf_counter()
    with job(settings, "regions") as figures:
        only = [store.catalog.resolve(r) for r in refs] if refs else None
        added, dropped = update_regions(store, embedder, only)
        rows = load_rows(store.index_dir)
        held = 0 if rows is None else len(rows.ids)
        figures.update({"added": added, "dropped": dropped, "rows": held})
    click.echo(f"region vectors: {added} flagged images added, {dropped} dropped; {held} windows held; "
               f"{time.perf_counter() - t:.1f} s")


@main.command(cls=SettingsCommand)
@click.option("--scope", type=click.Choice(["all", "flagged"]), default=None, help="one scope (default: both)")
@click.option("--ray", "ray_address", default="", metavar="ADDRESS",
              help="fill IVF-PQ indexes in shards on this Ray cluster ('auto': the one on this host) and serve "
                   "them memory-mapped")
@click.option("--on-disk", is_flag=True, help="fill IVF-PQ indexes in shards here and serve them memory-mapped "
                                              "(an index larger than RAM)")
@with_settings("model", "index")
def reindex(scope: str | None, ray_address: str, on_disk: bool, settings: Settings) -> None:
    """Refit the matching space, retrain and rebuild the vector indexes from the raw vectors (servers
    pick the new ones up); with --scope, rebuild that index alone in the current space."""
    import time
    store = wiring.open_store(settings)
    # the model teaches the matching space which feature directions re-upload edits move along
    embedder = wiring.load_embedder(settings, store) if scope is None and settings.space_dim > 0 else None
    index = wiring.open_index(store, settings, embedder, for_rebuild=True)
    t = time.perf_counter()
    shards = None
    if ray_address:
        from indexer.ingest.ray import shard_runner
        shards = shard_runner(ray_address, store, wiring.store_catalog_url(settings))
    elif on_disk:
        from indexer.vectors.sharded import local_runner
        shards = local_runner(index.vectors)
    stages = Stages()
    with job(settings, "reindex", key="scope") as figures:
        stages("vector indexes", 0, 1)
        index.rebuild(scope, refit=scope is None, shards=shards)  # one scope alone keeps the space the other shares
        index.save()
        stages("vector indexes", 1, 1)
        stages("PDQ indexes", 0, 1)
        matcher = wiring.hash_matcher(settings, store)
        matcher.rebuild()  # the PDQ indexes drop deleted images and bank entries
        stages("PDQ indexes", 1, 1)
        stages.close()
        figures["vectors"] = {sc: st["vectors"] for sc, st in index.stats().items()}
    for sc, st in index.stats().items():
        recall = f", recall@10 {st['recall_at_10']:.3f}" if st["recall_at_10"] is not None else ""
        disk = f", memory-mapped lists {st['on_disk']['lists']}" if st["on_disk"] else ""
        click.echo(f"{sc:<8} {st['factory']:<28} {st['vectors']} vectors, generation {st['generation']}{recall}{disk}")
    click.echo(f"matching space: {index.space.summary()}")
    hs = matcher.stats()
    click.echo(f"PDQ indexes: {hs['pdq_images']} image hashes, {hs['pdq_banked']} banked hashes")
    click.echo(f"rebuilt in {time.perf_counter() - t:.1f} s")


@main.command(cls=SettingsCommand)
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--id", "ids", multiple=True, help="search by a stored image (id, sha256 or external id); repeatable")
@click.option("--scope", type=click.Choice(["flagged", "all"]), default="flagged", show_default=True)
@click.option("-k", "k", default=10, show_default=True, help="neighbours per query")
@click.option("--min-similarity", default=-1.0, show_default=True, type=float)
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@with_settings("model", "decode", "search")
def search(images: tuple[Path, ...], ids: tuple[str, ...], scope: str, k: int, min_similarity: float,
           as_json: bool, settings: Settings) -> None:
    """Nearest flagged images and videos (or --scope all) for image or video files, or stored items."""
    from search.service import SearchParams
    if not images and not ids:
        raise click.UsageError("give image files or --id")
    store = wiring.open_store(settings)
    index = wiring.open_index(store, settings)
    embedder = wiring.load_embedder(settings, store) if images else None
    svc = wiring.search_service(settings, store, index, embedder)
    params = SearchParams(k=k, scope=scope, min_similarity=min_similarity)
    responses = []
    if images:
        uploads = []
        for p in images:
            try:
                uploads.append((str(p), p.read_bytes()))
            except OSError as exc:
                raise click.ClickException(f"{p}: {exc.strerror}") from None
        responses.append(svc.search_uploads(uploads, params))
    if ids:
        responses.append(svc.search_ids([store.catalog.resolve(r) for r in ids], params))
    if as_json:
        from search.serialize import response_json
        out = [response_json(r) for r in responses]
        click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return
    for resp in responses:
        for r in resp.results:
            q = r.query
            known = f", already known as #{q.known_id}" if q.known_id else ""
            pu = "" if q.p_unsafe is None else f"P(unsafe) {q.p_unsafe:.3f}"
            clip = f" (video, {q.keyframes} keyframes)" if q.kind == "video" else ""
            click.echo(f"{q.label}{clip}: {pu}{known} — {len(r.hits)} {scope} neighbour(s)")
            if r.hits:
                click.echo(f"  {'#':>3} {'id':>8} {'sim':>6} {'P(uns)':>6}  {'flag':<18} {'cluster':<10} path")
            for i, h in enumerate(r.hits, 1):
                rec = h.record
                flag = f"{rec.flag_source}{':' + rec.flag_label if rec.flag_label else ''}" if rec.flagged else "-"
                cl = str(h.cluster.get("id")) if h.cluster else "-"
                click.echo(f"  {i:>3} {rec.id:>8} {h.similarity:>6.3f} {rec.p_unsafe:>6.3f}  {flag[:18]:<18} "
                           f"{cl:<10} {rec.paths[0] if rec.paths else ''}")
                if h.frames:  # a stored video: where in it, and which of the query's frames
                    click.echo("        frames: " + ", ".join(
                        f"{f.offset:g}s ≈ {'query ' + format(f.query_offset, 'g') + 's' if f.query_offset is not None else 'the image'} "
                        f"({f.similarity:.3f})" for f in h.frames[:3]))
            if r.evidence is not None:
                _print_evidence(r.evidence)


def _print_evidence(ev: Any) -> None:
    """A query's hashes, the banks they matched and the stored images that share them."""
    pdq = ev.signals.pdq
    own = (f"pdq {pdq.hash[:16]}… quality {pdq.quality}{'' if pdq.usable else ' (too low to match)'}"
           if pdq else "no pdq")
    click.echo(f"  hashes: {own}, md5 {ev.signals.md5 or '-'}")
    for m in ev.bank_matches:
        how = f"distance {m.distance} ≤ {m.threshold}" if m.signal_type == "pdq" else "same bytes"
        state = "SUPPRESSED" if ev.negative_matches else "BANK MATCH"
        click.echo(f"  {state}: bank {m.bank} entry {m.entry_id}{f' ({m.external_id})' if m.external_id else ''}"
                   f" — {m.signal_type}, {how}{' · ' + ' '.join(m.tags) if m.tags else ''}")
    for m in ev.negative_matches:
        click.echo(f"  negative bank {m.bank} entry {m.entry_id} matched ({m.signal_type}, distance {m.distance}):"
                   f" the content is known to be benign")
    if not ev.bank_matches and not ev.negative_matches:
        click.echo("  no bank matched")
    for m in ev.image_matches:
        click.echo(f"  same {m.signal_type}: #{m.record.id} distance {m.distance}"
                   f"{' flagged' if m.record.flagged else ''}")


@main.command(cls=SettingsCommand)
@with_settings("model", "decode", "index", "search", "server")
def serve(settings: Settings) -> None:
    """Serve the JSON API and the viewer on a production WSGI server (gunicorn)."""
    import logging

    from flagmatch import logs
    from flagmatch.serve import serve as run_server
    logs.configure(settings.log_format)  # every line the server writes in one format, these two included
    log = logging.getLogger("flagmatch.serve")
    if not settings.api_tokens and not settings.open_reads:
        log.warning("no --api-tokens set: every request will be refused (401)")
    log.info("flagmatch on http://%s:%d  (%d worker(s) × %d threads)", settings.host, settings.port,
             settings.workers, settings.threads)
    run_server(settings)


def parse_since(text: str | None):  # type: ignore[no-untyped-def]
    """'7d', '24h', '90m' or an ISO date/time (UTC) → a naive UTC datetime."""
    import datetime as dt
    import re
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", text)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    if m:
        n, unit = int(m.group(1)), m.group(2)
        unit_name = {"d": "days", "h": "hours", "m": "minutes"}[unit]
        return now - dt.timedelta(**{unit_name: n})
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=None)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use 7d, 24h, 90m or an ISO date") from None


@main.command(cls=SettingsCommand)
@click.option("--since", default=None, help="only images flagged recently: 7d, 24h, 90m or an ISO date")
@click.option("--assign-new", is_flag=True, help="only place images flagged since the last run into its clusters")
@with_settings("cluster")
def cluster(since: str | None, assign_new: bool, settings: Settings) -> None:
    """Group flagged images into reviewable clusters (UMAP + HDBSCAN); prints what changed."""
    import time

    from clustering.job import assign_new as run_assign
    from clustering.job import run_clustering
    from indexer.storage.clusters import ClusterStore
    store = wiring.open_store(settings)
    cstore = ClusterStore(store)
    started = time.perf_counter()

    def progress(phase: str, message: str) -> None:
        click.echo(f"[{time.perf_counter() - started:7.1f}s] {phase:<8} {message}", err=True)

    if assign_new:
        with job(settings, "cluster_assign") as figures:
            n = run_assign(store, cstore, progress)
            figures["images_placed"] = n
        click.echo(f"placed {n} newly flagged image(s) (provisional until the next full run)")
        return
    with job(settings, "cluster", key="stage") as figures:
        report = run_clustering(store, cstore, wiring.cluster_params(settings), since=parse_since(since),
                                progress=progress)
        figures.update(images=report.run.n_images, clusters=report.clusters, noise=report.noise,
                       stage_seconds=dict(report.timings))
    run = report.run
    click.echo(f"run {run.id}: {run.n_images:,} flagged images → {report.clusters} clusters, "
               f"{report.noise:,} unclustered" + (f" (flagged since {run.since:%Y-%m-%d %H:%M})" if run.since else ""))
    click.echo("  " + "  ".join(f"{k} {v}" for k, v in report.summary.items()))
    click.echo("  time: " + "  ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))
    _print_clusters(cstore, run.id, limit=20)


def _print_clusters(cstore, run_id: int, limit: int | None = None) -> None:  # type: ignore[no-untyped-def]
    rows = cstore.clusters(run_id)
    click.echo(f"  {'id':>6} {'size':>7} {'change':<8} {'status':<11} {'name':<24} exemplars")
    for c in rows[:limit]:
        growth = f"{c.change}" + (f" ({c.size - c.prev_size:+d})" if c.prev_size is not None else "")
        click.echo(f"  {c.id:>6} {c.size:>7} {growth:<8} {c.status:<11} {(c.name or c.label or '-')[:24]:<24} "
                   f"{', '.join(map(str, c.exemplars))}")
    if limit is not None and len(rows) > limit:
        click.echo(f"  … {len(rows) - limit} more: `flagmatch clusters` lists them all")


@main.command(cls=SettingsCommand)
@click.option("--run", "run_id", type=int, default=None, help="a run id (default: the current run)")
@with_settings()
def clusters(run_id: int | None, settings: Settings) -> None:
    """List a clustering run's clusters: id, name, size, growth, exemplars."""
    from indexer.storage.clusters import ClusterStore
    cstore = ClusterStore(wiring.open_store(settings))
    run = cstore.run(run_id) if run_id else cstore.current_run()
    if run is None:
        raise click.ClickException("no clustering run yet: flagmatch cluster")
    click.echo(f"run {run.id} ({run.status}, {run.finished_at or run.started_at:%Y-%m-%d %H:%M}): "
               f"{run.n_images:,} images, {run.n_clusters} clusters, {run.n_noise:,} unclustered")
    _print_clusters(cstore, run.id)


@main.command("export-onnx", cls=SettingsCommand)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@with_settings("model")
def export_onnx_cmd(out: Path, settings: Settings) -> None:
    """Write the timm model as ONNX (outputs: embedding, p_unsafe) for the onnx backend."""
    from indexer.models.embed import TimmEmbedder, export_onnx
    embedder = wiring.load_embedder(settings.replace(precision="fp32"), wiring.open_store(settings))
    if not isinstance(embedder, TimmEmbedder):
        raise click.ClickException("export-onnx needs a timm model (--model DIR or a hub id)")
    export_onnx(embedder, out)
    click.echo(f"wrote {out} ({embedder.info.model_id}, {embedder.info.dim}-d); use it with --model {out}")


@main.command("sample-images")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--pictures", default=40, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--copies", default=3, show_default=True, type=click.IntRange(2, 20), help="re-uploads of each picture")
def sample_images(out: Path, pictures: int, copies: int) -> None:
    """Write sample pictures and re-uploads of them to OUT (nothing is downloaded): OUT/flagged.csv flags the
    pictures and all but one re-upload of each; OUT/uploads holds the one left, to search with."""
    from flagmatch.samples import write_samples
    manifest, uploads = write_samples(out, pictures, copies)
    click.echo(f"wrote {manifest} ({pictures * copies} flagged images) and {uploads} ({pictures} queries)")


if __name__ == "__main__":  # python -m flagmatch.cli: run the imported module's group, which has every command
    from flagmatch.cli import main as _main
    _main()
