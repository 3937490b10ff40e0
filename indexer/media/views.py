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
only when the whole image found nothing confident (``search.service``). A frame without gutters may still hold
a picture pasted over another (an inset): a rectangle whose four sides are long straight edges — a step in
colour along nearly all of each side — around a textured inside is a view of its own (``inset1``, ``inset2``:
``inset_boxes``), and a hit through it is verified on the inset's own pixels (``search.service``).

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
# Insets, on the analysis copy. Match benchmark (300 collages, about half of them a photo pasted at 35–50 % of the
# width over another; 150 uploads that copy nothing; 300 crops of 80 %): with these values an inset is found in 98
# collages without gutters, 6 plain uploads and 3 crops. Grey-level steps (not colour) found 100 / 6 / 6 but missed
# sides along which two colours of one brightness meet; without the peak rule (``_steps``) a busy texture's steps,
# large everywhere, drew rectangles through pictures butted together. A side's share at 85 % found 114 collages and
# 7 % of plain uploads, at 95 % 100 and 3 % (grey steps).
INSET_STEP = 24.0     # levels in any colour channel between neighbouring pixels (a JPEG-softened paste keeps ~30)
INSET_SUPPORT = 0.9   # share of each side along which the edge runs (within a pixel)
INSET_TOL = 0.03      # of the width (at least 3 px): how far a vertical side may sit from where the horizontal ones end
INSET_TEXTURE = 0.15  # share of the inside's 8 × 8 blocks that are textured: a picture, not a drawn rectangle
MAX_INSETS = 2        # the largest insets kept
MAX_LINES = 64        # the longest horizontal edges paired (a photo's straight edges are few)


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


def _lines(step: np.ndarray, min_len: int) -> list[tuple[int, int, int]]:
    """Horizontal runs of edge pixels in ``step`` (a gap of up to two pixels bridged), as (row, start, end),
    at least ``min_len`` long, the longest ``MAX_LINES``."""
    closed = ndimage.binary_closing(step, structure=np.ones((1, 5), bool)) | step
    labels, _ = ndimage.label(closed, structure=np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], bool))
    runs = [(sl[0].start, sl[1].start, sl[1].stop) for sl in ndimage.find_objects(labels)
            if sl is not None and sl[1].stop - sl[1].start >= min_len]
    return sorted(runs, key=lambda r: r[1] - r[2])[:MAX_LINES]


def _steps(diff: np.ndarray) -> np.ndarray:
    """Edge pixels of a map of steps between rows (``diff[y]``: row y to y + 1): at least ``INSET_STEP`` and
    no smaller than the steps just above and below — the line where a pasted picture's side is, not every pixel
    of a busy texture (whose steps are large everywhere, their peaks scattered)."""
    pad = np.pad(diff, ((1, 1), (0, 0)))
    return (diff > INSET_STEP) & (diff >= 0.6 * pad[:-2]) & (diff >= 0.6 * pad[2:])


