"""Honest per-head decisions for the recognition endpoint (pure numpy/scipy: no Django, no torch).

The endpoint receives 1-10 photos of ONE object. For every head it has the model's softmax probabilities (already
combined over the photos, see ``combine_views``) and, from the Faiss gallery (inner product on L2-normalised
embeddings, i.e. cosine similarity ``s`` in [-1, 1]), the top neighbours with their gallery class labels. The
functions here turn that evidence into a ``Decision``: a label, or no label with a reason, which the endpoint maps
to "unclassifiable" / "reshoot". Every threshold is a parameter; ``calibrate_*`` and ``fit_temperature`` choose
them on validation data.

Conventions used throughout:

* distance ``d = max(0, 1 - s)`` (cosine distance; ``s`` slightly above 1 from float error gives 0);
* scores are ``{class: score}`` dicts that sum to 1 when non-empty;
* the best class is the highest score, ties broken by the class name (smallest first), so decisions are
  deterministic; the margin is ``best - second`` (``second`` = 0 when there is a single class);
* a confidence / score is accepted when ``score >= threshold``; a distance when ``d <= max_distance``; a margin
  when ``margin >= min_margin`` (so ``min_margin=0`` accepts exact ties, resolved by the class name).

Public API::

    REASONS = ("low_confidence", "too_far", "ambiguous", "no_neighbours")
    @dataclass(frozen=True) class Decision: label, confidence, reason, scores; accepted (property); as_dict()
    softmax(logits, T=1.0) -> np.ndarray
    vote(neighbour_labels, similarities, *, k=20, eps=1e-6) -> dict[str, float]
    retrieval_evidence(neighbour_labels, similarities, *, k=20, eps=1e-6) -> RetrievalEvidence(scores, top1_distance,
        margin)
    retrieval_decision(neighbour_labels, similarities, *, k=20, max_distance, min_margin, min_confidence=0.0,
        eps=1e-6) -> Decision
    softmax_decision(probs, classes, *, threshold, min_margin=0.0) -> Decision
    scores_decision(scores, *, threshold, min_margin=0.0) -> Decision
    fuse(p_softmax, p_retrieval, *, weight=0.5) -> dict[str, float]
    combine_views(per_view_probs, *, mode="mean") -> np.ndarray      # modes: "mean", "vote", "geometric"
    fit_temperature(logits, targets, *, bounds=(0.05, 20.0)) -> float
    calibrate_thresholds(scores_correct, scores_wrong, *, target_precision=0.95) -> float
    calibrate_retrieval(top1_distances_correct, top1_distances_wrong, margins_correct, margins_wrong, *,
        target_precision=0.95, max_grid=256) -> {"max_distance", "min_margin", "precision", "coverage"}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

REASONS = ("low_confidence", "too_far", "ambiguous", "no_neighbours")
COMBINE_MODES = ("mean", "vote", "geometric")

# combine_views(mode="vote"): weight of the mean probability blended into the vote shares to break tied counts.
VOTE_TIE_WEIGHT = 1e-3
# combine_views(mode="geometric"): probabilities are floored here before the log, so a hard 0 vetoes but never NaNs.
GEOMETRIC_FLOOR = 1e-12


@dataclass(frozen=True)
class Decision:
    """The outcome for one head.

    label: the answer, or None when the head gives no answer.
    confidence: in [0, 1]; the score of the best class (also filled in when rejected, for display/logging).
    reason: None when a label is given, else one of REASONS.
    scores: class -> score the decision was made on (sums to 1 when non-empty).
    """

    label: str | None
    confidence: float
    reason: str | None
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.label is None) == (self.reason is None):
            raise ValueError("a Decision has exactly one of label and reason")
        if self.reason is not None and self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}; expected one of {REASONS}")
        if not (0.0 <= self.confidence <= 1.0):
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")

    @property
    def accepted(self) -> bool:
        return self.label is not None

    def as_dict(self) -> dict:
        return {"label": self.label, "confidence": self.confidence, "reason": self.reason, "scores": dict(self.scores)}


class RetrievalEvidence(NamedTuple):
    """What retrieval_decision decides on; calibrate_retrieval must be fed the same numbers.

    scores: vote() of the top-k neighbours ({} when no labelled neighbour is among them).
    top1_distance: distance of the nearest LABELLED neighbour among the top-k (inf when none).
    margin: best score - second best score (second = 0 with a single class; 0.0 when scores is empty).
    """

    scores: dict[str, float]
    top1_distance: float
    margin: float


# --------------------------------------------------------------------------------------------------- helpers


def _clip01(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def _ranked(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """Classes by score descending, ties by class name ascending."""
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def _best_and_margin(scores: Mapping[str, float]) -> tuple[str | None, float, float]:
    ranked = _ranked(scores)
    if not ranked:
        return None, 0.0, 0.0
    best, top = ranked[0]
    second = ranked[1][1] if len(ranked) > 1 else 0.0
    return best, float(top), float(top - second)


def _check_fraction(name: str, value: float, *, low_open: bool = False) -> None:
    if not math.isfinite(value) or value > 1.0 or value < 0.0 or (low_open and value == 0.0):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1], got {value}")


def _as_1d(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    return arr


def _normalised(scores: Mapping[str, float], name: str) -> dict[str, float]:
    out = {}
    for cls, v in scores.items():
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}[{cls!r}] must be finite and >= 0, got {v}")
        out[cls] = v
    total = sum(out.values())
    if total <= 0:
        return {}
    return {cls: v / total for cls, v in out.items()}


# --------------------------------------------------------------------------------------------------- softmax


def softmax(logits, T: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / T`` along the last axis (float64).

    T must be finite and > 0 (ValueError otherwise). Rows of -inf only are not supported (they give NaN).
    """
    T = float(T)
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {T}")
    z = np.asarray(logits, dtype=np.float64) / T
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------- retrieval


