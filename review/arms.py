"""Did the active picks teach more than the random ones? An A/B of the low-confidence queue's two arms on one
trained model (pure: numpy + faiss, no Django).

The question the learning-curve page must answer is "accuracy against number of labels, active strategy vs
random arm". Training a second model per retrain (one on the active picks, one on as many random picks) doubles
the cost of every retrain; this asks the same question of what one training run leaves behind, with the model's
own retrieval classifier (inference.decision.vote, the served `retrieval` mode): the train split is the gallery,
the frozen test split the queries. Starting from the base gallery (every labelled train photo that did not come
from the queue), add the first n reviewed active picks, or the first n random-arm picks, in the order reviewers
labelled them, and measure test top-1 for n = 0 .. min(#active, #random). Both arms get the same n, so the
curves compare label for label; n = 0 is the same point for both. A label that fills a hole in the gallery moves
the curve; a label for a photo the gallery already covers does not.

What it does not measure: how the picks changed the network's weights (both arms were in its training set). The
curve is the payoff in the gallery the model serves with, measured after every retrain at the cost of one search
of the test split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.decision import vote

K_NEIGHBOURS = 20  # the served retrieval vote's k
MAX_TEST = 2000  # test photos scored (a seeded sample above this; the search is test x gallery)


def _normalised(x: np.ndarray) -> np.ndarray:
    import faiss  # noqa: PLC0415 - heavy import

    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def _rows(name: str, rows, n: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"{name} rows must be in [0, {n})")
    if len(np.unique(rows)) != len(rows):
        raise ValueError(f"{name} rows repeat")
    return rows


def arm_curve(
    gallery_emb,
    gallery_labels: Sequence[str | None],
    active: Sequence[int],
    random: Sequence[int],
    test_emb,
    test_labels: Sequence[str | None],
    *,
    steps: int = 5,
    k: int = K_NEIGHBOURS,
    max_test: int = MAX_TEST,
    seed: int = 0,
) -> dict:
    """Retrieval top-1 on the test photos with the gallery = base + the first n of each arm.

    gallery_emb (N, D) and gallery_labels (N,: a class name, or None for a photo unlabelled on this head) are the
    train split; `active` and `random` are gallery rows in the order they were labelled (disjoint, labelled);
    base = every other labelled row. test_emb (T, D), test_labels (T,): None rows are not scored.

    Returns {"n_base", "n_active", "n_random", "n_test", "points": [{"n", "active", "random"}]} with n = 0 ..
    min(n_active, n_random) in `steps` even steps (fewer when that is small); points is [] when either arm or
    the test set is empty. ValueError on mismatched shapes, rows out of range, repeated, shared by both arms or
    unlabelled."""
    g = np.asarray(gallery_emb, dtype=np.float32)
    q = np.asarray(test_emb, dtype=np.float32)
    if g.ndim != 2 or len(g) != len(gallery_labels):
        raise ValueError(f"gallery_emb (N, D) and gallery_labels (N,) must match, got {g.shape}, {len(gallery_labels)}")
    if q.ndim != 2 or len(q) != len(test_labels) or (len(q) and q.shape[1] != g.shape[1]):
        raise ValueError(
            f"test_emb (T, {g.shape[1]}) and test_labels (T,) must match, got {q.shape}, {len(test_labels)}"
        )
    if steps < 2 or k < 1:
        raise ValueError("steps must be >= 2 and k >= 1")
    active, random = _rows("active", active, len(g)), _rows("random", random, len(g))
    if np.intersect1d(active, random).size:
        raise ValueError("a row cannot be in both arms")
    labels = list(gallery_labels)
    if any(labels[i] is None for i in np.concatenate([active, random])):
        raise ValueError("every arm row must be labelled")
    in_arm = np.zeros(len(g), dtype=bool)
    in_arm[active] = in_arm[random] = True
    base = np.array([i for i in range(len(g)) if labels[i] is not None and not in_arm[i]], dtype=np.int64)
    scored = np.array([i for i, lbl in enumerate(test_labels) if lbl is not None], dtype=np.int64)
    if len(scored) > max_test:
        scored = np.sort(np.random.default_rng(seed).choice(scored, size=max_test, replace=False))
    out = {
        "n_base": len(base),
        "n_active": len(active),
        "n_random": len(random),
        "n_test": len(scored),
        "points": [],
    }
    n_max = min(len(active), len(random))
    if n_max == 0 or len(scored) == 0:
        return out
    import faiss  # noqa: PLC0415

    qn = _normalised(q[scored])
    if len(base):
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(_normalised(g[base]))
        b_sims, b_nn = index.search(qn, min(k, len(base)))
    else:
        b_sims, b_nn = np.zeros((len(scored), 0), np.float32), np.zeros((len(scored), 0), np.int64)
    # the arms are small next to the base: their similarities to every query are one matrix product
    arm_rows = {"active": active[:n_max], "random": random[:n_max]}
    arm_sims = {arm: qn @ _normalised(g[rows]).T for arm, rows in arm_rows.items()}
    truth = [test_labels[i] for i in scored]
    ns = sorted({int(round(x)) for x in np.linspace(0, n_max, steps)})
    for n in ns:
        point = {"n": n}
        for arm, rows in arm_rows.items():
            right = 0
            for t in range(len(scored)):
                ok = b_nn[t] >= 0
                cand_labels = [labels[base[j]] for j in b_nn[t][ok]]
                cand_sims = list(b_sims[t][ok])
                if n:
                    s = arm_sims[arm][t, :n]
                    top = np.argpartition(-s, min(k, n) - 1)[: min(k, n)] if n > k else np.arange(n)
                    cand_labels += [labels[rows[j]] for j in top]
                    cand_sims += list(s[top])
                scores = vote(cand_labels, cand_sims, k=k) if cand_labels else {}
                if scores and min(scores, key=lambda c: (-scores[c], c)) == truth[t]:
                    right += 1
            point[arm] = round(right / len(scored), 4)
        out["points"].append(point)
    return out