def inset_boxes(grey: np.ndarray, colour: np.ndarray | None = None) -> list[Box]:
    """Pictures pasted into the frame (analysis pixels), largest first: rectangles at least ``CELL_MIN_SIDE`` of
    the frame each way and at most the frame less ``MIN_CUT``, whose top and bottom are horizontal edges and whose
    left and right are vertical edges along ``INSET_SUPPORT`` of their length, with a textured inside. An edge
    pixel is a step of ``INSET_STEP`` in any of ``colour``'s channels (the grey levels without it): two colours
    of one brightness meet along a pasted picture's side more often than not."""
    h, w = grey.shape
    if h < 32 or w < 32:
        return []
    g = grey.astype(np.float32)
    c = (colour if colour is not None and colour.shape[:2] == grey.shape else g).astype(np.float32)
    if c.ndim == 2:
        c = c[..., None]
    across = _steps(np.abs(np.diff(c, axis=0)).max(axis=2))        # [h-1, w]: a step between rows y and y+1
    down = np.zeros((h, w + 1), bool)                                 # a step at column boundary x, ±1 px
    down[:, 1:-1] = _steps(np.abs(np.diff(c, axis=1)).max(axis=2).T).T
    down[:, 1:] |= down[:, :-1].copy()
    down[:, :-1] |= down[:, 1:].copy()
    run_down = np.vstack([np.zeros((1, w + 1), np.int32), np.cumsum(down, axis=0, dtype=np.int32)])
    run_across = np.hstack([np.zeros((h - 1, 1), np.int32), np.cumsum(across, axis=1, dtype=np.int32)])
    bh, bw = h // BLOCK, w // BLOCK
    blocks = g[: bh * BLOCK, : bw * BLOCK].reshape(bh, BLOCK, bw, BLOCK).std(axis=(1, 3)) >= TEXTURE_STD
    lines = _lines(across, int(CELL_MIN_SIDE * w))
    tol = max(3, round(INSET_TOL * w))
    found: list[tuple[float, Box]] = []
    for i, (ya, a0, a1) in enumerate(lines):
        for yb, b0, b1 in lines[i + 1:]:
            top, bottom = min(ya, yb) + 1, max(ya, yb) + 1  # the box's rows: below one step, down to the other
            if bottom - top < CELL_MIN_SIDE * h:
                continue
            x0, x1 = max(a0, b0), min(a1, b1)
            if x1 - x0 < CELL_MIN_SIDE * w:
                continue
            height = bottom - top
            cols = np.arange(max(0, x0 - tol), min(w, x1 + tol) + 1)
            side = (run_down[bottom, cols] - run_down[top, cols]) / height  # each column's vertical edge share
            left = cols[(cols <= x0 + tol) & (side >= INSET_SUPPORT)]
            right = cols[(cols >= x1 - tol) & (side >= INSET_SUPPORT)]
            if not len(left) or not len(right):
                continue
            lx, rx = int(left.min()), int(right.max())  # the widest box both lines and both sides support
            if rx - lx < CELL_MIN_SIDE * w or (rx - lx) * height > (1 - MIN_CUT) * w * h:
                continue
            if any((run_across[y, rx] - run_across[y, lx]) / (rx - lx) < INSET_SUPPORT
                   for y in (top - 1, bottom - 1)):
                continue
            # the blocks wholly inside, a block in from each side (a block astride a side is textured by the edge)
            inside = blocks[-(-top // BLOCK) + 1: bottom // BLOCK - 1, -(-lx // BLOCK) + 1: rx // BLOCK - 1]
            if not inside.size or inside.mean() < INSET_TEXTURE:
                continue
            found.append(((rx - lx) * height, (lx, top, rx, bottom)))
    out: list[Box] = []
    for _, box in sorted(found, key=lambda f: -f[0]):
        if all(_overlap(box, o) < 0.8 for o in out):
            out.append(box)
    return out[:MAX_INSETS]


def grid_boxes(w: int, h: int) -> list[Box]:
    """The four quadrants and the centre half of a w × h frame (source pixels), each at least
    ``GRID_MIN_SIDE`` both ways."""
    hw, hh = w // 2, h // 2
    boxes = [(0, 0, hw, hh), (hw, 0, w, hh), (0, hh, hw, h), (hw, hh, w, h), (w // 4, h // 4, w - w // 4, h - h // 4)]
    return [b for b in boxes if min(b[2] - b[0], b[3] - b[1]) >= GRID_MIN_SIDE]


def view_boxes(rgb: np.ndarray, *, cells: bool = False, grid: bool = False) -> dict[str, Box]:
    """The source-pixel boxes of the ``trimmed`` and ``content`` views that are worth searching; with
    ``cells``, a composite's cells (``cell1`` … largest first) or, without gutters, the pictures pasted into it
    (``inset1``, ``inset2``); with ``grid``, ``grid1`` … ``grid5``."""
    grey, scale = analysis_copy(rgb)
    h, w = grey.shape
    step = int(scale)
    out: dict[str, Box] = {}

    def to_source(box: Box) -> Box:
        return (int(box[0] * scale), int(box[1] * scale), min(rgb.shape[1], int(box[2] * scale)),
                min(rgb.shape[0], int(box[3] * scale)))
    if cells:
        for n, box in enumerate(cell_boxes(grey), 1):
            out[f"cell{n}"] = to_source(box)
        if not out:
            for n, box in enumerate(inset_boxes(grey, rgb[::step, ::step] if rgb.ndim == 3 else None), 1):
                out[f"inset{n}"] = to_source(box)
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