def _top_k(neighbour_labels: Sequence[str | None], similarities: Sequence[float], k: int) -> list[tuple[float, str]]:
    """The labelled neighbours among the k most similar, as (distance, label), in a canonical order.

    The k most similar are chosen over ALL neighbours (unknown-label ones occupy a slot but do not vote). The sort
    key is (similarity desc, labelled first, label asc), so the choice, including ties at the k-th place, does not
    depend on the order the neighbours were given in.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = list(neighbour_labels)
    sims = _as_1d("similarities", similarities)
    if len(labels) != sims.shape[0]:
        raise ValueError(f"{len(labels)} labels but {sims.shape[0]} similarities")
    order = sorted(range(len(labels)), key=lambda i: (-sims[i], labels[i] is None, labels[i] or ""))
    out = []
    for i in order[:k]:
        if labels[i] is not None:
            out.append((max(0.0, 1.0 - float(sims[i])), str(labels[i])))
    return out


def vote(
    neighbour_labels: Sequence[str | None], similarities: Sequence[float], *, k: int = 20, eps: float = 1e-6
) -> dict[str, float]:
    """Inverse-distance weighted vote of the top-k neighbours.

    neighbour_labels[i] is the gallery class of neighbour i for this head (None = unknown in the gallery),
    similarities[i] its cosine similarity to the query. The k most similar neighbours are kept (None-labelled ones
    take a slot but are skipped in the vote; ties at the k-th place are broken canonically, see ``_top_k``); each
    labelled one votes for its class with weight ``1 / (d + eps)``, ``d = max(0, 1 - s)``.

    Returns {class: weight share}, summing to 1; {} when nothing votes. The result does not depend on the order of
    the neighbours. ValueError for k < 1, eps <= 0, non-finite similarities or mismatched lengths.
    """
    return _vote(_top_k(neighbour_labels, similarities, k), eps)


def _vote(voters: list[tuple[float, str]], eps: float) -> dict[str, float]:
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    weights: dict[str, float] = {}
    for d, label in voters:  # canonical order: the sums do not depend on the input order
        weights[label] = weights.get(label, 0.0) + 1.0 / (d + eps)
    total = sum(weights.values())
    if total <= 0:
        return {}
    return {label: w / total for label, w in weights.items()}


def retrieval_evidence(
    neighbour_labels: Sequence[str | None], similarities: Sequence[float], *, k: int = 20, eps: float = 1e-6
) -> RetrievalEvidence:
    """The (scores, top1_distance, margin) that ``retrieval_decision`` uses; feed the same to calibrate_retrieval."""
    voters = _top_k(neighbour_labels, similarities, k)
    scores = _vote(voters, eps)
    top1 = min((d for d, _ in voters), default=math.inf)
    _, _, margin = _best_and_margin(scores)
    return RetrievalEvidence(scores, float(top1), margin)


def retrieval_decision(
    neighbour_labels: Sequence[str | None],
    similarities: Sequence[float],
    *,
    k: int = 20,
    max_distance: float,
    min_margin: float,
    min_confidence: float = 0.0,
    eps: float = 1e-6,
) -> Decision:
    """Decide a head from its gallery neighbours alone.

    Scores are ``vote(...)``. Rejections, checked in this order (the first that applies is the reason):

    1. "no_neighbours": no labelled neighbour among the top-k (scores empty);
    2. "too_far": the nearest labelled neighbour among the top-k has distance ``> max_distance``;
    3. "ambiguous": best score - second best score ``< min_margin``;
    4. "low_confidence": best score ``< min_confidence``.

    Otherwise the label is the best class (ties by class name). ``confidence`` is the best score (0 with no
    neighbours). Each condition only ever tightens with its own threshold, so raising max_distance never turns an
    accepted answer into a rejection, and raising min_margin / min_confidence never turns a rejection into an
    acceptance.
    """
    ev = retrieval_evidence(neighbour_labels, similarities, k=k, eps=eps)
    if not ev.scores:
        return Decision(None, 0.0, "no_neighbours", {})
    best, top, _ = _best_and_margin(ev.scores)
    confidence = _clip01(top)
    reason = rejection_reason(
        ev, confidence=top, threshold=min_confidence, max_distance=max_distance, min_margin=min_margin
    )
    return Decision(best if reason is None else None, confidence, reason, ev.scores)


def rejection_reason(
    evidence: RetrievalEvidence | None,
    *,
    confidence: float,
    threshold: float,
    max_distance: float | None = None,
    min_margin: float | None = None,
) -> str | None:
    """The one per-head rejection rule, used by retrieval_decision and by the Recognizer for every mode: None (give
    the label) or the first reason that applies, in this order — with retrieval evidence (retrieval and fusion
    modes): "no_neighbours" (no labelled neighbour), "too_far" (nearest labelled neighbour farther than
    max_distance), "ambiguous" (vote margin below min_margin); then, in every mode, "low_confidence" (the answer's
    confidence below threshold). A calibration that has no max_distance / min_margin (None) skips that check."""
    if evidence is not None:
        if not evidence.scores:
            return "no_neighbours"
        if max_distance is not None and evidence.top1_distance > max_distance:
            return "too_far"
        if min_margin is not None and evidence.margin < min_margin:
            return "ambiguous"
    if confidence < threshold:
        return "low_confidence"
    return None


# --------------------------------------------------------------------------------------------------- classifier


def scores_decision(scores: Mapping[str, float], *, threshold: float, min_margin: float = 0.0) -> Decision:
    """Decide from a {class: score} distribution (e.g. the output of ``fuse``).

    Scores are renormalised to sum to 1 (ValueError for negative / non-finite ones). Rejections, in order:
    "low_confidence" when the best score ``< threshold`` (an empty or all-zero dict is low_confidence with
    confidence 0); "ambiguous" when best - second ``< min_margin``. Otherwise the best class (ties by name).
    """
    norm = _normalised(scores, "scores")
    best, top, margin = _best_and_margin(norm)
    confidence = _clip01(top)
    if best is None or top < threshold:
        return Decision(None, confidence, "low_confidence", norm)
    if margin < min_margin:
        return Decision(None, confidence, "ambiguous", norm)
    return Decision(best, confidence, None, norm)


def softmax_decision(probs: np.ndarray, classes: list[str], *, threshold: float, min_margin: float = 0.0) -> Decision:
    """Decide a head from its (K,) class probabilities (already combined over the photos).

    ``classes[i]`` names ``probs[i]``; names must be unique and len(classes) == K >= 1 (ValueError otherwise, also
    for negative / non-finite probabilities or an all-zero vector). probs are renormalised to sum to 1.
    The answer is the arg-max class (ties by class name) when its probability is ``>= threshold`` and its lead over
    the second is ``>= min_margin``; otherwise label None with reason "low_confidence" (below threshold, checked
    first) or "ambiguous". ``confidence`` is the top probability; ``scores`` all K probabilities.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if p.shape[0] == 0 or p.shape[0] != len(classes):
        raise ValueError(f"probs has {p.shape[0]} entries but {len(classes)} classes were given (need >= 1)")
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError("probs must be finite, >= 0 and not all zero")
    return scores_decision(dict(zip(classes, p.tolist(), strict=True)), threshold=threshold, min_margin=min_margin)


