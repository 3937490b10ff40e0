"""Synthetic embeddings in a real store, and how alike two searches' answers are."""
from __future__ import annotations

import hashlib

import numpy as np

from indexer.storage.catalog import FlagRequest, NewImage


def populate(store, vectors: np.ndarray, flagged: np.ndarray | None = None, start: int = 1) -> np.ndarray:
    """Real catalog rows + raw vectors for synthetic embeddings (what ingest would have written)."""
    vs = store.bind_model("synthetic@test", vectors.shape[1], "{}")
    ids = np.arange(start, start + len(vectors))
    for i in range(0, len(vectors), 5000):
        part = ids[i:i + 5000]
        vs.append(int(part[0]), vectors[i:i + 5000])
        images = [NewImage(int(k), hashlib.sha256(f"img{k}".encode()).hexdigest(), 1, "PNG", 1, 1, 1, 0.0,
                           "t", ((f"/x/{k}.png", None),)) for k in part]
        flags = [(int(k), FlagRequest("import", None, "test")) for j, k in enumerate(part)
                 if flagged is not None and flagged[i + j]]
        store.catalog.write_batch(images, "synthetic@test", flags=flags)
    return ids


def overlap(a, b) -> float:
    return float(np.mean([len(set(x.ids.tolist()) & set(y.ids.tolist())) / max(len(y.ids), 1) for x, y in zip(a, b)]))
