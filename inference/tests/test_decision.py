"""Tests of the pure decision layer (numpy/scipy only: no database, no model)."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from inference.decision import (
    Decision,
    calibrate_retrieval,
    calibrate_thresholds,
    combine_views,
    fit_temperature,
    fuse,
    retrieval_decision,
    retrieval_evidence,
    scores_decision,
    softmax,
    softmax_decision,
    vote,
)

FAST = settings(max_examples=60, deadline=None)

label_st = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]))
sim_st = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False)
neighbours_st = st.lists(st.tuples(label_st, sim_st), min_size=0, max_size=25)


def split(neigh):
    return [lab for lab, _ in neigh], [s for _, s in neigh]


def prob_rows(v, k):
    return st.lists(
        st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=k, max_size=k).filter(
            lambda r: sum(r) > 1e-6
        ),
        min_size=v,
        max_size=v,
    )


views_st = st.integers(1, 6).flatmap(lambda v: st.integers(1, 5).flatmap(lambda k: prob_rows(v, k)))


# ------------------------------------------------------------------------------------------------ softmax


def test_softmax_stable_and_temperature():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    assert np.allclose(p, [[0.5, 0.5, 0.0]])
    z = np.array([1.0, 2.0, 3.0])
    assert np.allclose(softmax(z, T=2.0), softmax(z / 2.0))
    assert softmax(z).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        softmax(z, T=0.0)


# ------------------------------------------------------------------------------------------------ vote


@FAST
@given(neighbours_st, st.integers(1, 30), st.randoms(use_true_random=False))
def test_vote_sums_to_one_and_is_permutation_invariant(neigh, k, rnd):
    labels, sims = split(neigh)
    scores = vote(labels, sims, k=k)
    top = sorted(neigh, key=lambda t: -t[1])[:k]
    if any(lab is not None for lab, _ in top) and len({s for _, s in neigh}) == len(neigh):
        assert scores  # something votes when a labelled neighbour is among the k nearest
    if scores:
        assert sum(scores.values()) == pytest.approx(1.0)
        assert all(v > 0 for v in scores.values())
        assert None not in scores
    shuffled = list(neigh)
    rnd.shuffle(shuffled)
    assert vote(*split(shuffled), k=k) == scores  # exactly equal: canonical summation order


def test_vote_closer_neighbour_weighs_more():
    scores = vote(["a", "b"], [0.9, 0.5])
    assert scores["a"] > scores["b"]
    # weights 1/(0.1+eps) and 1/(0.5+eps)
    assert scores["a"] == pytest.approx((1 / 0.1) / (1 / 0.1 + 1 / 0.5), rel=1e-4)


@FAST
@given(st.floats(-1, 1), st.floats(-1, 1))
def test_vote_closer_neighbour_weighs_more_property(s1, s2):
    assume(abs(s1 - s2) > 1e-9)
    scores = vote(["a", "b"], [s1, s2])
    closer, farther = ("a", "b") if s1 > s2 else ("b", "a")
    assert scores[closer] > scores[farther]


def test_vote_ignores_none_and_respects_k():
    assert vote([None, None], [0.9, 0.8]) == {}
    assert vote([], []) == {}
    assert vote([None, "a"], [0.99, 0.5]) == {"a": 1.0}
    # None labels take a top-k slot: with k=1 the unknown nearest neighbour leaves nothing to vote
    assert vote([None, "a"], [0.99, 0.5], k=1) == {}
    labels = ["a", "b", "b", "b"]
    sims = [0.95, 0.9, 0.85, 0.8]
    assert set(vote(labels, sims, k=1)) == {"a"}
    assert set(vote(labels, sims, k=2)) == {"a", "b"}
    assert vote(labels, sims, k=4)["b"] > vote(labels, sims, k=2)["b"]
    assert vote(labels, sims, k=100) == vote(labels, sims, k=4)


def test_vote_similarity_above_one_is_distance_zero_and_errors():
    s = vote(["a", "b"], [1.0000001, 0.0])
    assert s["a"] > 0.999
    with pytest.raises(ValueError):
        vote(["a"], [0.5, 0.4])
    with pytest.raises(ValueError):
        vote(["a"], [float("nan")])
    with pytest.raises(ValueError):
        vote(["a"], [0.5], k=0)
    with pytest.raises(ValueError):
        vote(["a"], [0.5], eps=0.0)


# ------------------------------------------------------------------------------------------------ retrieval


def test_retrieval_decision_reasons():
    kw = {"max_distance": 0.3, "min_margin": 0.2, "min_confidence": 0.7}
    d = retrieval_decision([], [], **kw)
    assert (d.label, d.reason, d.confidence, d.scores) == (None, "no_neighbours", 0.0, {})
    assert retrieval_decision([None, None], [0.9, 0.9], **kw).reason == "no_neighbours"

    d = retrieval_decision(["a", "a"], [0.5, 0.4], **kw)  # top-1 distance 0.5 > 0.3
    assert (d.label, d.reason) == (None, "too_far")
    assert d.scores == {"a": 1.0}

    d = retrieval_decision(["a", "b"], [0.9, 0.9], **kw)  # equal votes: margin 0
    assert (d.label, d.reason) == (None, "ambiguous")

    # margin ok (0.6 - 0.4 >= 0.2 needs spread) but best < 0.7: three classes
    labels = ["a", "a", "b", "c"]
    sims = [0.95, 0.95, 0.95, 0.95]  # a: 0.5, b: 0.25, c: 0.25 -> margin 0.25, best 0.5
    d = retrieval_decision(labels, sims, **kw)
    assert (d.label, d.reason) == (None, "low_confidence")
    assert d.confidence == pytest.approx(0.5)

    d = retrieval_decision(["a", "a", "b"], [0.95, 0.9, 0.5], **kw)
    assert d.label == "a" and d.reason is None and d.accepted
    assert d.confidence == pytest.approx(d.scores["a"]) and d.confidence > 0.7


def test_retrieval_top1_is_nearest_labelled_neighbour():
    ev = retrieval_evidence([None, "a"], [0.99, 0.6])
    assert ev.top1_distance == pytest.approx(0.4)
    assert ev.margin == pytest.approx(1.0)
    assert retrieval_evidence([], []).top1_distance == math.inf


@FAST
@given(
    neighbours_st,
    st.integers(1, 25),
    st.floats(0, 2),
    st.floats(0, 2),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_retrieval_decision_monotonic(neigh, k, dist_a, dist_b, margin_a, margin_b, min_conf):
    labels, sims = split(neigh)
    lo_d, hi_d = sorted((dist_a, dist_b))
    lo_m, hi_m = sorted((margin_a, margin_b))
    for m in (lo_m, hi_m):
        tight = retrieval_decision(labels, sims, k=k, max_distance=lo_d, min_margin=m, min_confidence=min_conf)
        loose = retrieval_decision(labels, sims, k=k, max_distance=hi_d, min_margin=m, min_confidence=min_conf)
        if tight.accepted:  # raising max_distance never rejects an accepted answer
            assert loose.accepted and loose.label == tight.label
    for dmax in (lo_d, hi_d):
        low = retrieval_decision(labels, sims, k=k, max_distance=dmax, min_margin=lo_m, min_confidence=min_conf)
        high = retrieval_decision(labels, sims, k=k, max_distance=dmax, min_margin=hi_m, min_confidence=min_conf)
        if not low.accepted:  # raising min_margin never accepts a rejection
            assert not high.accepted
        assert 0.0 <= high.confidence <= 1.0


# ------------------------------------------------------------------------------------------------ softmax decision


def test_softmax_decision_threshold_semantics():
    classes = ["cat", "dog", "fox"]
    d = softmax_decision(np.array([0.5, 0.3, 0.2]), classes, threshold=0.6)
    assert (d.label, d.reason) == (None, "low_confidence")
    assert d.confidence == pytest.approx(0.5)
    assert set(d.scores) == set(classes) and sum(d.scores.values()) == pytest.approx(1.0)
    d = softmax_decision(np.array([0.6, 0.3, 0.1]), classes, threshold=0.6)  # >= threshold is accepted
    assert (d.label, d.reason) == ("cat", None)
    d = softmax_decision(np.array([0.1, 0.85, 0.05]), classes, threshold=0.6)
    assert d.label == "dog" and d.confidence == pytest.approx(0.85)
    d = softmax_decision(np.array([0.45, 0.44, 0.11]), classes, threshold=0.4, min_margin=0.05)
    assert (d.label, d.reason) == (None, "ambiguous")
    # float32 input that does not sum exactly to 1 is renormalised
    d = softmax_decision(np.array([2.0, 1.0, 1.0], dtype=np.float32), classes, threshold=0.5)
    assert d.label == "cat" and d.confidence == pytest.approx(0.5)


def test_softmax_decision_errors():
    with pytest.raises(ValueError):
        softmax_decision(np.array([0.5, 0.5]), ["a"], threshold=0.5)
    with pytest.raises(ValueError):
        softmax_decision(np.array([0.5, 0.5]), ["a", "a"], threshold=0.5)
    with pytest.raises(ValueError):
        softmax_decision(np.array([]), [], threshold=0.5)
    with pytest.raises(ValueError):
        softmax_decision(np.array([0.5, np.nan]), ["a", "b"], threshold=0.5)


@FAST
@given(views_st.map(lambda rows: rows[0]), st.floats(0, 1))
def test_softmax_decision_property(row, threshold):
    classes = [f"c{i}" for i in range(len(row))]
    d = softmax_decision(np.array(row), classes, threshold=threshold)
    p = np.array(row) / sum(row)
    assert d.confidence == pytest.approx(p.max())
    if p.max() >= threshold + 1e-12:
        assert d.accepted and d.scores[d.label] == pytest.approx(p.max())
    elif p.max() < threshold - 1e-12:
        assert d.reason == "low_confidence" and d.label is None


def test_scores_decision_and_decision_invariants():
    assert scores_decision({}, threshold=0.0).reason == "low_confidence"
    assert scores_decision({"a": 3.0, "b": 1.0}, threshold=0.7).label == "a"
    with pytest.raises(ValueError):
        Decision("a", 0.5, "ambiguous", {})
    with pytest.raises(ValueError):
        Decision(None, 0.5, None, {})
    with pytest.raises(ValueError):
        Decision(None, 0.5, "reshoot", {})
    assert Decision("a", 1.0, None, {"a": 1.0}).as_dict() == {
        "label": "a",
        "confidence": 1.0,
        "reason": None,
        "scores": {"a": 1.0},
    }


# ------------------------------------------------------------------------------------------------ fuse

dist_st = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 1), max_size=4)


@FAST
@given(dist_st, dist_st, st.floats(0, 1))
def test_fuse_is_a_distribution(p1, p2, w):
    out = fuse(p1, p2, weight=w)
    if sum(p1.values()) > 0 or sum(p2.values()) > 0:
        assert sum(out.values()) == pytest.approx(1.0)
        assert set(out) <= set(p1) | set(p2)
        assert all(v >= 0 for v in out.values())
    else:
        assert out == {}


def test_fuse_values():
    out = fuse({"a": 0.8, "b": 0.2}, {"b": 0.5, "c": 0.5}, weight=0.5)
    assert out == pytest.approx({"a": 0.4, "b": 0.35, "c": 0.25})
    assert fuse({"a": 1.0}, {"b": 1.0}, weight=1.0) == {"a": 1.0, "b": 0.0}
    assert fuse({"a": 0.7, "b": 0.3}, {}, weight=0.3) == pytest.approx({"a": 0.7, "b": 0.3})
    assert fuse({}, {}) == {}
    with pytest.raises(ValueError):
        fuse({"a": 1.0}, {}, weight=1.5)
    with pytest.raises(ValueError):
        fuse({"a": -1.0}, {})


# ------------------------------------------------------------------------------------------------ combine_views


@FAST
@given(views_st, st.sampled_from(["mean", "vote", "geometric"]), st.randoms(use_true_random=False))
def test_combine_views_distribution_and_permutation(rows, mode, rnd):
    p = np.array(rows)
    out = combine_views(p, mode=mode)
    assert out.shape == (p.shape[1],)
    assert out.sum() == pytest.approx(1.0)
    assert (out >= 0).all()
    perm = list(range(p.shape[0]))
    rnd.shuffle(perm)
    assert np.array_equal(combine_views(p[perm], mode=mode), out)


@FAST
@given(views_st.map(lambda rows: rows[0]), st.integers(1, 6))
def test_combine_identical_views_mean_and_geometric(row, v):
    view = np.array(row) / sum(row)
    p = np.tile(view, (v, 1))
    assert np.allclose(combine_views(p, mode="mean"), view)
    if view.min() > 1e-9:
        assert np.allclose(combine_views(p, mode="geometric"), view)


def test_combine_views_vote_majority_and_ties():
    p = np.array([[0.6, 0.4, 0.0], [0.55, 0.45, 0.0], [0.0, 0.1, 0.9]])
    out = combine_views(p, mode="vote")
    assert out.argmax() == 0
    assert out == pytest.approx([2 / 3, 0.0, 1 / 3], abs=1e-3)
    assert out.sum() == pytest.approx(1.0)
    # the mean picks class 2 (0.66 against 0.34), the vote follows the two views that prefer class 0
    q = np.array([[0.51, 0.0, 0.49], [0.51, 0.0, 0.49], [0.0, 0.0, 1.0]])
    assert combine_views(q, mode="mean").argmax() == 2
    assert combine_views(q, mode="vote").argmax() == 0
    # 1-1 tie in votes: broken by the mean probability (class 1 has the higher mean)
    t = np.array([[0.55, 0.45], [0.1, 0.9]])
    out = combine_views(t, mode="vote")
    assert out.argmax() == 1
    assert out == pytest.approx([0.5, 0.5], abs=1e-3)


def test_combine_views_geometric_veto_and_errors():
    p = np.array([[0.5, 0.5], [1.0, 0.0]])
    g = combine_views(p, mode="geometric")
    assert g[0] > 0.999 and g.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        combine_views(p, mode="median")
    with pytest.raises(ValueError):
        combine_views(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        combine_views(np.zeros((2, 0)))
    with pytest.raises(ValueError):
        combine_views(np.array([0.5, 0.5]))
    with pytest.raises(ValueError):
        combine_views(np.array([[0.0, 0.0]]))
    with pytest.raises(ValueError):
        combine_views(np.array([[-0.1, 1.1]]))


# ------------------------------------------------------------------------------------------------ temperature


def _sample(true_logits, rng):
    p = softmax(true_logits)
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 2.0, size=(4000, 10))
    targets = _sample(true_logits, rng)
    t = fit_temperature(true_logits * 2.0, targets)
    assert abs(t - 2.0) <= 0.2
    t1 = fit_temperature(true_logits, targets)
    assert abs(t1 - 1.0) <= 0.1


def test_fit_temperature_ignore_rows_and_empty():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0.0, 2.0, size=(2000, 5))
    targets = _sample(true_logits, rng)
    base = fit_temperature(true_logits * 2.0, targets)
    # IGNORE rows with absurd logits must not move the fit
    junk = rng.normal(0.0, 50.0, size=(500, 5))
    t = fit_temperature(np.vstack([true_logits * 2.0, junk]), np.concatenate([targets, np.full(500, -100)]))
    assert t == pytest.approx(base, rel=1e-3)
    assert fit_temperature(np.zeros((0, 5)), np.zeros(0, dtype=int)) == 1.0
    assert fit_temperature(np.ones((3, 5)), np.full(3, -100)) == 1.0
    with pytest.raises(ValueError):
        fit_temperature(np.ones((3, 5)), np.array([0, 1, 5]))
    with pytest.raises(ValueError):
        fit_temperature(np.ones((3, 5)), np.array([0, 1]))


def test_fit_temperature_separable_hits_lower_bound():
    logits = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert fit_temperature(logits, np.array([0, 1]), bounds=(0.1, 10.0)) == pytest.approx(0.1, rel=1e-2)


# ------------------------------------------------------------------------------------------------ calibration


def _precision_at(ok, bad, t):
    a = (np.asarray(ok) >= t).sum()
    b = (np.asarray(bad) >= t).sum()
    return a, b


@FAST
@given(
    st.lists(st.floats(0, 1), max_size=30),
    st.lists(st.floats(0, 1), max_size=30),
    st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]),
)
def test_calibrate_thresholds_reaches_target_with_smallest_threshold(ok, bad, target):
    t = calibrate_thresholds(np.array(ok), np.array(bad), target_precision=target)
    a, b = _precision_at(ok, bad, t)
    feasible = any(
        _precision_at(ok, bad, v)[0] / sum(_precision_at(ok, bad, v)) >= target - 1e-12 for v in set(ok) | set(bad)
    )
    if feasible:
        assert a + b and a / (a + b) >= target - 1e-12
    else:
        assert t == 1.0
    # minimality: no smaller observed score qualifies
    for v in sorted(set(ok) | set(bad)):
        if v >= t:
            break
        a2, b2 = _precision_at(ok, bad, v)
        assert a2 / (a2 + b2) < target - 1e-12


def test_calibrate_thresholds_hand_case():
    ok = np.array([0.9, 0.8, 0.7, 0.6, 0.3])
    bad = np.array([0.65, 0.4, 0.2])
    # >=0.7: 3/3; >=0.65: 3/4; >=0.6: 4/5 = 0.8; >=0.4: 4/6; >=0.3: 5/7
    assert calibrate_thresholds(ok, bad, target_precision=1.0) == 0.7
    assert calibrate_thresholds(ok, bad, target_precision=0.8) == 0.6
    assert calibrate_thresholds(ok, bad, target_precision=0.7) == 0.3
    assert calibrate_thresholds(ok, np.array([]), target_precision=0.99) == 0.3
    assert calibrate_thresholds(np.array([]), bad) == 1.0
    assert calibrate_thresholds(np.array([0.2]), np.array([0.9]), target_precision=0.9) == 1.0
    with pytest.raises(ValueError):
        calibrate_thresholds(ok, bad, target_precision=0.0)


def _accepts(d, m, cal):
    return (np.asarray(d) <= cal["max_distance"]) & (np.asarray(m) >= cal["min_margin"])


@FAST
@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=20),
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=20),
    st.sampled_from([0.5, 0.8, 0.95]),
)
def test_calibrate_retrieval_precision_and_maximal_coverage(ok, bad, target):
    d_ok, m_ok = [x for x, _ in ok], [y for _, y in ok]
    d_bad, m_bad = [x for x, _ in bad], [y for _, y in bad]
    cal = calibrate_retrieval(d_ok, d_bad, m_ok, m_bad, target_precision=target)
    assert set(cal) == {"max_distance", "min_margin", "precision", "coverage"}
    a = int(_accepts(d_ok, m_ok, cal).sum()) if ok else 0
    b = int(_accepts(d_bad, m_bad, cal).sum()) if bad else 0
    total = len(ok) + len(bad)
    if a + b:
        assert a / (a + b) >= target - 1e-12
        assert cal["precision"] == pytest.approx(a / (a + b))
        assert cal["coverage"] == pytest.approx((a + b) / total)
    else:
        assert cal["coverage"] == 0.0
    # brute force over all observed thresholds: nothing qualifying accepts more
    ds = sorted({x for x, _ in ok + bad})
    ms = sorted({y for _, y in ok + bad})
    best = 0
    for dmax, mmin in itertools.product(ds, ms):
        c = {"max_distance": dmax, "min_margin": mmin}
        a2 = int(_accepts(d_ok, m_ok, c).sum()) if ok else 0
        b2 = int(_accepts(d_bad, m_bad, c).sum()) if bad else 0
        if a2 + b2 and a2 / (a2 + b2) >= target - 1e-12:
            best = max(best, a2 + b2)
    assert a + b == best


def test_calibrate_retrieval_hand_case():
    # correct answers: close and clear; wrong ones: far, or close but ambiguous
    d_ok = [0.05, 0.10, 0.15, 0.20, 0.30]
    m_ok = [0.90, 0.80, 0.70, 0.60, 0.50]
    d_bad = [0.50, 0.12]
    m_bad = [0.90, 0.05]
    cal = calibrate_retrieval(d_ok, d_bad, m_ok, m_bad, target_precision=1.0)
    assert cal == {"max_distance": 0.30, "min_margin": 0.50, "precision": 1.0, "coverage": 5 / 7}
    # a lower target lets one wrong answer in: 5/6 >= 0.8 (at 0.85 it would not qualify)
    cal = calibrate_retrieval(d_ok, d_bad, m_ok, m_bad, target_precision=0.8)
    assert cal["coverage"] == pytest.approx(6 / 7) and cal["precision"] == pytest.approx(5 / 6)
    cal = calibrate_retrieval(d_ok, d_bad, m_ok, m_bad, target_precision=0.85)
    assert cal["coverage"] == pytest.approx(5 / 7)
    none = calibrate_retrieval([0.5], [0.1], [0.1], [0.9], target_precision=0.9)
    assert none == {"max_distance": -1.0, "min_margin": 1.0, "precision": 1.0, "coverage": 0.0}
    assert calibrate_retrieval([], [], [], [])["coverage"] == 0.0
    with pytest.raises(ValueError):
        calibrate_retrieval([0.1], [], [0.1, 0.2], [])


def test_calibrated_retrieval_thresholds_feed_retrieval_decision():
    # the evidence computed for calibration and the decision's rule agree
    queries = [
        (["a", "a", "b"], [0.95, 0.9, 0.5], "a"),
        (["a", "b"], [0.7, 0.69], "b"),
        (["b", "b"], [0.9, 0.8], "b"),
        (["a", "c"], [0.3, 0.2], "c"),
    ]
    ev = [(retrieval_evidence(lab, sim), truth) for lab, sim, truth in queries]
    ok = [e for e, truth in ev if max(e.scores, key=e.scores.get) == truth]
    bad = [e for e, truth in ev if max(e.scores, key=e.scores.get) != truth]
    cal = calibrate_retrieval(
        [e.top1_distance for e in ok],
        [e.top1_distance for e in bad],
        [e.margin for e in ok],
        [e.margin for e in bad],
        target_precision=1.0,
    )
    for lab, sim, truth in queries:
        d = retrieval_decision(lab, sim, max_distance=cal["max_distance"], min_margin=cal["min_margin"])
        if d.accepted:
            assert d.label == truth
    assert cal["coverage"] == pytest.approx(2 / 4)


def test_the_one_rejection_rule_checks_evidence_before_confidence_and_skips_uncalibrated_checks():
    from inference.decision import RetrievalEvidence, rejection_reason

    near_clear = RetrievalEvidence({"a": 0.9, "b": 0.1}, 0.2, 0.8)
    far_ambiguous = RetrievalEvidence({"a": 0.5, "b": 0.5}, 0.9, 0.0)
    kw = {"max_distance": 0.5, "min_margin": 0.1}
    assert rejection_reason(near_clear, confidence=0.9, threshold=0.5, **kw) is None
    assert rejection_reason(RetrievalEvidence({}, float("inf"), 0.0), confidence=0.0, threshold=0.5) == "no_neighbours"
    assert rejection_reason(far_ambiguous, confidence=0.1, threshold=0.5, **kw) == "too_far"  # first that applies
    assert rejection_reason(far_ambiguous, confidence=0.1, threshold=0.5, max_distance=1.0, min_margin=0.1) == (
        "ambiguous"
    )
    assert rejection_reason(far_ambiguous, confidence=0.1, threshold=0.5) == "low_confidence"  # not calibrated
    assert rejection_reason(None, confidence=0.4, threshold=0.5) == "low_confidence"  # softmax mode: no evidence
    assert rejection_reason(None, confidence=0.5, threshold=0.5) is None
    # retrieval_decision is the same rule on the same evidence.
    labels, sims = ["a", "a", "b"], [0.9, 0.8, 0.3]
    ev = retrieval_evidence(labels, sims, k=20)
    for max_d, margin, conf in [(0.05, 0.0, 0.0), (1.0, 0.9, 0.0), (1.0, 0.0, 0.99), (1.0, 0.0, 0.0)]:
        got = retrieval_decision(labels, sims, max_distance=max_d, min_margin=margin, min_confidence=conf).reason
        want = rejection_reason(
            ev, confidence=max(ev.scores.values()), threshold=conf, max_distance=max_d, min_margin=margin
        )
        assert got == want