def fuse(p_softmax: Mapping[str, float], p_retrieval: Mapping[str, float], *, weight: float = 0.5) -> dict[str, float]:
    """Convex combination ``weight * p_softmax + (1 - weight) * p_retrieval`` over the union of classes.

    ``weight`` is the weight of the CLASSIFIER (1 = softmax only, 0 = retrieval only), in [0, 1]. Each input is
    first normalised to sum to 1; a class missing from one side counts 0 there. An empty (or all-zero) side carries
    no evidence: the result is then the other side alone, whatever the weight. Both empty -> {}. Otherwise the
    result sums to 1 (classes with 0 are kept, keys sorted).
    ValueError for weight outside [0, 1] or negative / non-finite scores.
    """
    _check_fraction("weight", float(weight))
    a = _normalised(p_softmax, "p_softmax")
    b = _normalised(p_retrieval, "p_retrieval")
    if not a or not b:  # one side carries no evidence: the other alone, whatever the weight
        return dict(sorted((a or b).items()))
    out: dict[str, float] = {}
    for cls in a.keys() | b.keys():
        out[cls] = weight * a.get(cls, 0.0) + (1.0 - weight) * b.get(cls, 0.0)
    total = sum(out.values())
    if total <= 0:
        return {}
    return {cls: v / total for cls, v in sorted(out.items())}


