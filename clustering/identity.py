"""Stable cluster identity across runs: each new cluster is matched to the previous run's clusters by
member overlap, so it keeps its id (and its human-given name, label and review) when it is "the same
cluster", and the change is named: new, grown, shrunk, stable, merged, split; unmatched old clusters
have vanished."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# A new cluster inherits an old identity when it holds >= 30 % of the old cluster's members or the
# old cluster makes up >= 50 % of it. An old cluster "went into" a new one when >= 50 % of it did
# (two or more such sources: a merge); it "split" when >= 2 new clusters each hold >= 20 % of it.
INHERIT_OF_OLD, INHERIT_OF_NEW, SOURCE_SHARE, PIECE_SHARE = 0.3, 0.5, 0.5, 0.2
GROWTH = 0.1


@dataclass
class Match:
    identity: int | None  # None: a new identity
    change: str
    prev_size: int | None


@dataclass
class Matching:
    matches: list[Match]
    vanished: list[int]
    merged_into: dict[int, int | None] = field(default_factory=dict)  # old identity → new cluster index

    def summary(self) -> dict[str, int]:
        c = Counter(m.change for m in self.matches)
        return {k: int(c.get(k, 0)) for k in ("new", "grown", "shrunk", "stable", "merged", "split")} | {
            "vanished": len(self.vanished)}


def match_clusters(new: list[set[int]], prev: dict[int, set[int]]) -> Matching:
    """``new``: member sets of this run's clusters; ``prev``: identity → member set of the previous run."""
    overlap: dict[tuple[int, int], int] = {}
    owner = {img: p for p, members in prev.items() for img in members}
    for c, members in enumerate(new):
        counts = Counter(owner[i] for i in members if i in owner)
        for p, n in counts.items():
            overlap[(c, p)] = n
    assigned: dict[int, int] = {}
    used: set[int] = set()
    for (c, p), ov in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if c in assigned or p in used:
            continue
        if ov >= INHERIT_OF_OLD * len(prev[p]) or ov >= INHERIT_OF_NEW * len(new[c]):
            assigned[c] = p
            used.add(p)
    sources: dict[int, list[int]] = {c: [] for c in range(len(new))}
    pieces: dict[int, list[int]] = {p: [] for p in prev}
    for (c, p), ov in overlap.items():
        if ov >= SOURCE_SHARE * len(prev[p]):
            sources[c].append(p)
        if ov >= PIECE_SHARE * len(prev[p]):
            pieces[p].append(c)
    matches: list[Match] = []
    for c, members in enumerate(new):
        p = assigned.get(c)
        if p is None:
            split_from = [q for q in prev if c in pieces[q] and len(pieces[q]) >= 2]
            matches.append(Match(None, "split" if split_from else "new", None))
            continue
        size, before = len(members), len(prev[p])
        if len(sources[c]) >= 2:
            change = "merged"
        elif len(pieces[p]) >= 2:
            change = "split"
        elif size >= before * (1 + GROWTH) and size > before:
            change = "grown"
        elif size <= before * (1 - GROWTH) and size < before:
            change = "shrunk"
        else:
            change = "stable"
        matches.append(Match(p, change, before))
    merged_into = {p: c for c, ps in sources.items() if len(ps) >= 2 for p in ps if p not in used}
    vanished = sorted(p for p in prev if p not in used and p not in merged_into)
    return Matching(matches, vanished, merged_into)
