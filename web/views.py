"""The viewer: server-rendered pages for moderators (clusters, a cluster, the map, an image, search)
and the actions they take (name/label/confirm a cluster, unflag false positives, sweep the corpus
and flag what they pick). Thumbnails are blurred unless revealed one at a time (or blur is turned
off for the session); every reveal and decision goes to the append-only audit log."""
from __future__ import annotations

import json
import secrets
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

from markupsafe import Markup
from flask import (Blueprint, Response, abort, current_app, flash, g, jsonify, redirect, render_template, request,
                   session, url_for)

from indexer.review.actions import change_flags, delete_images, record_verdict, set_flags, undo_flags
from indexer.review.banks import update_bank
from indexer.review.clusters import (Decision, decide_cluster, name_cluster as name_cluster_as, next_unreviewed,
                                     undo_decision)
from indexer.hashbanks.banks import Banks
from indexer.media.decode import DEFAULT_LIMITS
from indexer.storage.audit import parse_query
from indexer.errors import FlagmatchError, InvalidInputError, NotFoundError
from search.edge import Runtime, http_status
from search.auth import csrf_ok, session_actor
from search.service import SearchParams
from web.mapdata import encode_points


bp = Blueprint("viewer", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")
PAGE = 60    # members per cluster page
CARDS = 120  # cluster cards per clusters page
OUTLIER_CUT = 0.8
PUBLIC = ("viewer.login", "viewer.static")


# ------------------------------------------------------------------ plumbing

def rt() -> Runtime:
    return current_app.extensions["flagmatch"]  # type: ignore[no-any-return]


def actor() -> str:
    return str(session_actor())


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


@bp.app_context_processor
def _context() -> dict[str, Any]:
    if request.blueprint not in ("viewer", None):  # (None: an error page of the app's, styled as the viewer's)
        return {}
    settings = rt().settings
    signed_in = session_actor()
    pending = session.pop("pending", None) if signed_in and request.method == "GET" else None
    return {"csrf_token": csrf_token(), "actor": signed_in, "blur": session.get("blur", True),
            "grey": session.get("grey", False), "review_labels": settings.review_labels,
            "review_reasons": settings.review_reasons, "pending": pending,
            "blur_strength": session.get("blur_strength", settings.blur_strength)}


# How alike two images are, in words a reviewer reads (cosine in the matching space; the number on hover).
LIKENESS = ((0.85, "near-identical"), (0.6, "similar"), (0.35, "loosely similar"), (-1.0, "unlike"))


@bp.app_template_filter("likeness")
def likeness(similarity: float) -> Markup:
    word = next(w for lo, w in LIKENESS if similarity >= lo)
    return Markup('<span class="likeness" title="cosine similarity {:.3f} in the matching space">{} · {:.2f}</span>'
                  ).format(similarity, word, similarity)


@bp.app_template_filter("vpdq_frames")
def vpdq_frames(vpdq: str) -> int:
    """How many frame hashes a vPDQ holds (threatexchange's JSON list)."""
    try:
        return len(json.loads(vpdq))
    except ValueError:
        return 0


def _space_note() -> str | None:
    """Said beside similarities while the store is too small for a fitted matching space: raw model features
    put unrelated images close, so the words above overstate how alike they are."""
    index = rt().index
    if index is None or not index.space.is_identity or index.space_cfg.dim <= 0:
        return None
    return (f"The store holds fewer than {index.space_cfg.min_vectors:,} images, so its matching space is not fitted "
            f"yet: similarities are the model's raw features, where unrelated images also score high.")


@bp.before_request
def _guard() -> Response | None:
    if request.endpoint in PUBLIC:
        return None
    if session_actor() is None:
        if request.method == "GET":
            return redirect(url_for("viewer.login", next=request.full_path.rstrip("?")))
        if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            # a form sent after the session ended, in place or not: keep what was typed, sign in, fill it in again
            back = (_local(request.form.get("return_to")) or _local(request.referrer) or _local(request.form.get("next"))
                    or url_for("viewer.clusters"))
            fields = {k: v[:2000] for k, v in request.form.items() if k not in ("csrf", "request_id", "return_to")}
            session.clear()  # (the cookie keeps what was typed, signed, until the form is filled in again)
            if len(str(fields)) < 3000:
                session["pending"] = {"action": request.path, "fields": fields,
                                      "ids": request.form.getlist("ids")[:200]}
            flash("Your session had ended. Sign in again: the form you were sending will be filled in as it was.")
            login = url_for("viewer.login", next=back)
            if _wants_json():  # an in-place form: the page goes to sign-in itself
                return jsonify({"error": {"code": "signed_out", "message": "Your session has ended: sign in again.",
                                          "login_url": login}}), 401
            return redirect(login, code=303)
        abort(401)
    if request.method == "POST":
        csrf_token()  # a session without one yet gets one (and this request fails the check)
        if not csrf_ok(request.form.get("csrf") or request.headers.get("X-CSRF-Token")):
            abort(403, "missing or wrong CSRF token")
    return None


@bp.errorhandler(FlagmatchError)
def _domain_error(exc: FlagmatchError) -> Any:
    """A page that fails says why; a form that fails goes back to its page with the message (what was
    chosen there is still in the browser), or answers JSON to the page's in-place requests."""
    g.action_failed = True  # its request id may be sent again
    if request.method == "POST" and _wants_json():
        return jsonify({"error": {"code": exc.code, "message": exc.message}}), http_status(exc)
    back = _local(request.referrer)
    if request.method == "POST" and back is not None and http_status(exc) < 500:
        flash(exc.message)
        return redirect(back, code=303)
    return render_template("error.html", status=http_status(exc), code=exc.code, message=exc.message,
                           back=back), http_status(exc)


def _wants_json() -> bool:
    return request.headers.get("X-Requested-With") == "fetch"


def _ids(values: list[str]) -> list[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if part:
                if not part.isdigit():
                    raise InvalidInputError(f"not an image id: {part[:40]!r}", code="bad_parameter")
                out.append(int(part))
    return list(dict.fromkeys(out))


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name, "")
    try:
        v = int(raw) if raw else default
    except ValueError:
        raise InvalidInputError(f"{name} must be a whole number", code="bad_parameter") from None
    return max(lo, min(hi, v))


def _float_arg(source: Any, name: str, default: float, lo: float, hi: float) -> float:
    raw = source.get(name, "")
    try:
        v = float(raw) if raw != "" else default
    except ValueError:
        raise InvalidInputError(f"{name} must be a number", code="bad_parameter") from None
    if not lo <= v <= hi:
        raise InvalidInputError(f"{name} must be between {lo} and {hi}", code="bad_parameter")
    return v


def _current_run() -> Any:
    """The current clustering run, or a 404 when the job has never finished."""
    run = rt().clusters.current_run()
    if run is None:
        raise NotFoundError("no clustering run yet: run `flagmatch cluster`")
    return run


def _local(url: str | None) -> str | None:
    """``url`` as a path on this server (a referrer or a ``next`` field), or None when it points elsewhere."""
    if not url:
        return None
    u = urlparse(url)
    if u.netloc and u.netloc != request.host:
        return None
    path = u.path + (f"?{u.query}" if u.query else "")
    return path if path.startswith("/") and not path.startswith("//") else None


def _safe_next(default: str) -> str:
    nxt = request.form.get("next") or request.args.get("next") or default
    u = urlparse(nxt)
    return nxt if nxt.startswith("/") and not nxt.startswith("//") and not u.netloc and not u.scheme else default


# ------------------------------------------------------------------ login

@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    if request.method == "POST":
        csrf_token()
        if not csrf_ok(request.form.get("csrf")):
            abort(403, "missing or wrong CSRF token")
        found = rt().tokens.match(request.form.get("token", "").strip())
        if found is not None:
            name, token_fingerprint = found
            nxt = _safe_next(url_for("viewer.clusters"))
            pending = session.get("pending")  # a form the ended session was sending: filled in again on `nxt`
            session.clear()
            if pending:
                session["pending"] = pending
            session["sid"] = rt().sessions.open(name, token_fingerprint)
            session["csrf"], session["blur"] = secrets.token_urlsafe(32), True
            rt().audit.record(name, "login", "viewer")
            return redirect(nxt)
        error = "That token is not valid."
    return render_template("login.html", error=error, next=_safe_next("")), (401 if error else 200)


@bp.post("/logout")
def logout() -> Response:
    rt().audit.record(actor(), "logout", "viewer")
    rt().sessions.end(session.get("sid"), "signed out")
    session.clear()
    return redirect(url_for("viewer.login"))


@bp.post("/preferences")
def preferences() -> Response:
    """Blur on/off (and greyscale) for this session; recorded in the audit log."""
    audit = rt().audit
    if "blur" in request.form:
        session["blur"] = request.form["blur"] == "on"
        audit.record(actor(), "blur_on" if session["blur"] else "blur_off", "session")
    if "grey" in request.form:
        session["grey"] = request.form["grey"] == "on"
    if "blur_strength" in request.form:
        from search.thumbnails import BLUR_STRENGTHS
        strength = request.form["blur_strength"]
        if strength not in BLUR_STRENGTHS:
            raise InvalidInputError(f"blur strength is one of {', '.join(BLUR_STRENGTHS)}", code="bad_parameter")
        if strength != session.get("blur_strength", rt().settings.blur_strength):
            audit.record(actor(), "blur_strength", "session", strength=strength)
        session["blur_strength"] = strength
    if _wants_json():  # toggled in place: the page (search results, a posted selection) stays
        return jsonify({"blur": session.get("blur", True), "grey": session.get("grey", False),
                        "blur_strength": session.get("blur_strength", rt().settings.blur_strength)})
    return redirect(_safe_next(url_for("viewer.clusters")))


# ------------------------------------------------------------------ thumbnails

@bp.post("/images/<int:image_id>/reveal")
def reveal(image_id: int) -> Response:
    rt().store.catalog.get(image_id)
    rt().audit.record(actor(), "reveal", f"image:{image_id}")
    return jsonify({"url": url_for("api.thumbnail", image_id=image_id, clear=1)})


@bp.post("/images/<int:image_id>/keyframes/<int:keyframe_id>/reveal")
def reveal_keyframe(image_id: int, keyframe_id: int) -> Response:
    """A video keyframe revealed as an image is: one at a time, recorded."""
    rt().store.catalog.keyframe(image_id, keyframe_id)
    rt().audit.record(actor(), "reveal", f"keyframe:{keyframe_id}", image_id=image_id)
    return jsonify({"url": url_for("api.keyframe_thumbnail", image_id=image_id, keyframe_id=keyframe_id, clear=1)})


# ------------------------------------------------------------------ clusters

@bp.get("/")
def index() -> Response:
    return redirect(url_for("viewer.clusters"))


@bp.get("/clusters")
def clusters() -> str:
    cstore = rt().clusters
    run = cstore.current_run()
    sort = request.args.get("sort", "size")
    status = request.args.get("status", "")
    if sort not in ("size", "growth", "newest"):
        raise InvalidInputError("sort must be size, growth or newest", code="bad_parameter")
    if status not in ("", "unreviewed", "confirmed", "dismissed"):
        raise InvalidInputError("status must be unreviewed, confirmed or dismissed", code="bad_parameter")
    page = _int_arg("page", 1, 1, 10**6)
    cards, noise, total = [], 0, 0
    if run is not None:
        cards = cstore.clusters(run.id)
        if status:
            cards = [c for c in cards if c.status == status]
        if sort == "growth":
            cards.sort(key=lambda c: -(c.size - (c.prev_size or 0)))
        elif sort == "newest":
            cards.sort(key=lambda c: -c.id)
        total = len(cards)
        cards = cards[(page - 1) * CARDS:page * CARDS]
        noise = cstore.count_members(run.id, None)
    return render_template("clusters.html", run=run, cards=cards, noise=noise, sort=sort, status=status,
                           page=page, pages=max(1, -(-total // CARDS)), total=total)


@bp.get("/clusters/next")
def next_cluster() -> Response:
    """The next unreviewed cluster of the current run, largest first (after ``after``, wrapping round)."""
    _current_run()
    after = request.args.get("after", "")
    nxt = next_unreviewed(rt().clusters, int(after) if after.isdigit() else None)
    if nxt is None:
        flash("No unreviewed cluster left.")
        return redirect(url_for("viewer.clusters"))
    return redirect(url_for("viewer.cluster", cluster_id=nxt))


MEMBER_SORTS = ("membership", "copies", "p_unsafe", "newest")


def _member_page(run_id: int, cluster_id: int | None) -> dict[str, Any]:
    cstore = rt().clusters
    page = _int_arg("page", 1, 1, 10**6)
    sort = request.args.get("sort", "membership")
    if sort not in MEMBER_SORTS:
        raise InvalidInputError(f"sort must be one of {', '.join(MEMBER_SORTS)}", code="bad_parameter")
    kind = None if cluster_id is None else False
    families = {} if cluster_id is None else cstore.family_sizes(run_id, cluster_id)
    if sort == "membership":  # the store's own order, paged in SQL
        members = cstore.members(run_id, cluster_id, offset=(page - 1) * PAGE, limit=PAGE, outliers=kind,
                                 outlier_cut=OUTLIER_CUT)
    elif sort == "copies":  # copies of one picture together, the largest family first, then the rest
        every = cstore.members(run_id, cluster_id, outliers=kind, outlier_cut=OUTLIER_CUT)
        every.sort(key=lambda m: (m.family is None, -families.get(m.family, 0) if m.family is not None else 0,
                                  m.family or 0))  # stable: by membership within a family
        members = every[(page - 1) * PAGE:page * PAGE]
    else:  # every member's facts, sorted, then the page
        every = cstore.members(run_id, cluster_id, outliers=kind, outlier_cut=OUTLIER_CUT)
        facts = rt().store.catalog.get_many([m.image_id for m in every])
        key = (lambda m: -facts[m.image_id].p_unsafe) if sort == "p_unsafe" else \
            (lambda m: -facts[m.image_id].created_at.timestamp())
        every = sorted((m for m in every if m.image_id in facts), key=key)
        members = every[(page - 1) * PAGE:page * PAGE]
    outliers = [] if cluster_id is None else cstore.members(run_id, cluster_id, outliers=True,
                                                            outlier_cut=OUTLIER_CUT, limit=PAGE)
    total = cstore.count_members(run_id, cluster_id)
    recs = rt().store.catalog.get_many([m.image_id for m in members + outliers])
    return {"members": [(m, recs.get(m.image_id)) for m in members],
            "outliers": [(m, recs.get(m.image_id)) for m in outliers],
            "page": page, "pages": max(1, -(-total // PAGE)), "total": total, "sort": sort, "families": families}


@bp.get("/clusters/<int:cluster_id>/ids")
def cluster_ids(cluster_id: int) -> Response:
    """Every member's id (outliers included): what "select all N" selects across pages."""
    run = _current_run()
    return jsonify({"ids": [m.image_id for m in rt().clusters.members(run.id, cluster_id)]})


@bp.get("/clusters/<int:cluster_id>")
def cluster(cluster_id: int) -> str:
    r = rt()
    cstore, audit = r.clusters, r.audit
    run = _current_run()
    info = cstore.cluster(run.id, cluster_id)
    return render_template("cluster.html", run=run, cluster=info, history=audit.events(20, f"cluster:{cluster_id}"),
                           **_member_page(run.id, cluster_id))


@bp.get("/clusters/unclustered")
def unclustered() -> str:
    run = _current_run()
    return render_template("cluster.html", run=run, cluster=None, history=[], **_member_page(run.id, None))


@bp.post("/clusters/<int:cluster_id>/name")
def name_cluster(cluster_id: int) -> Response:
    r = rt()
    cstore, audit = r.clusters, r.audit
    name, label = request.form.get("name", ""), request.form.get("label", "")
    name_cluster_as(r.store, cstore, audit, cluster_id, actor=actor(), name=name, label=label)
    flash(f"Cluster {cluster_id} named.")
    return redirect(url_for("viewer.cluster", cluster_id=cluster_id))


@bp.post("/clusters/<int:cluster_id>/decision")
def decide(cluster_id: int) -> Response:
    """The decision bar: name, policy label, confirm or dismiss, reason code and note in one submit;
    ``next=1`` goes on to the next unreviewed cluster."""
    r = rt()
    label = request.form.get("label") or None
    result = decide_cluster(r.store, r.index, r.audit, r.clusters, cluster_id, Decision(
        status=request.form.get("status", ""), reason_code=request.form.get("reason_code", ""),
        name=request.form.get("name"), label=label, note=request.form.get("note")),
        actor=actor(), labels=r.settings.review_labels, reasons=r.settings.review_reasons)
    done = f"Cluster {cluster_id} {result.cluster.status}"
    message = done + (f"; {len(result.unflagged)} image(s) unflagged." if result.unflagged else ".") + \
        " Undo is on the cluster's page."
    if _wants_json():  # the decision bar, in place
        nxt = result.next_unreviewed
        if request.form.get("next") == "1" and nxt is not None:
            flash(f"Previous decision saved: {message}")  # shown on the next cluster's page
        return jsonify({"message": message, "status": result.cluster.status, "name": result.cluster.name,
                        "label": result.cluster.label, "reviewed_by": result.cluster.reviewed_by,
                        "unflagged": sorted(result.unflagged),
                        "next_url": url_for("viewer.cluster", cluster_id=nxt) if nxt is not None else None})
    flash(message)
    if request.form.get("next") == "1":
        if result.next_unreviewed is None:
            flash("No unreviewed cluster left.")
            return redirect(url_for("viewer.clusters"))
        return redirect(url_for("viewer.cluster", cluster_id=result.next_unreviewed))
    return redirect(url_for("viewer.cluster", cluster_id=cluster_id))


@bp.post("/clusters/<int:cluster_id>/undo")
def undo(cluster_id: int) -> Response:
    r = rt()
    info = undo_decision(r.store, r.index, r.audit, r.clusters, cluster_id, actor=actor())
    message = f"Cluster {cluster_id}: decision undone (now {info.status})."
    if _wants_json():  # the undo button beside the decision bar, in place
        return jsonify({"message": message, "status": info.status, "name": info.name, "label": info.label,
                        "reviewed_by": info.reviewed_by})
    flash(message)
    return redirect(url_for("viewer.cluster", cluster_id=cluster_id))


def _set_flags(flag: bool) -> Response:
    r = rt()
    ids = _ids(request.form.getlist("ids"))
    if not ids:
        raise InvalidInputError("select at least one image", code="bad_parameter")
    reason = (request.form.get("reason") or "").strip() or None
    label = (request.form.get("label") or "").strip() or None
    change = change_flags(r.store, r.index, rt().audit, ids, flag=flag, actor=actor(), source="review",
                          via="viewer", reason=reason, label=label, queue_similarity=r.settings.queue_similarity)
    changed = change.changed
    if _wants_json():
        return jsonify({"changed": sorted(changed), "flagged": flag, "audit_id": change.audit_id,
                        "undo_url": url_for("viewer.undo_flag_change", audit_id=change.audit_id)
                        if change.audit_id else None,
                        "message": f"{'Flagged' if flag else 'Unflagged'} {len(changed)} image(s)." if changed else
                        f"Nothing changed: the image(s) were already {'flagged' if flag else 'unflagged'}."})
    if changed:
        flash(f"{'Flagged' if flag else 'Unflagged'} {len(changed)} image(s).")
    else:
        flash(f"Nothing changed: the image(s) were already {'flagged' if flag else 'unflagged'}.")
    return redirect(_safe_next(url_for("viewer.clusters")))


@bp.post("/images/undo/<int:audit_id>")
def undo_flag_change(audit_id: int) -> Response:
    """Undo a flag or unflag taken a moment ago (the toast after every bulk change): as ``undo_flags``."""
    r = rt()
    change = undo_flags(r.store, r.index, r.audit, audit_id, actor=actor())
    flag_now = bool(change.changed) and r.store.catalog.get(change.changed[0]).flagged
    message = f"Undone: {len(change.changed)} image(s) {'flagged' if flag_now else 'unflagged'} again."
    if _wants_json():
        return jsonify({"changed": sorted(change.changed), "flagged": flag_now, "message": message})
    flash(message)
    return redirect(_safe_next(url_for("viewer.clusters")))


@bp.post("/images/unflag")
def unflag_images() -> Response:
    return _set_flags(False)


@bp.post("/images/flag")
def flag_images() -> Response:
    return _set_flags(True)


@bp.get("/clusters/<int:cluster_id>/sweep")
def sweep(cluster_id: int) -> str:
    """Unflagged images anywhere in the corpus near this cluster's most central members (a read: loading
    the page records nothing; what is flagged from it is audited)."""
    r = rt()
    cstore = r.clusters
    run = _current_run()
    if r.index is None:
        raise NotFoundError("the index is still loading")
    info = cstore.cluster(run.id, cluster_id)
    seeds = [m.image_id for m in cstore.members(run.id, cluster_id, limit=50)]
    every = r.service.sweep(seeds, min_similarity=-1.0, per_seed=30, limit=500)
    suggested = r.service.sweep_threshold(seeds, [h.similarity for h in every])
    min_sim = _float_arg(request.args, "min_similarity", suggested, -1.0, 1.0)
    found = [(h.similarity, h.seed, h.record) for h in every if h.similarity >= min_sim]
    # how the nearest unflagged images spread: one bar per 0.05 of similarity from the best one found down to
    # the worst, each scaled to its count (a <meter>: the page's CSP allows no inline style)
    edges = [round(1.0 - 0.05 * i, 2) for i in range(41)]
    bins = [(lo, hi, sum(lo <= h.similarity < hi or (hi == 1.0 and h.similarity >= 1.0)
                         or (lo == -1.0 and h.similarity < lo) for h in every))
            for hi, lo in zip(edges, edges[1:])]
    used = [i for i, b in enumerate(bins) if b[2]]
    bins = bins[used[0]:used[-1] + 1] if used else []
    exemplars = info.exemplars[:6]
    return render_template("sweep.html", cluster=info, found=found, min_similarity=min_sim, suggested=suggested,
                           bins=bins, most=max((b[2] for b in bins), default=1), scanned=len(every),
                           exemplars=exemplars)


# ------------------------------------------------------------------ map

@bp.get("/map")
def map_page() -> str:
    run = rt().clusters.current_run()
    return render_template("map.html", run=run)


@lru_cache(maxsize=4)
def _map_blob(run_id: int, version: int, db_key: str) -> bytes:
    return encode_points(*rt().clusters.map_points(run_id))


@bp.get("/map/data")
def map_data() -> Response:
    """The current run's points (``web.mapdata``)."""
    cstore = rt().clusters
    run = _current_run()
    version = cstore.count_members(run.id, None)  # provisional placements change the blob
    data = _map_blob(run.id, version, str(rt().store.catalog.engine.url))
    resp = Response(data, mimetype="application/octet-stream")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/map/attrs")
def map_attrs() -> Response:
    """Per point of ``/map/data`` (same order): uint8 P(unsafe)×255, then uint8 flag state now (1 flagged,
    0 not, 2 deleted) — what the map colours by besides the cluster."""
    import numpy as np
    run = _current_run()
    ids = rt().clusters.map_points(run.id)[0]
    facts = rt().store.catalog.point_facts(ids)  # (p_unsafe, flagged, deleted), one light query per chunk
    p = np.array([round(facts[i][0] * 255) if i in facts else 0 for i in ids], np.uint8)
    f = np.array([2 if i not in facts or facts[i][2] else int(facts[i][1]) for i in ids], np.uint8)
    resp = Response(p.tobytes() + f.tobytes(), mimetype="application/octet-stream")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/map/legend")
def map_legend() -> Response:
    """The run's clusters (id, name, review status, size) for the map's legend and its review colouring."""
    run = _current_run()
    return jsonify({"run": run.id, "clusters": [{"id": c.id, "name": c.name, "status": c.status, "size": c.size}
                                                for c in rt().clusters.clusters(run.id)]})


@bp.route("/selection", methods=["GET", "POST"])
def selection() -> str:
    ids = _ids(request.form.getlist("ids") if request.method == "POST" else request.args.getlist("ids"))[:5000]
    recs = rt().store.catalog.get_many(ids)
    lookup = rt().clusters.lookup(ids)
    items = [(recs[i], lookup.get(i)) for i in ids if i in recs]
    clusters = sorted({str(c["id"]) if c and c.get("id") is not None else "-" for _, c in items},
                      key=lambda v: (v == "-", int(v) if v != "-" else 0))
    return render_template("selection.html", items=items, clusters=clusters)


# ------------------------------------------------------------------ image and search

@bp.get("/images/<int:image_id>")
def image(image_id: int) -> str:
    r = rt()
    rec = r.store.catalog.get(image_id)
    cl = rt().clusters.lookup([image_id]).get(image_id)
    near_flagged, near_all, evidence = [], [], None
    if r.service is not None and not rec.deleted:
        flagged = r.service.search_ids([image_id], SearchParams(k=12, scope="flagged")).results[0]
        near_flagged, evidence = flagged.hits, flagged.evidence
        near_all = r.service.search_ids([image_id], SearchParams(k=12, scope="all")).results[0].hits
    from indexer.review.heads import scores_for
    frames = r.store.catalog.keyframes([image_id]).get(image_id, []) if rec.kind == "video" else []
    return render_template("image.html", rec=rec, cluster=cl, near_flagged=near_flagged, near_all=near_all, frames=frames,
                           evidence=evidence, p_labels=scores_for(r.store, [image_id]).get(image_id, {}),
                           space_note=_space_note())


@bp.get("/images/<int:image_id>/large")
def large_view(image_id: int) -> Response:
    """The image at up to 1,024 px, decoded from its original (still on disk, same bytes), for a closer
    look than the 256 px thumbnail: every view is recorded in the audit log; blurred as the session's
    thumbnails are unless the moderator revealed this image in the last 30 minutes."""
    from indexer.media.decode import InputSpec, decode
    from indexer.storage.store import read_original
    from search.thumbnails import render_bytes
    r = rt()
    rec = r.store.catalog.get(image_id)
    found = read_original(rec.paths, rec.sha256, r.settings.max_file_bytes)
    if found.data is None:
        raise NotFoundError(f"image {image_id}'s original is no longer where it was ingested from")
    img = decode(found.data, InputSpec(64), r.service.limits if r.service else DEFAULT_LIMITS, thumb_size=1024, pdq=False)
    who = actor()
    blur = bool(session.get("blur", True)) and not r.audit.revealed_recently(who, f"image:{image_id}")
    r.audit.record(who, "view_large", f"image:{image_id}", blurred=blur)
    out = render_bytes(img.thumbnail, blur=blur, grey=bool(session.get("grey", False)),
                       strength=str(session.get("blur_strength", r.settings.blur_strength)))
    resp = Response(out, mimetype="image/webp")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.post("/images/<int:image_id>/delete")
def delete_image(image_id: int) -> Response:
    """The viewer's delete: the same action as `flagmatch delete` and DELETE /api/v1/images/{id}."""
    r = rt()
    reason = (request.form.get("reason") or "").strip() or None
    delete_images(r.store, r.index, r.audit, [image_id], actor=actor(), reason=reason)
    flash(f"Image {image_id} deleted: only its sha256 and the audit trail are kept.")
    return redirect(url_for("viewer.clusters"))


@bp.route("/search", methods=["GET", "POST"])
def search_page() -> Any:
    """Search by upload: the query (blurred as the session's thumbnails are) beside its hits, flagged and
    unflagged hits told apart, the scope kept, and flag / unflag on the hits."""
    result, error, preview = None, None, None
    scope = request.form.get("scope", "flagged") if request.method == "POST" else "flagged"
    if request.method == "POST":
        r = rt()
        f = request.files.get("image")
        if r.service is None:
            error = "The model and index are still loading; try again in a moment."
        elif f is None or not f.filename:
            error = "Choose an image to search with."
        else:
            try:
                k = request.form.get("k", "20")
                params = SearchParams(k=int(k) if k.isdigit() else 0, scope=scope)
                data = f.read()
                result = r.service.search_uploads([(f.filename, data)], params).results[0]
                preview = _query_preview(data)
            except FlagmatchError as exc:
                error = exc.message
    return render_template("search.html", result=result, error=error, scope=scope, preview=preview,
                           k=request.form.get("k", "20"), space_note=_space_note()), (400 if error else 200)


def _query_preview(data: bytes) -> str | None:
    """A data: URL of the uploaded query's thumbnail, blurred and greyed as the session's thumbnails are."""
    import base64
    from indexer.media.decode import InputSpec, decode
    from search.thumbnails import render_bytes
    try:
        img = decode(data, InputSpec(64), rt().service.limits if rt().service else DEFAULT_LIMITS, thumb_size=192,
                     pdq=False)
    except FlagmatchError:
        return None
    webp = render_bytes(img.thumbnail, blur=bool(session.get("blur", True)), grey=bool(session.get("grey", False)))
    return "data:image/webp;base64," + base64.b64encode(webp).decode()


@bp.get("/banks")
def banks_page() -> str:
    """The hash banks: source, role, threshold, size, and the switch (audited)."""
    return render_template("banks.html", banks=Banks(rt().store.catalog).list())


@bp.post("/banks/<name>/switch")
def switch_bank(name: str) -> Response:
    enabled = request.form.get("enabled") == "1"
    b = update_bank(Banks(rt().store.catalog), rt().audit, name, actor=actor(), enabled=enabled)
    flash(f"Bank {b.name} {'enabled' if enabled else 'disabled'}: it {'matches' if enabled else 'no longer matches'}"
          f" from the next search on.")
    return redirect(url_for("viewer.banks_page"))


# ------------------------------------------------------------------ the learning loop

@bp.get("/queue")
def queue() -> str:
    """What to review next: images a head flagged that no one has judged (newest first), unflagged images
    found near ones a reviewer just flagged, and those the heads are least sure of."""
    from indexer.storage import verdicts as vd
    from indexer.review.heads import load_active, scores_for, uncertain
    r = rt()
    cat = r.store.catalog
    heads = r.service.heads if r.service is not None else load_active(r.store)  # (reloaded when retrained)
    items: list[tuple[int, str, str, int | None]] = []  # (image id, label, why, the flagged image it is near)
    head_flagged = vd.head_flagged(cat, 300)
    said = vd.for_images(cat, [i for i, _, _ in head_flagged])
    items += [(int(i), str(lab or vd.DEFAULT_LABEL), f"flagged by {src}", None) for i, lab, src in head_flagged
              if (lab or vd.DEFAULT_LABEL) not in said.get(int(i), {})][:100]
    items += [(i, lab, f"near #{seed} (similarity {sim:.2f}), which a reviewer flagged", seed)
              for i, lab, seed, sim in vd.candidates(cat, 100)]
    items += [(i, lab, f"the {lab} head is unsure (P {p:.2f})", None)
              for i, lab, p in uncertain(r.store, heads, limit=100)]
    seen: set[tuple[int, str]] = set()
    unique = [it for it in items if (it[0], it[1]) not in seen and not seen.add((it[0], it[1]))][:PAGE]
    recs = cat.get_many([it[0] for it in unique])
    scores = scores_for(r.store, [it[0] for it in unique])
    cards = [(recs[i], lab, why, scores.get(i, {}).get(lab), seed) for i, lab, why, seed in unique if i in recs]
    return render_template("queue.html", cards=cards, heads=heads)


@bp.post("/queue/verdict")
def queue_verdict() -> Response:
    """One verdict from the queue: positive flags the image for the label, negative unflags it (or records
    the verdict alone when it is not flagged)."""
    from indexer.storage import verdicts as vd
    r = rt()
    ids = _ids(request.form.getlist("image_id"))
    label = vd.clean_label(request.form.get("label"))
    positive = request.form.get("positive") == "1"
    if len(ids) != 1:
        raise InvalidInputError("one image_id", code="bad_parameter")
    rec = r.store.catalog.get(ids[0])
    reason = (request.form.get("reason") or "").strip() or (
        f"{label} (review queue)" if positive else f"not {label} (review queue)")
    if positive or rec.flagged:
        set_flags(r.store, r.index, r.audit, ids, flag=positive, actor=actor(), source="review", via="queue",
                  reason=reason, label=label, queue_similarity=r.settings.queue_similarity)
    else:
        record_verdict(r.store, r.audit, ids[0], label, positive=False, actor=actor(), reason=reason, via="queue")
    return jsonify({"image_id": ids[0], "label": label, "positive": positive,
                    "flagged": r.store.catalog.get(ids[0]).flagged})


@bp.get("/model")
def model_page() -> str:
    """Each label's active head: its held-out report with PR and calibration curves (inline SVG), its
    threshold, and every version trained."""
    from indexer.review.heads import active_labels, reports
    from indexer.storage import verdicts as vd
    r = rt()
    labels = []
    for label, version in active_labels(r.store):
        history = reports(r.store, label)
        active = next((h for h in history if h.version == version), None)
        labels.append({"label": label, "active": active, "history": history,
                       "pr_svg": _curve_svg([(x, y) for x, y, _ in active.pr_curve] if active else [], "recall",
                                            "precision"),
                       "cal_svg": _curve_svg([(x, y) for x, y, _ in active.calibration] if active else [],
                                             "predicted", "observed", diagonal=True)})
    return render_template("model.html", labels=labels, verdict_counts=vd.labels(r.store.catalog))


def _curve_svg(points: list[tuple[float, float]], xlabel: str, ylabel: str, *, diagonal: bool = False) -> str:
    """A small line chart on [0, 1]², as inline SVG markup (no script, no CDN)."""
    from markupsafe import Markup
    w, h, pad = 260, 200, 30
    px = lambda x: pad + x * (w - pad - 8)  # noqa: E731
    py = lambda y: h - pad - y * (h - pad - 8)  # noqa: E731
    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(points))
    diag = f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#bbb" stroke-dasharray="4 3"/>' \
        if diagonal else ""
    return Markup(
        f'<svg class="curve" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{ylabel} against {xlabel}">'
        f'<rect x="{pad}" y="8" width="{w - pad - 8}" height="{h - pad - 8}" fill="#fff" stroke="#ccc"/>{diag}'
        f'<polyline points="{pts}" fill="none" stroke="#2454c5" stroke-width="2"/>'
        f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">{xlabel}</text>'
        f'<text x="10" y="{h / 2}" font-size="11" transform="rotate(-90 10 {h / 2})" text-anchor="middle">{ylabel}</text>'
        f'<text x="{pad}" y="{h - pad + 12}" font-size="10">0</text><text x="{w - 14}" y="{h - pad + 12}" font-size="10">1</text>'
        f"</svg>")


@bp.get("/audit")
def audit_page() -> str:
    """The audit log: filter by actor, action, target (prefix*) and time, page to older rows, export."""
    args = {k: v for k, v in request.args.items() if v}
    try:
        q, limit = parse_query(args)
    except InvalidInputError as exc:  # a filter the log cannot apply: the form stays, with what was typed
        return render_template("audit.html", events=[], args=args, older=None, export={}, problem=exc.message), 400
    events = rt().audit.events(limit, query=q)
    older = dict(args, before_id=events[-1].id) if len(events) == limit else None
    export = {k: v for k, v in args.items() if k != "before_id"}
    return render_template("audit.html", events=events, args=args, older=older, export=export, problem=None)
