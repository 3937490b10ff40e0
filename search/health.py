"""The health of every part, for ``/readyz``, ``/status`` (JSON when asked for) and ``flagmatch status``.

Each check answers ``ok`` with its figures, against a threshold setting where there is one:

- ``catalog``: reachable (one round trip, its time); **critical**.
- ``model``: loaded in this process (the server), or which model the store is bound to (the CLI, which
  loads none); **critical** for a server.
- ``index``: each scope's generation and the image it covers up to; no index is **critical**.
- ``index_lag``: how far each scope is behind the catalog, in images and in seconds since the first image
  it lacks was written (``health_max_index_lag``). A server's indexes catch up in the background within half a
  second of a change (each ``/readyz`` and ``/status`` looks), so a lag that lasts means catching up is
  failing; for ``flagmatch status`` it is the published files' lag (saved every ``index_save_seconds``).
- ``space``: the matching-space version the indexes answer in (figures only).
- ``disk``: free space under the home (``health_min_free_gb``): ingest, index saves and backups need it.
- ``replica``: on a PostgreSQL standby, how far its replay is behind (``health_max_replica_lag``).

The status is ``failing`` when a critical check fails, ``degraded`` when another does, else ``ok``."""
from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass
from typing import Any, Mapping

from indexer.storage.store import Store

CRITICAL = ("catalog", "model", "index")


@dataclass(frozen=True)
class Limits:
    min_free_gb: float = 2.0
    max_index_lag_s: float = 900.0
    max_replica_lag_s: float = 30.0

    @classmethod
    def of(cls, settings: Any) -> "Limits":
        """The thresholds a settings object names (``health_*``)."""
        return cls(settings.health_min_free_gb, settings.health_max_index_lag, settings.health_max_replica_lag)


def health(store: Store, *, scopes: Mapping[str, tuple[int, int]] | None, space: int | None,
           model: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """``scopes``: {scope: (generation, image id covered)} of the indexes answering (None: not loaded);
    ``model``: {"ok": bool, ...} as the caller knows it."""
    checks: dict[str, dict[str, Any]] = {"model": dict(model)}
    started = time.perf_counter()
    try:
        head = store.catalog.head()[0]
        checks["catalog"] = {"ok": True, "engine": store.catalog.engine.dialect.name,
                             "ms": round((time.perf_counter() - started) * 1000, 2), "images": head}
    except Exception as exc:  # any driver's failure: unreachable is what matters
        head = None
        checks["catalog"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    checks["index"], checks["index_lag"] = _index(store, scopes, head, limits)
    checks["space"] = {"ok": True, "version": space}
    free = shutil.disk_usage(store.home).free / 2**30
    checks["disk"] = {"ok": free >= limits.min_free_gb, "free_gb": round(free, 2), "min_free_gb": limits.min_free_gb}
    if checks["catalog"]["ok"]:
        try:
            lag = store.catalog.replica_lag()
            checks["replica"] = {"ok": lag is None or lag <= limits.max_replica_lag_s, "standby": lag is not None,
                                 "lag_s": None if lag is None else round(lag, 1),
                                 "max_lag_s": limits.max_replica_lag_s}
        except Exception as exc:
            checks["replica"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    failing = [name for name, c in checks.items() if not c["ok"] and name in CRITICAL]
    degraded = [name for name, c in checks.items() if not c["ok"] and name not in CRITICAL]
    return {"status": "failing" if failing else "degraded" if degraded else "ok", "checks": checks}


def _index(store: Store, scopes: Mapping[str, tuple[int, int]] | None, head: int | None,
           limits: Limits) -> tuple[dict[str, Any], dict[str, Any]]:
    if not scopes:
        why = "no index is loaded" if scopes is None else "no index has been built yet"
        return {"ok": False, "error": why}, {"ok": True, "scopes": {}}
    index: dict[str, Any] = {"ok": True, "scopes": {}}
    lag: dict[str, Any] = {"ok": True, "max_lag_s": limits.max_index_lag_s, "scopes": {}}
    if head is None:  # the catalog did not answer (its own check fails): no lag to measure
        behind = {scope: (0, 0.0) for scope in scopes}
    else:
        behind = index_lag(store, {scope: covered for scope, (_, covered) in scopes.items()}, head)
    for scope, (generation, covered) in scopes.items():
        images, seconds = behind[scope]
        index["scopes"][scope] = {"generation": generation, "covers_image_id": covered}
        lag["scopes"][scope] = {"images": images, "seconds": round(seconds, 1)}
        lag["ok"] = lag["ok"] and seconds <= limits.max_index_lag_s
    return index, lag


def index_lag(store: Store, covered: Mapping[str, int], head: int | None = None) -> dict[str, tuple[int, float]]:
    """{scope: (catalog images past the one it covers, seconds since the first of them was written)}."""
    head = store.catalog.head()[0] if head is None else head
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)  # the catalog keeps naive UTC
    since = {upto: store.catalog.first_created_after(upto) for upto in set(covered.values()) if head > upto}
    return {scope: (max(0, head - upto), max(0.0, (now - since[upto]).total_seconds()) if upto in since else 0.0)
            for scope, upto in covered.items()}
