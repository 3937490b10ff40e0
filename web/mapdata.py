"""The map's binary point list: uint32 n, float32 bounds[4] (x min, x max, y min, y max); uint16 x[n],
uint16 y[n] (quantised to the bounds); int32 id[n]; int32 cluster[n] (-1: unclustered). About 12
bytes a point, read by static/map.js into typed arrays without parsing."""
from __future__ import annotations

import struct
from typing import Sequence

import numpy as np


def encode_points(ids: Sequence[int], clusters: Sequence[int], xs: Sequence[float], ys: Sequence[float]) -> bytes:
    n = len(ids)
    x, y = np.asarray(xs, np.float32), np.asarray(ys, np.float32)
    bounds = [float(x.min()), float(x.max()), float(y.min()), float(y.max())] if n else [0.0, 1.0, 0.0, 1.0]

    def q(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.round((v - lo) / max(hi - lo, 1e-9) * 65535).astype("<u2")
    header = struct.pack("<I4f", n, *bounds)
    return (header + q(x, bounds[0], bounds[1]).tobytes() + q(y, bounds[2], bounds[3]).tobytes()
            + np.asarray(ids, "<i4").tobytes() + np.asarray(clusters, "<i4").tobytes())
