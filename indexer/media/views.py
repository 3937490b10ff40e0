"""Query views: the parts of an upload worth searching on their own.

Re-uploads often arrive wrapped: letterboxed, with a uniform border, or pasted into a screenshot of
an app (bars, menus, text around the picture). The model sees the whole frame, so the copy is searched
with someone else's pixels around it. Two boxes undo that, both found on a small greyscale copy:

- ``trimmed``: uniform borders cut away (each edge walks inward while its rows/columns are within
  ``BORDER_TOL`` grey levels of the edge colour);
- ``content``: the bounding box of the largest region that is not the frame's background colour (the
  picture in a screenshot-like frame; bars and text blocks are smaller components and lose).

Composites — collages, grids, a feed's screenshot, picture-in-picture — hold several pictures, and a copy
may be any one of them. ``cells`` cuts the frame along its gutters, recursively (an XY cut): full-length bands
of one uniform colour with a picture's edge on either side; a frame that splits into two or more cells of a
picture's size is composite, and each cell is a view. ``grid`` is the fallback for composites without
gutters (pictures butted together, picture-in-picture): the four quadrants and the centre half, searched
only when the whole image found nothing confident (``search.service``).

``mirror`` is the horizontally flipped image (a search of the mirror finds mirrored re-uploads when
the model is not flip-invariant). A view is kept only when it differs from the whole frame enough to
matter (``MIN_CUT``) and is big enough to hold a picture (``MIN_AREA``)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

ANALYSIS_SIDE = 256   # long side of the greyscale copy the boxes are found on
BORDER_TOL = 10.0     # grey levels: JPEG ringing around a flat border stays within this
BORDER_SHARE = 0.98   # share of a row's pixels within tolerance for the row to be border
MIN_CUT = 0.06        # a box must drop at least 6 % of the frame's area to be a view of its own
MIN_AREA = 0.08       # and keep at least 8 % of it (smaller boxes are icons and text, not pictures)
BLOCK = 8             # texture is measured on 8×8 blocks of the analysis copy
TEXTURE_STD = 6.0     # a block with a grey-level std below this is flat (UI, background, margins)
BG_TOL = 12.0         # grey levels: a flat block this far from the frame's background colour is content

Box = tuple[int, int, int, int]  # left, top, right, bottom in the source's pixels
CELL_MIN_SIDE = 0.15  # a cell spans at least this share of its parent along the cut (narrower: a gutter's edge)
CELL_MIN_AREA = 0.04  # and at least this share of the frame (smaller: icons, avatars, text)
MAX_CELLS = 8         # the largest cells searched (a 3 × 3 grid keeps 8 of its 9)
GRID_MIN_SIDE = 16    # px: a grid part narrower than this holds no picture (a 1 × 20,000 strip has no grid)
EDGE_SHARE = 0.5      # share of the line beside a gutter that differs from it: a picture's edge, not background


def analysis_copy(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """A small float greyscale copy and its scale (source pixels per analysis pixel)."""
    h, w = rgb.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / ANALYSIS_SIDE)))
    small = rgb[::step, ::step].astype(np.float32)
    grey = small @ np.array([0.299, 0.587, 0.114], np.float32) if small.ndim == 3 else small
    return grey, float(step)


def trim_box(grey: np.ndarray) -> Box | None:
    """The box inside uniform borders (in analysis pixels), or None when there are none."""
    h, w = grey.shape
    if h < 8 or w < 8:
        return None

    def uniform(line: np.ndarray, colour: float) -> bool:
        return bool(np.mean(np.abs(line - colour) <= BORDER_TOL) >= BORDER_SHARE)

    top, bottom, left, right = 0, h, 0, w
    colour = float(np.median(grey[0]))
    while top < bottom - 1 and uniform(grey[top], colour):
        top += 1
    colour = float(np.median(grey[-1]))
    while bottom - 1 > top and uniform(grey[bottom - 1], colour):
        bottom -= 1
    colour = float(np.median(grey[:, 0]))
    while left < right - 1 and uniform(grey[top:bottom, left], colour):
        left += 1
    colour = float(np.median(grey[:, -1]))
    while right - 1 > left and uniform(grey[top:bottom, right - 1], colour):
        right -= 1
    return (left, top, right, bottom)


def content_box(grey: np.ndarray, *, flat_background: bool = False) -> Box | None:
    """The bounding box of the largest connected region that is not the frame's background (in
    analysis pixels). The background is the commonest grey level of the outer ring — or, with
    ``flat_background``, of the flat blocks (a picture touching the ring, or a bar's blended edge, then
    does not decide it); a block belongs to the content when it is textured or its mean is away from the
    background."""
    h, w = grey.shape
    bh, bw = h // BLOCK, w // BLOCK
    if bh < 3 or bw < 3:
        return None
    blocks = grey[: bh * BLOCK, : bw * BLOCK].reshape(bh, BLOCK, bw, BLOCK)
    flat = blocks.std(axis=(1, 3)) < TEXTURE_STD
    if flat_background and flat.any():
        levels = blocks.mean(axis=(1, 3))[flat]
    else:
        levels = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.bincount(np.clip(levels, 0, 255).astype(np.int64) // 4).argmax() * 4 + 2)
    textured = (blocks.std(axis=(1, 3)) >= TEXTURE_STD) | (np.abs(blocks.mean(axis=(1, 3)) - background) > BG_TOL)
    # a picture has patches of the background's colour too (sky, a white shirt): fill enclosed holes
    # (filling never bridges the gap between the picture and a bar or a text line beside it)
    textured = ndimage.binary_fill_holes(textured)
    labels, n = ndimage.label(textured)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(textured, labels, index=np.arange(1, n + 1))
    biggest = int(np.argmax(sizes)) + 1
    rows = np.flatnonzero((labels == biggest).any(axis=1))
    cols = np.flatnonzero((labels == biggest).any(axis=0))
    area = (cols[-1] + 1 - cols[0]) * (rows[-1] + 1 - rows[0])
    if sizes[biggest - 1] < 0.6 * area:  # a sparse scatter of text blocks is not a picture
        return None
    box = (int(cols[0]) * BLOCK, int(rows[0]) * BLOCK, int(cols[-1] + 1) * BLOCK, int(rows[-1] + 1) * BLOCK)
    return _tighten(grey, box, background)


def _tighten(grey: np.ndarray, box: Box, background: float) -> Box:
    """Pull each edge of a block-aligned box in, pixel by pixel, past rows/columns that are mostly
    background (the gap and a line of text that touched the picture's blocks)."""
    left, top, right, bottom = box
    bg = np.abs(grey - background) <= BG_TOL

    def mostly_bg(a: np.ndarray) -> bool:
        return bool(a.mean() >= 0.6)

    while bottom - top > BLOCK and mostly_bg(bg[bottom - 1, left:right]):
        bottom -= 1
    while bottom - top > BLOCK and mostly_bg(bg[top, left:right]):
        top += 1
    while right - left > BLOCK and mostly_bg(bg[top:bottom, right - 1]):
        right -= 1
    while right - left > BLOCK and mostly_bg(bg[top:bottom, left]):
        left += 1
    return (left, top, right, bottom)


def _gutters(grey: np.ndarray) -> list[tuple[int, int]]:
    """Interior gutters across the rows of ``grey`` (transpose it for columns), as [start, end): runs of
    uniform rows of one colour with a picture's edge on both sides. (Cuts without a gutter — pictures butted
    together — were tried as rows where most pixels jump: on make-corpus photos, horizons and walls made one
    photo in nine look composite. The grid covers those.)"""
    h = grey.shape[0]
    med = np.median(grey, axis=1, keepdims=True)
    gutter = np.mean(np.abs(grey - med) <= BORDER_TOL, axis=1) >= BORDER_SHARE
    out: list[tuple[int, int]] = []
    i = 0
    while i < h:
        if gutter[i]:
            j = i
            while j < h and gutter[j]:
                j += 1
            # interior, one flat colour (a gradient's rows are each uniform too, but differ from each other),
            # and a picture's edge on both sides, not more of a flat background running on
            if i > 0 and j < h and np.ptp(med[i:j]) <= BORDER_TOL / 2:
                colour = float(np.median(med[i:j]))
                if all(np.mean(np.abs(grey[r] - colour) > BG_TOL) >= EDGE_SHARE for r in (i - 1, j)):
                    out.append((i, j))
            i = j
        else:
            i += 1
    return out


def _cut(grey: np.ndarray, box: Box, depth: int, frame: float) -> list[Box]:
    """The cells of ``box`` (analysis pixels): split along its gutters in whichever direction has them,
    each part cut again, up to ``depth`` levels; a part too thin to be a picture is a gutter's fringe."""
    left, top, right, bottom = box
    if depth == 0:
        return [box]
    for axis in (0, 1):
        part = grey[top:bottom, left:right]
        gutters = _gutters(part if axis == 0 else part.T)
        length = (bottom - top) if axis == 0 else (right - left)
        edges = [0] + [x for g in gutters for x in g] + [length]
        spans = [(edges[k], edges[k + 1]) for k in range(0, len(edges), 2)]
        spans = [(a, b) for a, b in spans if b - a >= CELL_MIN_SIDE * length]
        if len(spans) < 2:
            continue
        cells: list[Box] = []
        for a, b in spans:
            sub = (left, top + a, right, top + b) if axis == 0 else (left + a, top, left + b, bottom)
            cells += _cut(grey, sub, depth - 1, frame)
        return [c for c in cells if (c[2] - c[0]) * (c[3] - c[1]) >= CELL_MIN_AREA * frame]
    return [box]


def cell_boxes(grey: np.ndarray) -> list[Box]:
    """The cells of a composite (analysis pixels), largest first, or [] when the frame is one picture."""
    h, w = grey.shape
    if h < 16 or w < 16:
        return []
    inner = trim_box(grey) or (0, 0, w, h)  # uniform borders are a frame, not a gutter
    cells = _cut(grey, inner, 3, float(w * h))
    if len(cells) < 2:
        return []
    return sorted(cells, key=lambda c: -(c[2] - c[0]) * (c[3] - c[1]))[:MAX_CELLS]


def grid_boxes(w: int, h: int) -> list[Box]:
    """The four quadrants and the centre half of a w × h frame (source pixels), each at least
    ``GRID_MIN_SIDE`` both ways."""
    hw, hh = w // 2, h // 2
    boxes = [(0, 0, hw, hh), (hw, 0, w, hh), (0, hh, hw, h), (hw, hh, w, h), (w // 4, h // 4, w - w // 4, h - h // 4)]
    return [b for b in boxes if min(b[2] - b[0], b[3] - b[1]) >= GRID_MIN_SIDE]


def view_boxes(rgb: np.ndarray, *, cells: bool = False, grid: bool = False) -> dict[str, Box]:
    """The source-pixel boxes of the ``trimmed`` and ``content`` views that are worth searching; with
    ``cells``, a composite's cells (``cell1`` … largest first); with ``grid``, ``grid1`` … ``grid5``."""
    grey, scale = analysis_copy(rgb)
    h, w = grey.shape
    out: dict[str, Box] = {}

    def to_source(box: Box) -> Box:
        return (int(box[0] * scale), int(box[1] * scale), min(rgb.shape[1], int(box[2] * scale)),
                min(rgb.shape[0], int(box[3] * scale)))
    if cells:
        for n, box in enumerate(cell_boxes(grey), 1):
            out[f"cell{n}"] = to_source(box)
    if grid:
        for n, box in enumerate(grid_boxes(rgb.shape[1], rgb.shape[0]), 1):
            out[f"grid{n}"] = box
    for name, box in (("trimmed", trim_box(grey)), ("content", content_box(grey))):
        if box is None:
            continue
        share = (box[2] - box[0]) * (box[3] - box[1]) / float(w * h)
        if not MIN_AREA <= share <= 1 - MIN_CUT:
            continue
        src = to_source(box)
        if any(_overlap(src, other) > 0.95 for other in out.values()):
            continue  # the same box twice is one view
        out[name] = src
    return out


def _overlap(a: Box, b: Box) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union else 0.0