# --------------------------------------------------------------------------------------------------- several views


def combine_views(per_view_probs: np.ndarray, *, mode: str = "mean") -> np.ndarray:
    """Combine (V, K) per-photo probabilities of ONE object into one (K,) distribution (float64, sums to 1).

    Each row is first renormalised to sum to 1 (rows must be finite, >= 0, not all zero).

    * "mean": the average of the rows (probability averaging).
    * "vote": majority vote of the per-view arg-max (an arg-max tie inside a view goes to the class with the higher
      mean probability, then the lower index). Returned as vote shares ``count / V`` blended with
      ``VOTE_TIE_WEIGHT`` (1e-3) of the mean probability: ``(count + w * mean) / (V + w)``. So the result is a
      distribution, each value is within 1e-3 of its exact vote share, more votes always rank higher, and classes
      with tied counts are ordered by their mean probability (the tie-break).
    * "geometric": normalised geometric mean ``exp(mean(log p))`` (p floored at GEOMETRIC_FLOOR = 1e-12, computed in
      log space): a class any view rules out is strongly down-weighted.

    The result does not depend on the order of the views. ValueError for an unknown mode, a non-2-D input, V == 0,
    K == 0 or invalid rows.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {COMBINE_MODES}")
    p = np.asarray(per_view_probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"per_view_probs must be (V, K), got shape {p.shape}")
    n_views, k_cls = p.shape
    if n_views == 0 or k_cls == 0:
        raise ValueError(f"per_view_probs is empty (shape {p.shape})")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("per_view_probs must be finite and >= 0")
    sums = p.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise ValueError("a view has all-zero probabilities")
    p = p / sums
    p = p[np.lexsort(p.T[::-1])]  # canonical row order: the result is bit-for-bit independent of the view order
    mean = p.mean(axis=0)
    if mode == "mean":
        return mean / mean.sum()
    if mode == "vote":
        # per view: the classes at the row maximum; among them the one with the highest mean, then the lowest index
        at_max = p == p.max(axis=1, keepdims=True)
        tie_score = np.where(at_max, mean[None, :], -np.inf)
        winners = tie_score.argmax(axis=1)
        counts = np.bincount(winners, minlength=k_cls).astype(np.float64)
        out = (counts + VOTE_TIE_WEIGHT * mean) / (n_views + VOTE_TIE_WEIGHT)
        return out / out.sum()
    log_p = np.log(np.maximum(p, GEOMETRIC_FLOOR)).mean(axis=0)
    return np.exp(log_p - logsumexp(log_p))


# --------------------------------------------------------------------------------------------------- calibration


def fit_temperature(logits: np.ndarray, targets: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling: the T in ``bounds`` minimising the mean NLL of ``softmax(logits / T)``.

    logits: (N, K) validation logits; targets: (N,) class indices, rows with target < 0 (IGNORE_INDEX, unknown
    label) are skipped. Optimised with ``scipy.optimize.minimize_scalar(method="bounded")`` over log T (the NLL is
    convex in 1/T, hence unimodal in log T). Returns 1.0 when no row is left. When the data are separable the NLL
    keeps falling as T -> 0 and the lower bound (or a value near it where the NLL is flat to float precision) is
    returned. ValueError for bad shapes, targets >= K, non-finite
    logits or invalid bounds.
    """
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets).reshape(-1)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {z.shape}")
    if z.shape[0] != t.shape[0]:
        raise ValueError(f"logits has {z.shape[0]} rows but targets has {t.shape[0]}")
    t = t.astype(np.int64)
    keep = t >= 0
    z, t = z[keep], t[keep]
    if t.shape[0] == 0:
        return 1.0
    if z.shape[1] == 0 or (t >= z.shape[1]).any():
        raise ValueError(f"targets must be < K = {z.shape[1]}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    z_true = z[np.arange(t.shape[0]), t]

    def nll(log_t: float) -> float:
        inv = math.exp(-log_t)
        return float(np.mean(logsumexp(z * inv, axis=1) - z_true * inv))

    res = minimize_scalar(nll, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-5})
    return float(min(hi, max(lo, math.exp(res.x))))


