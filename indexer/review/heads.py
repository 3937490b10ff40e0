"""Heads: small calibrated classifiers on the stored embeddings, one per policy label, trained from
reviewer verdicts (``indexer.storage.verdicts``).

A head is scikit-learn's logistic regression with balanced class weights on the L2-normalised raw
embeddings, calibrated by ``CalibratedClassifierCV`` — Platt scaling (sigmoid) below 1,000 training
verdicts, where isotonic regression overfits, isotonic from there on. The verdicts are split by time:
the newest ``test_share`` is held out, the head is fitted on the rest, and the operating threshold is the
lowest that reaches the target precision on the held-out verdicts (the one that keeps the most recall).
What is deployed is the model the metrics describe (not a refit on everything), so the report is true of it.

Heads are stored under ``<home>/heads/<label>/v<N>.joblib`` with a ``v<N>.json`` report beside it, and
``active.json`` names the version in use. Scoring writes ``p_<label>`` for every image (``head_scores``)
and flags images at or above the threshold with source ``head:<label>@v<N>`` — never one a person gave
a negative verdict for that label, and never unflagging anything."""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from indexer.storage import verdicts as vd
from indexer.storage.verdicts import MIN_PER_CLASS, MIN_TEST_PER_CLASS
from indexer.storage.catalog import FlagRequest
from indexer.storage.tables import utcnow
from indexer.errors import FlagmatchError, InvalidInputError, NotEnoughVerdicts, NotFoundError
from indexer.storage.store import Store

MIN_TRAIN_PER_CLASS = 5  # calibration cross-validates: each fold needs some of each kind
ISOTONIC_FROM = 1000    # training verdicts from which isotonic calibration beats Platt's sigmoid


@dataclass
class HeadReport:
    label: str
    version: int
    trained_at: str
    model_id: str
    method: str                       # sigmoid | isotonic
    target_precision: float
    threshold: float
    target_met: bool
    precision: float                  # held out, at the threshold
    recall: float
    average_precision: float
    brier: float
    confusion: dict[str, int]         # tp fp tn fn at the threshold, held out
    counts: dict[str, int]            # train/test × positive/negative, conflicts, verdicts on deleted images
    split_at: str                     # verdicts after this time were held out
    pr_curve: list[tuple[float, float, float]] = field(default_factory=list)       # (recall, precision, threshold)
    calibration: list[tuple[float, float, int]] = field(default_factory=list)      # (mean predicted, observed, n)


@dataclass
class Head:
    label: str
    version: int
    threshold: float
    model: Any  # a fitted CalibratedClassifierCV

    @property
    def source(self) -> str:
        return f"head:{self.label}@v{self.version}"

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        if len(vectors) == 0:
            return np.zeros(0, np.float32)
        return self.model.predict_proba(_normed(vectors))[:, 1].astype(np.float32)


def _normed(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80] or "label"


def heads_dir(store: Store) -> Path:
    return store.home / "heads"


# ------------------------------------------------------------------ training

