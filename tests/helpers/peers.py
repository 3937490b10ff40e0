"""What the hash tests share with their peers' tests: how far two PDQ implementations may disagree, and a
re-upload of the kind PDQ is made for."""
from __future__ import annotations

from PIL import Image

from tests.helpers import encode

# Same picture, two PDQ implementations or two resolutions: a few bits apart (PDQ's authors report 0–10
# for resizes and re-encodes); unrelated pictures sit near 128. Half the match threshold is a wide margin.
PEER_TOLERANCE = 16


def transformed(im: Image.Image) -> bytes:
    """A re-upload: scaled to 70 %, brightened, JPEG quality 40 (PDQ's kind of edit: a crop of even 3 %
    moves a PDQ hash past its threshold — that is the embedding's work, see benchmarks/match.py)."""
    w, h = im.size
    im = im.convert("RGB").resize((int(w * 0.7), int(h * 0.7)), Image.BILINEAR)
    im = Image.eval(im, lambda v: min(255, int(v * 1.08) + 4))
    return encode(im, "JPEG", quality=40)