def calibrate_thresholds(
    scores_correct: np.ndarray, scores_wrong: np.ndarray, *, target_precision: float = 0.95
) -> float:
    """The smallest confidence threshold whose accepted validation answers reach ``target_precision``.

    scores_correct / scores_wrong: the confidences of the validation answers that were right / wrong. An answer is
    accepted when ``score >= threshold``; precision = correct accepted / accepted. Candidates are the observed
    scores (any threshold between two of them accepts the same set as the next one up), so the returned value is an
    observed score, and the smallest one that qualifies keeps the most answers (coverage only falls as the threshold
    rises; precision need not be monotonic, every candidate is checked).

    Returns 1.0 when no threshold qualifies or there is no data: "accept nothing" (with the ``>=`` rule it still
    accepts a confidence of exactly 1.0, i.e. a saturated softmax). ValueError for non-finite scores or
    target_precision outside (0, 1].
    """
    _check_fraction("target_precision", float(target_precision), low_open=True)
    ok = _as_1d("scores_correct", scores_correct)
    bad = _as_1d("scores_wrong", scores_wrong)
    if ok.size == 0:
        return 1.0
    values = np.unique(np.concatenate([ok, bad]))  # ascending
    ok_sorted, bad_sorted = np.sort(ok), np.sort(bad)
    n_ok = ok.size - np.searchsorted(ok_sorted, values, side="left")  # accepted correct at threshold = value
    n_bad = bad.size - np.searchsorted(bad_sorted, values, side="left")
    accepted = n_ok + n_bad
    precision = n_ok / np.maximum(accepted, 1)
    good = (accepted > 0) & (precision >= target_precision - 1e-12)
    if not good.any():
        return 1.0
    return float(values[np.argmax(good)])


def _grid(values: np.ndarray, max_grid: int) -> np.ndarray:
    """Ascending candidate thresholds: every distinct value, or max_grid quantiles (min and max included)."""
    uniq = np.unique(values)
    if uniq.size <= max_grid:
        return uniq
    return np.unique(np.quantile(uniq, np.linspace(0.0, 1.0, max_grid)))