def train_head(store: Store, label: str, *, target_precision: float = 0.95, test_share: float = 0.2,
               seed: int = 0) -> tuple[Head, HeadReport]:
    """Fit, calibrate and evaluate a head for ``label`` from its verdicts; store it as the next version
    and make it active. Refuses (NotEnoughVerdicts) when there are too few verdicts of either kind."""
    from sklearn.calibration import CalibratedClassifierCV, calibration_curve
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, brier_score_loss, precision_recall_curve

    if not 0.5 <= target_precision < 1.0:
        raise InvalidInputError("the target precision is between 0.5 and 1 (exclusive)", code="bad_parameter")
    label = vd.clean_label(label)
    data = vd.latest(store.catalog, label)
    pos, neg = data.counts
    if pos < MIN_PER_CLASS or neg < MIN_PER_CLASS:
        raise NotEnoughVerdicts(
            f"label {label!r} has {pos} positive and {neg} negative verdicts (latest per live image); a head needs "
            f"at least {MIN_PER_CLASS} of each — review more images (the queue shows where it helps most)")
    y = np.asarray(data.positive, dtype=np.int8)
    train, test = _split_by_time(y, test_share)
    counts = {"train_positive": int(y[train].sum()), "train_negative": int((1 - y[train]).sum()),
              "test_positive": int(y[test].sum()), "test_negative": int((1 - y[test]).sum())}
    if min(counts["test_positive"], counts["test_negative"]) < MIN_TEST_PER_CLASS or \
            min(counts["train_positive"], counts["train_negative"]) < MIN_TRAIN_PER_CLASS:
        raise NotEnoughVerdicts(
            f"label {label!r}: holding out the newest {test_share:.0%} of each kind leaves "
            f"{counts['train_positive']} positive and {counts['train_negative']} negative verdicts to train on and "
            f"{counts['test_positive']} and {counts['test_negative']} to test on; a head needs "
            f"{MIN_TRAIN_PER_CLASS} of each to train and {MIN_TEST_PER_CLASS} of each to test — review more images, "
            f"or lower the test share")
    x = _normed(store.open_vectors().get(data.image_ids))
    n_train = len(train)
    method = "isotonic" if n_train >= ISOTONIC_FROM else "sigmoid"
    folds = int(min(5, y[train].sum(), (1 - y[train]).sum()))
    model = CalibratedClassifierCV(LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000,
                                                      random_state=seed), method=method, cv=folds)
    model.fit(x[train], y[train])
    p = model.predict_proba(x[test])[:, 1]
    yt = y[test]
    prec, rec, thr = precision_recall_curve(yt, p)
    ok = np.nonzero(prec[:-1] >= target_precision)[0]
    if len(ok):
        i = int(ok[np.argmax(rec[ok])])
        target_met = True
    else:  # the target is out of reach: the most precise threshold, said so in the report
        i = int(np.argmax(prec[:-1]))
        target_met = False
    threshold = float(thr[i])
    pred = p >= threshold
    conf = {"tp": int((pred & (yt == 1)).sum()), "fp": int((pred & (yt == 0)).sum()),
            "tn": int((~pred & (yt == 0)).sum()), "fn": int((~pred & (yt == 1)).sum())}
    frac, mean = calibration_curve(yt, p, n_bins=min(10, max(2, len(yt) // 10)), strategy="quantile")
    bins = np.quantile(p, np.linspace(0, 1, len(frac) + 1))
    counts_per_bin = np.histogram(p, bins=bins)[0] if len(frac) else np.zeros(0, int)
    step = max(1, len(thr) // 100)
    version = _next_version(store, label)
    report = HeadReport(
        label=label, version=version, trained_at=utcnow().isoformat(timespec="seconds") + "Z",
        model_id=store.catalog.model_meta().get("model_id", ""), method=method, target_precision=target_precision,
        threshold=threshold, target_met=target_met,
        precision=float(conf["tp"] / max(1, conf["tp"] + conf["fp"])),
        recall=float(conf["tp"] / max(1, conf["tp"] + conf["fn"])),
        average_precision=float(average_precision_score(yt, p)), brier=float(brier_score_loss(yt, p)),
        confusion=conf,
        counts={**counts, "conflicting_images": data.conflicts, "verdicts_on_deleted_images": data.on_deleted},
        split_at=min(data.at[i] for i in test).isoformat(timespec="seconds") + "Z",
        pr_curve=[(float(rec[j]), float(prec[j]), float(thr[j])) for j in range(0, len(thr), step)],
        calibration=[(float(m), float(f), int(c)) for m, f, c in zip(mean, frac, counts_per_bin)])
    head = Head(label, version, threshold, model)
    _save(store, head, report)
    return head, report


def _split_by_time(y: np.ndarray, test_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``y`` (oldest first): the newest ``test_share`` of each kind — at least
    ``MIN_TEST_PER_CLASS`` — is held out, so both kinds train and test even when one kind's verdicts all came
    recently (a batch of "not spam" from the queue after months of positives)."""
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for kind in (0, 1):
        idx = np.nonzero(y == kind)[0]
        n_test = min(len(idx), max(int(round(len(idx) * test_share)), MIN_TEST_PER_CLASS))
        train.append(idx[:len(idx) - n_test])
        test.append(idx[len(idx) - n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _next_version(store: Store, label: str) -> int:
    d = heads_dir(store) / slug(label)
    found = [int(m.group(1)) for p in d.glob("v*.json") if (m := re.fullmatch(r"v(\d+)\.json", p.name))]
    return max(found, default=0) + 1


def _save(store: Store, head: Head, report: HeadReport) -> None:
    import joblib
    from indexer.storage.files import publish
    d = heads_dir(store) / slug(head.label)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".v{head.version}.joblib.tmp"
    joblib.dump({"label": head.label, "version": head.version, "threshold": head.threshold, "model": head.model}, tmp)
    tmp.replace(d / f"v{head.version}.joblib")
    publish(d / f"v{head.version}.json", json.dumps(asdict(report), indent=2).encode())
    publish(d / "active.json", json.dumps({"label": head.label, "version": head.version}).encode())


# ------------------------------------------------------------------ reading heads back

def reports(store: Store, label: str) -> list[HeadReport]:
    """Every version's report for ``label``, newest first."""
    d = heads_dir(store) / slug(label)
    out = []
    for p in d.glob("v*.json"):
        if re.fullmatch(r"v\d+\.json", p.name):
            raw = json.loads(p.read_text())
            out.append(HeadReport(**raw))
    return sorted(out, key=lambda r: -r.version)


def active_labels(store: Store) -> list[tuple[str, int]]:
    out = []
    for a in sorted(heads_dir(store).glob("*/active.json")):
        meta = json.loads(a.read_text())
        out.append((str(meta["label"]), int(meta["version"])))
    return out


def load_active(store: Store) -> list[Head]:
    """The active head of every label (none: an empty list). A head trained for another model is refused."""
    import joblib
    model_id = store.catalog.model_meta().get("model_id", "")
    heads = []
    for label, version in active_labels(store):
        d = heads_dir(store) / slug(label)
        rep = json.loads((d / f"v{version}.json").read_text())
        if model_id and rep.get("model_id") not in ("", model_id):
            raise FlagmatchError(f"the {label!r} head was trained on {rep.get('model_id')}'s embeddings, not "
                                 f"{model_id}'s: train it again on this store", code="head_mismatch")
        saved = joblib.load(d / f"v{version}.joblib")
        heads.append(Head(saved["label"], int(saved["version"]), float(saved["threshold"]), saved["model"]))
    return heads


def activate(store: Store, label: str, version: int) -> None:
    """Make an earlier (or later) version the active one."""
    from indexer.storage.files import publish
    d = heads_dir(store) / slug(vd.clean_label(label))
    if not (d / f"v{version}.joblib").exists():
        raise NotFoundError(f"no version {version} of the {label!r} head")
    publish(d / "active.json", json.dumps({"label": vd.clean_label(label), "version": version}).encode())


# ------------------------------------------------------------------ scoring

@dataclass
class ScoreCounts:
    scored: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    kept_by_verdict: int = 0  # at or above a threshold, left alone: a person said it is not that label


def head_flags(store: Store, heads: Sequence[Head], ids: Sequence[int], scores: dict[str, np.ndarray],
               flagged_now: dict[int, bool], said: dict[int, dict[str, bool]] | None = None
               ) -> list[tuple[int, FlagRequest]]:
    """The flag requests the heads make for ``ids``: at or above a head's threshold, not flagged already,
    and no negative verdict of a person for that label (a head never overrules a reviewer)."""
    said = vd.for_images(store.catalog, ids) if said is None else said
    out: list[tuple[int, FlagRequest]] = []
    taken: set[int] = set()
    for h in heads:
        p = scores[h.label]
        for i, image_id in enumerate(ids):
            if p[i] < h.threshold or flagged_now.get(image_id) or image_id in taken:
                continue
            if said.get(image_id, {}).get(h.label) is False:
                continue
            taken.add(image_id)
            out.append((image_id, FlagRequest(h.source, h.label, h.source,
                                              f"P({h.label}) {float(p[i]):.3f} >= threshold {h.threshold:.3f}")))
    return out


def save_scores(store: Store, heads: Sequence[Head], ids: Sequence[int], scores: dict[str, np.ndarray]) -> None:
    vd.save_scores(store.catalog, [(h.label, h.version, ids, scores[h.label]) for h in heads])


def score_catalog(store: Store, heads: Sequence[Head], *, chunk: int = 20_000,
                  progress: Any = None) -> tuple[ScoreCounts, list[int]]:
    """Apply ``heads`` to every live image, a chunk at a time: scores stored, flags raised as the rules say.
    Returns the counts and the ids newly flagged (for the index)."""
    counts = ScoreCounts()
    newly: list[int] = []
    vectors = store.open_vectors()
    for ids in _chunks(store.catalog.image_ids(), chunk):
        x = vectors.get(ids)
        scores = {h.label: h.predict(x) for h in heads}
        save_scores(store, heads, ids, scores)
        flagged_now = store.catalog.flag_states(ids)
        said = vd.for_images(store.catalog, ids)
        reqs = head_flags(store, heads, ids, scores, flagged_now, said)
        counts.kept_by_verdict += sum(1 for h in heads for j, i in enumerate(ids)
                                      if scores[h.label][j] >= h.threshold and said.get(i, {}).get(h.label) is False)
        if reqs:  # one transaction a chunk
            store.catalog.write_batch([], "", flags=reqs)
            for image_id, req in reqs:
                newly.append(image_id)
                counts.flagged[req.label or ""] = counts.flagged.get(req.label or "", 0) + 1
        counts.scored += len(ids)
        if progress is not None:
            progress.update(len(ids), errors=0)
    return counts, newly


def scores_for(store: Store, ids: Sequence[int]) -> dict[int, dict[str, float]]:
    """``p_<label>`` of stored images, from the last scoring."""
    return vd.scores_for(store.catalog, ids)


def uncertain(store: Store, heads: Sequence[Head], *, limit: int = 200) -> list[tuple[int, str, float]]:
    """Live images without a verdict for a head's label whose score is nearest its threshold:
    (image id, label, p), least certain first — where a verdict teaches the head most."""
    out: list[tuple[float, int, str, float]] = []
    for h in heads:
        rows = vd.nearest_threshold(store.catalog, h.label, h.threshold, limit * 3)
        said = vd.for_images(store.catalog, [i for i, _ in rows])
        out += [(abs(p - h.threshold), i, h.label, p) for i, p in rows if h.label not in said.get(i, {})]
    out.sort()
    return [(i, label, p) for _, i, label, p in out[:limit]]


def _chunks(seq: Sequence[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(seq), n):
        yield list(seq[i:i + n])


__all__ = ["Head", "HeadReport", "NotEnoughVerdicts", "train_head", "load_active", "score_catalog", "activate",
           "reports", "scores_for", "uncertain", "head_flags", "save_scores", "dt"]


class ActiveHeads:
    """The active heads, reloaded when ``flagmatch train`` or ``heads activate`` changes them (a server
    picks up a new head at its next request, without a restart)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._stamp: tuple[tuple[str, float], ...] | None = None
        self._heads: list[Head] = []

    def get(self) -> list[Head]:
        import logging
        stamp = tuple(sorted((str(p), p.stat().st_mtime) for p in heads_dir(self.store).glob("*/active.json")))
        if stamp != self._stamp:
            try:
                self._heads = load_active(self.store)
            except FlagmatchError as exc:
                logging.getLogger(__name__).warning("heads not loaded: %s", exc.message)
                self._heads = []
            self._stamp = stamp
        return self._heads
