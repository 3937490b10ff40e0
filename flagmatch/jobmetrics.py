"""What the CLI's long jobs tell Prometheus when they end: a job runs too briefly to be scraped, so it
pushes to a Pushgateway (``metrics_push``, its URL; grouped as job ``flagmatch``, ``command`` the
job's name, so each command's last run replaces its own figures only) and/or writes
``flagmatch_<job>.prom`` for node_exporter's textfile collector into ``metrics_textfile_dir`` (atomically),
with prometheus-client.

Every job reports ``flagmatch_job_last_run_timestamp_seconds``, ``flagmatch_job_last_success_timestamp_seconds``
(only when it succeeded: alert on its age), ``flagmatch_job_duration_seconds`` and its own figures as
``flagmatch_job_<figure>`` gauges, all labelled ``command`` (ingest, cluster, reindex, backup, check, …;
not ``job``, which Prometheus sets to the scrape's own job);
figures given per key (failures by code, stage times by stage) carry that key as a second label. A job
that raised (or exited non-zero: ``check`` finding the store not whole) reports without a success time."""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

from flagmatch.settings import Settings

log = logging.getLogger(__name__)
Figures = Mapping[str, float | Mapping[str, float]]


def report_job(settings: Settings, job: str, started: float, figures: Figures, *, ok: bool = True,
               key: str = "key") -> None:
    """Send a finished job's figures where the settings say (nowhere when neither is set). ``started``:
    ``time.time()`` at its start; a mapping figure is one series per key, labelled ``key``."""
    if not settings.metrics_push and not settings.metrics_textfile_dir:
        return
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile
    registry = CollectorRegistry()
    now = time.time()
    Gauge("flagmatch_job_last_run_timestamp_seconds", "when the job last ended", ["command"],
          registry=registry).labels(job).set(now)
    if ok:
        Gauge("flagmatch_job_last_success_timestamp_seconds", "when the job last ended without an error", ["command"],
              registry=registry).labels(job).set(now)
    Gauge("flagmatch_job_duration_seconds", "how long the job's last run took", ["command"],
          registry=registry).labels(job).set(now - started)
    for name, value in figures.items():
        if isinstance(value, Mapping):
            g = Gauge(f"flagmatch_job_{name}", f"{job}: {name.replace('_', ' ')}", ["command", key], registry=registry)
            for k, v in value.items():
                g.labels(job, str(k)).set(float(v))
        else:
            Gauge(f"flagmatch_job_{name}", f"{job}: {name.replace('_', ' ')}", ["command"],
                  registry=registry).labels(job).set(float(value))
    if settings.metrics_textfile_dir:
        write_to_textfile(os.path.join(settings.metrics_textfile_dir, f"flagmatch_{job}.prom"), registry)
    if settings.metrics_push:
        try:
            push_to_gateway(settings.metrics_push, job="flagmatch", grouping_key={"command": job}, registry=registry,
                            timeout=10)
        except OSError as exc:  # the job's work is done and committed: a monitoring outage must not fail it
            log.warning("could not push the %s job's metrics to %s: %s", job, settings.metrics_push, exc)


@contextmanager
def job(settings: Settings, name: str, key: str = "key") -> Iterator[dict[str, float | dict[str, float]]]:
    """Time the block and report the figures it fills in when it ends, successfully or not."""
    figures: dict[str, float | dict[str, float]] = {}
    started = time.time()
    try:
        yield figures
    except BaseException:
        report_job(settings, name, started, figures, ok=False, key=key)
        raise
    report_job(settings, name, started, figures, ok=True, key=key)