def calibrate_retrieval(
    top1_distances_correct,
    top1_distances_wrong,
    margins_correct,
    margins_wrong,
    *,
    target_precision: float = 0.95,
    max_grid: int = 256,
) -> dict:
    """Choose ``max_distance`` and ``min_margin`` for retrieval_decision on validation data.

    Inputs: for the validation queries whose retrieval answer (vote arg-max) was right / wrong, the top-1 distance
    and the margin as ``retrieval_evidence`` computes them (queries with no labelled neighbour are left out by the
    caller: they are rejected regardless). An answer is accepted when ``d <= max_distance and margin >=
    min_margin`` (exactly retrieval_decision's rule).

    Grid search over the distinct observed distances x distinct observed margins (at most ``max_grid`` quantiles
    each when there are more): among the pairs whose accepted answers have precision >= target_precision, the one
    accepting the most answers; ties -> higher precision, then smaller max_distance, then larger min_margin. The
    chosen values are observed ones, i.e. the tightest thresholds that accept that set. With all distinct values in
    the grid the coverage found is the largest any thresholds can reach.

    Returns {"max_distance", "min_margin", "precision", "coverage"} (coverage = accepted / all answers given).
    When nothing qualifies (or there is no data): {"max_distance": -1.0, "min_margin": 1.0, "precision": 1.0,
    "coverage": 0.0}, i.e. reject everything (distances are >= 0) with a vacuous precision.
    """
    _check_fraction("target_precision", float(target_precision), low_open=True)
    if max_grid < 2:
        raise ValueError(f"max_grid must be >= 2, got {max_grid}")
    d_ok, d_bad = (
        _as_1d("top1_distances_correct", top1_distances_correct),
        _as_1d("top1_distances_wrong", top1_distances_wrong),
    )
    m_ok, m_bad = _as_1d("margins_correct", margins_correct), _as_1d("margins_wrong", margins_wrong)
    if d_ok.size != m_ok.size or d_bad.size != m_bad.size:
        raise ValueError("distances and margins must have the same length (per correct / wrong)")
    reject_all = {"max_distance": -1.0, "min_margin": 1.0, "precision": 1.0, "coverage": 0.0}
    total = d_ok.size + d_bad.size
    if d_ok.size == 0:
        return reject_all
    d_all, m_all = np.concatenate([d_ok, d_bad]), np.concatenate([m_ok, m_bad])
    gd, gm = _grid(d_all, max_grid), _grid(m_all, max_grid)

    def table(d: np.ndarray, m: np.ndarray) -> np.ndarray:
        # accepted[j, l] = #{d <= gd[j] and m >= gm[l]}
        di = np.searchsorted(gd, d, side="left")  # accepted by gd[j] iff j >= di
        mi = np.searchsorted(gm, m, side="right") - 1  # accepted by gm[l] iff l <= mi
        hist = np.zeros((gd.size + 1, gm.size + 1), dtype=np.int64)
        np.add.at(hist, (di, np.maximum(mi, 0)), (mi >= 0).astype(np.int64))
        acc = np.cumsum(hist, axis=0)  # over d: rows with di <= j
        acc = np.cumsum(acc[:, ::-1], axis=1)[:, ::-1]  # over m: rows with mi >= l
        return acc[: gd.size, : gm.size]

    n_ok, n_bad = table(d_ok, m_ok), table(d_bad, m_bad)
    accepted = n_ok + n_bad
    precision = n_ok / np.maximum(accepted, 1)
    good = (accepted > 0) & (precision >= target_precision - 1e-12)
    if not good.any():
        return reject_all
    jj, ll = np.nonzero(good)
    # lexsort: last key is primary -> most accepted, then precision, then smaller distance, then larger margin
    order = np.lexsort((-ll, jj, -precision[jj, ll], -accepted[jj, ll]))
    j, l_ = int(jj[order[0]]), int(ll[order[0]])
    return {
        "max_distance": float(gd[j]),
        "min_margin": float(gm[l_]),
        "precision": float(precision[j, l_]),
        "coverage": float(accepted[j, l_] / total),
    }
