"""Confident learning over out-of-sample probabilities (pure: numpy + cleanlab, no Django).

rank_label_issues(labels, pred_probs) -> list[Issue], worst first.

`pred_probs` must be out-of-sample (each row from a model that never trained on that image: the engine's K-fold
output, training.engine.oof); in-sample probabilities memorise the noisy labels and hide them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

ESTIMATION_METHOD = "off_diagonal_calibrated"  # cleanlab's count of label issues: see rank_label_issues


@dataclass(frozen=True)
class Issue:
    index: int  # row in the inputs
    given: int  # class index of the given label
    suggested: int  # the model's most likely class
    suggested_prob: float
    quality: float  # cleanlab label quality score in [0, 1]: low = the given label is likely wrong


def rank_label_issues(labels, pred_probs, *, min_examples_per_class: int = 1) -> list[Issue]:
    """The rows cleanlab's confident learning flags as label issues, ranked by label quality (self-confidence,
    worst first).

    The queue is the `num_label_issues(estimation_method="off_diagonal_calibrated")` rows with the lowest
    self-confidence (`cleanlab.rank.get_label_quality_scores`): what `find_label_issues(filter_by=
    "low_self_confidence")` returns, with the confident joint calibrated to the given labels' counts before its
    off-diagonal is counted, which cleanlab documents as the cutoff to use with its ranking functions. The plain
    off-diagonal count under-estimates the errors when the out-of-fold model is less confident than it is right:
    on the grocery bench (10 % of fine labels flipped, quick out-of-fold heads, AUROC 0.999) it flagged 225 rows for
    264 flips (top-N recall 0.85); the calibrated count flagged 284 (top-N precision = recall 0.96). The default
    `prune_by_noise_rate` picks rows per (given, suggested) pair by margin, which loses precision (0.88 there).

    labels: (n,) ints in [0, K); pred_probs: (n, K), rows summing to 1. Rows with NaN probabilities (not
    predicted) are left out. Returns [] when fewer than two classes are present. ValueError on shape mismatch
    or labels out of range."""
    from cleanlab.count import num_label_issues  # noqa: PLC0415 - heavy import
    from cleanlab.rank import get_label_quality_scores  # noqa: PLC0415

    labels = np.asarray(labels)
    probs = np.asarray(pred_probs, dtype=np.float64)
    if probs.ndim != 2 or labels.ndim != 1 or len(labels) != len(probs):
        raise ValueError(f"labels (n,) and pred_probs (n, K) must match, got {labels.shape} and {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]})")
    keep = np.isfinite(probs).all(axis=1)
    rows = np.flatnonzero(keep)
    y, p = labels[keep].astype(int), probs[keep]
    if len(np.unique(y)) < 2 or len(y) < 2:
        return []
    p = np.clip(p, 1e-12, None)
    p = p / p.sum(axis=1, keepdims=True)
    # cleanlab needs every class column to have examples; drop columns nobody is labeled with (a model can
    # still suggest them, below, from the full probabilities)
    present = np.unique(y)
    remap = -np.ones(probs.shape[1], dtype=int)
    remap[present] = np.arange(len(present))
    p_sub = p[:, present]
    p_sub = p_sub / p_sub.sum(axis=1, keepdims=True)
    y_sub = remap[y]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about tiny classes; the ranking is still defined
        quality = get_label_quality_scores(y_sub, p_sub, method="self_confidence")
        n_issues = int(num_label_issues(y_sub, p_sub, estimation_method=ESTIMATION_METHOD))
    flagged = np.zeros(len(y), dtype=bool)
    flagged[np.argsort(quality, kind="stable")[:n_issues]] = True
    out = []
    for i in np.flatnonzero(flagged):
        suggested = int(np.argmax(p[i]))
        if suggested == y[i]:
            continue  # flagged for low confidence but the model agrees: nothing to suggest
        out.append(
            Issue(
                index=int(rows[i]),
                given=int(y[i]),
                suggested=suggested,
                suggested_prob=float(p[i, suggested]),
                quality=float(quality[i]),
            )
        )
    out.sort(key=lambda it: (it.quality, it.index))
    return out
