"""Active learning for the review queue (pure: numpy only, no Django).

uncertainty(probs, strategy) -> (n,) scores in [0, 1], higher = more uncertain.
k_center_greedy(embeddings, k, ...) -> indices that cover the embedding space (Sener & Savarese 2018).
select_batch(probs, embeddings, ...) -> [(row, is_random_control, score)]: diverse uncertain rows plus a uniformly
random control arm, so the gain from active selection can be measured against random labeling."""

from __future__ import annotations

import operator

import numpy as np

STRATEGIES = ("least_confidence", "margin", "entropy")

# Squared distances (unit vectors: in [0, 4]) within this of the largest count as ties, so that duplicates and
# near-duplicates tie exactly and the lowest candidate position wins instead of floating-point noise.
TIE_TOL = 1e-9
_CHUNK = 1 << 22  # elements per block of the candidates x already distance matrix


def uncertainty(probs: np.ndarray, strategy: str) -> np.ndarray:
    """Per-row uncertainty in [0, 1] (1 = uniform, 0 = one-hot) of (n, K) class probabilities.

    Rows are renormalised to sum to 1. `strategy`: "least_confidence" (1 - max p, scaled by K/(K-1)), "margin"
    (1 - (top1 - top2)) or "entropy" (-sum p log p / log K). K = 1 scores 0. ValueError for an unknown strategy,
    probs that are not 2-D or have no column, and rows with non-finite or negative entries or a non-positive sum."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    p = np.array(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, K), got shape {p.shape}")
    n, k = p.shape
    if k == 0 and n:
        raise ValueError("probs must have at least one column (class)")
    bad = ~np.isfinite(p).all(axis=1) | (p < 0).any(axis=1)
    if bad.any():
        raise ValueError(f"probs row {int(np.argmax(bad))} has non-finite or negative entries")
    sums = p.sum(axis=1)
    if (sums <= 0).any():
        raise ValueError(f"probs row {int(np.argmax(sums <= 0))} has a non-positive sum")
    if n == 0 or k == 1:
        return np.zeros(n, dtype=np.float64)
    p /= sums[:, None]
    if strategy == "least_confidence":
        scores = (1.0 - p.max(axis=1)) * (k / (k - 1))
    elif strategy == "margin":
        top2 = np.partition(p, k - 2, axis=1)[:, -2:]
        scores = 1.0 - (top2[:, 1] - top2[:, 0])
    else:
        plogp = p * np.log(np.where(p > 0, p, 1.0))  # 0 log 0 = 0
        scores = -plogp.sum(axis=1) / np.log(k)
    return np.clip(scores, 0.0, 1.0)


def _index_array(values, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.intp)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D array of integer row indices")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{name} has indices outside [0, {n})")
    return arr.astype(np.intp)


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.array(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings must be finite")
    norms = np.linalg.norm(x, axis=1)
    nonzero = norms > 0
    x[nonzero] /= norms[nonzero, None]
    return x


def k_center_greedy(
    embeddings: np.ndarray,
    k: int,
    *,
    candidates: np.ndarray | None = None,
    already: np.ndarray | None = None,
    first: int | None = None,
) -> list[int]:
    """Greedy k-center: up to k row indices from `candidates` (default: all rows), each the candidate farthest
    (Euclidean, on L2-normalised rows; zero rows stay zero) from the rows picked so far and the `already` rows.

    `already` rows (e.g. labeled items) count as picked but are never returned; candidates among them are skipped.
    The first pick is `first` when given (it must be a candidate not in `already`), else the farthest candidate
    from `already`, or candidates[0] when `already` is empty. Ties (squared distances within TIE_TOL) go to the
    lowest position in `candidates`. Returns min(k, number of eligible candidates) distinct indices in pick order.
    O(k * n * d) time, O(n * d) memory."""
    x = _unit_rows(embeddings)
    n = len(x)
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    cand = np.arange(n, dtype=np.intp) if candidates is None else _index_array(candidates, n, "candidates")
    if len(np.unique(cand)) != len(cand):
        raise ValueError("candidates must not contain duplicates")
    done = np.zeros(0, dtype=np.intp) if already is None else np.unique(_index_array(already, n, "already"))
    if first is not None:
        first = operator.index(first)
        if first not in set(cand.tolist()):
            raise ValueError(f"first={first} is not among the candidates")
        if first in set(done.tolist()):
            raise ValueError(f"first={first} is already labeled")
    if len(done):
        cand = cand[~np.isin(cand, done)]
    k = min(k, len(cand))
    if k == 0:
        return []

    xc = x[cand]  # contiguous copy: the hot loop streams it once per pick
    sq = np.einsum("ij,ij->i", xc, xc)  # 1 for unit rows, 0 for zero rows
    mind = np.full(len(cand), np.inf)
    if len(done):
        xd = x[done]
        sq_d = np.einsum("ij,ij->i", xd, xd)
        step = max(1, _CHUNK // len(cand))
        for s in range(0, len(xd), step):
            d2 = sq[:, None] + sq_d[None, s : s + step] - 2.0 * (xc @ xd[s : s + step].T)
            np.minimum(mind, d2.min(axis=1), out=mind)

    picks: list[int] = []
    pos = int(np.flatnonzero(cand == first)[0]) if first is not None else None
    for _ in range(k):
        if pos is None:
            pos = int(np.argmax(mind >= mind.max() - TIE_TOL))  # first position within the tie tolerance
        picks.append(int(cand[pos]))
        d2 = sq + sq[pos] - 2.0 * (xc @ xc[pos])
        np.minimum(mind, d2, out=mind)
        mind[pos] = -np.inf  # never again
        pos = None
    return picks


def select_batch(
    probs: np.ndarray,
    embeddings: np.ndarray,
    *,
    strategy: str,
    size: int,
    random_share: float = 0.1,
    pool_factor: int = 10,
    labeled_embeddings: np.ndarray | None = None,
    seed: int = 0,
) -> list[tuple[int, bool, float]]:
    """The next rows to label: [(row, is_random_control, uncertainty score)], active picks first (in pick order),
    then the random control rows (in draw order); min(size, n) distinct rows.

    round(min(size, n) * random_share) rows are drawn uniformly from all rows (np.random.default_rng(seed)). The
    rest come from the pool_factor * n_active most uncertain remaining rows (ties: lower row), diversified by
    k_center_greedy starting at the most uncertain one, with `labeled_embeddings` counting as already picked.
    ValueError for bad arguments or mismatched shapes."""
    size = operator.index(size)
    pool_factor = operator.index(pool_factor)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    return select_by_scores(
        uncertainty(probs, strategy),
        embeddings,
        size=size,
        random_share=random_share,
        pool_factor=pool_factor,
        labeled_embeddings=labeled_embeddings,
        seed=seed,
    )


def select_by_scores(
    scores: np.ndarray,
    embeddings: np.ndarray,
    *,
    size: int,
    random_share: float = 0.1,
    pool_factor: int = 10,
    labeled_embeddings: np.ndarray | None = None,
    seed: int = 0,
) -> list[tuple[int, bool, float]]:
    """select_batch with the uncertainty already computed: (n,) scores in [0, 1], higher = more uncertain (e.g.
    the most uncertain of an image's unlabeled heads, whose class counts differ)."""
    size = operator.index(size)
    pool_factor = operator.index(pool_factor)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a 1-D array of finite numbers, got shape {scores.shape}")
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or len(emb) != len(scores):
        raise ValueError(f"embeddings must be (n, d) with the {len(scores)} rows of probs, got shape {emb.shape}")
    labeled = None
    if labeled_embeddings is not None:
        labeled = np.asarray(labeled_embeddings, dtype=np.float64)
        if labeled.ndim != 2 or labeled.shape[1] != emb.shape[1]:
            raise ValueError(
                f"labeled_embeddings must be (m, {emb.shape[1]}) like embeddings, got shape {labeled.shape}"
            )
    n = len(scores)
    total = min(size, n)
    if total == 0:
        return []

    n_random = round(total * random_share)
    rng = np.random.default_rng(seed)
    random_rows = rng.choice(n, size=n_random, replace=False) if n_random else np.zeros(0, dtype=np.intp)
    n_active = total - n_random
    active: list[int] = []
    if n_active:
        rest = np.setdiff1d(np.arange(n), random_rows)  # ascending, so the stable sort breaks ties by lower row
        pool = rest[np.argsort(-scores[rest], kind="stable")][: pool_factor * n_active]
        pool_emb = emb[pool]
        already = None
        if labeled is not None and len(labeled):
            pool_emb = np.vstack([pool_emb, labeled])
            already = np.arange(len(pool), len(pool_emb))
        picked = k_center_greedy(pool_emb, n_active, candidates=np.arange(len(pool)), already=already, first=0)
        active = [int(pool[i]) for i in picked]
    return [(r, False, float(scores[r])) for r in active] + [(int(r), True, float(scores[r])) for r in random_rows]
