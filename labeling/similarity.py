"""Leakage by similarity (pure: numpy + faiss, no Django): which photos of one class are so alike that they must
stay on one side of a split, and the groups that follow.

Group keys (file-name IDs, folders) miss consecutive shots of one product in one session: different files, different
names, nearly the same photo. When such shots land in train and test, the test figure measures recall of the
training photos rather than recognition of new ones (on grocery-store, a split by photo scores 25 points of top-1
above photos from other shopping sessions; bench/leakage.py).

The rule, with a threshold calibrated on the data per pair: pooled features of a pretrained backbone, centred on the
project's mean and L2-normalised; for every photo its *impostor level*, the cosine similarity of its nearest photo
with another label (what two different products can look like in this project's photos: same store, same hand,
same light). Two photos with the same label are a leak pair when their similarity exceeds both photos' impostor
levels by `margin`: they are more alike than anything of another class is to either of them. Photos without a
label never pair. Leak pairs are joined transitively (single linkage) into components that never cross splits.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

LEAK_MARGIN = 0.05  # measured on grocery-store (bench/leakage.py): 0 over-merges, 0.1 leaves most of the leak
NEIGHBOURS = 50  # neighbours searched per photo; the impostor is the first one with another label
EXACT_MAX = 20_000  # photos searched exactly (IndexFlatIP, O(n^2 d)); above, faiss HNSW (approximate, ~n log n)


@dataclass
class LeakPairs:
    """pairs: (m, 2) int row indices (i < j); similarity: (m,) float32; impostor: (n,) each row's impostor level
    (nan for rows without a label); stats: counts and parameters for reports."""

    pairs: np.ndarray
    similarity: np.ndarray
    impostor: np.ndarray
    stats: dict


def _unit_centred(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    X = X - X.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(norms, 1e-12), dtype=np.float32)


def leak_pairs(
    X: np.ndarray,
    labels: Sequence[Hashable | None],
    *,
    margin: float = LEAK_MARGIN,
    neighbours: int = NEIGHBOURS,
    exact_max: int = EXACT_MAX,
) -> LeakPairs:
    """The leak pairs among the rows of X (n, d) with their labels (None: unlabeled, never paired). The search is
    exact (faiss IndexFlatIP) over the `neighbours` nearest photos of each; a photo with no other-label photo among
    them takes the farthest one's similarity as its impostor level (an upper bound: fewer pairs, never more).
    Above `exact_max` photos the search is faiss HNSW (M 32, efSearch 4 x neighbours): a 57,000-photo project
    would otherwise cost 57,000^2 dot products of 1,280 numbers."""
    import faiss  # noqa: PLC0415 - the health scan imports this module; faiss only when it runs

    n = len(labels)
    if X.shape[0] != n:
        raise ValueError(f"{X.shape[0]} feature rows for {n} labels")
    empty = LeakPairs(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.full(n, np.nan, np.float32), {})
    if n < 2:
        empty.stats = {"photos": n, "pairs": 0, "margin": margin, "neighbours": neighbours}
        return empty
    codes = {}
    lab = np.array([-1 if y is None else codes.setdefault(y, len(codes)) for y in labels], dtype=np.int64)
    Xu = _unit_centred(X)
    k = min(neighbours + 1, n)
    if n <= exact_max:
        index = faiss.IndexFlatIP(Xu.shape[1])
    else:
        index = faiss.IndexHNSWFlat(Xu.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = max(64, 4 * k)
    index.add(Xu)
    sims, nbrs = index.search(Xu, k)
    valid = (nbrs >= 0) & (nbrs != np.arange(n)[:, None])
    nbr_lab = np.where(nbrs >= 0, lab[np.clip(nbrs, 0, None)], -1)
    other = valid & (nbr_lab != lab[:, None]) & (nbr_lab >= 0)
    first_other = np.where(other.any(axis=1), other.argmax(axis=1), -1)
    impostor = np.where(first_other >= 0, sims[np.arange(n), np.clip(first_other, 0, None)], sims[:, -1])
    impostor = np.where(lab >= 0, impostor, np.nan).astype(np.float32)
    same = valid & (nbr_lab == lab[:, None]) & (lab[:, None] >= 0)
    rows, cols = np.nonzero(same)
    a, b = rows, nbrs[rows, cols]
    s = sims[rows, cols]
    keep = s > np.maximum(impostor[a], impostor[b]) + margin
    a, b, s = a[keep], b[keep], s[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if len(lo):
        order = np.lexsort((hi, lo))
        lo, hi, s = lo[order], hi[order], s[order]
        first = np.ones(len(lo), bool)
        first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        lo, hi, s = lo[first], hi[first], s[first]
    labeled = lab >= 0
    return LeakPairs(
        pairs=np.stack([lo, hi], axis=1).astype(np.int64) if len(lo) else np.zeros((0, 2), np.int64),
        similarity=s.astype(np.float32),
        impostor=impostor,
        stats={
            "photos": n,
            "labeled": int(labeled.sum()),
            "pairs": int(len(lo)),
            "photos_in_pairs": int(len(np.union1d(lo, hi))) if len(lo) else 0,
            "margin": margin,
            "neighbours": neighbours,
            "search": "exact" if n <= exact_max else "hnsw",
            "impostor_median": float(np.nanmedian(impostor)) if labeled.any() else None,
        },
    )


def merge_groups(groups: Iterable[Hashable], links: Iterable[tuple[Hashable, Hashable]]) -> dict:
    """Union-find over group keys: {group: component representative} where linked groups share the smallest key
    (by str) of their component. Links naming unknown groups are ignored."""
    parent = {g: g for g in groups}

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in links:
        if a not in parent or b not in parent:
            continue
        ra, rb = find(a), find(b)
        if ra != rb:
            if str(rb) < str(ra):
                ra, rb = rb, ra
            parent[rb] = ra
    return {g: find(g) for g in parent}
