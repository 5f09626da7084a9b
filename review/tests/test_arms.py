"""review.arms.arm_curve: the A/B of the low-confidence queue's arms in the model's own retrieval classifier."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.decision import vote
from review.arms import arm_curve


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_labels_that_fill_a_hole_in_the_gallery_beat_labels_where_it_is_already_covered():
    """Class "b" lives around the y axis; the base gallery knows only "a" (around x). The active picks are
    photos of "b", the random picks more photos of "a": only the active arm can teach the gallery "b"."""
    rng = np.random.default_rng(0)
    a = _unit(np.array([1.0, 0.0, 0.0]) + 0.05 * rng.normal(size=(30, 3)))
    b = _unit(np.array([0.0, 1.0, 0.0]) + 0.05 * rng.normal(size=(8, 3)))
    more_a = _unit(np.array([1.0, 0.0, 0.0]) + 0.05 * rng.normal(size=(8, 3)))
    gallery = np.concatenate([a, b, more_a])
    labels = ["a"] * 30 + ["b"] * 8 + ["a"] * 8
    test = _unit(np.concatenate([[[1.0, 0.05, 0.0]] * 5, [[0.05, 1.0, 0.0]] * 5]))
    out = arm_curve(gallery, labels, list(range(30, 38)), list(range(38, 46)), test, ["a"] * 5 + ["b"] * 5, k=3)
    assert (out["n_base"], out["n_active"], out["n_random"], out["n_test"]) == (30, 8, 8, 10)
    assert [p["n"] for p in out["points"]] == [0, 2, 4, 6, 8]
    first, last = out["points"][0], out["points"][-1]
    assert first["active"] == first["random"] == 0.5  # n = 0 is one gallery for both arms
    assert last["active"] == 1.0 and last["random"] == 0.5


def test_no_curve_without_both_arms_or_a_test_split():
    g = _unit(np.eye(3))
    assert arm_curve(g, ["a", "b", "c"], [0], [], g, ["a", "b", "c"])["points"] == []
    assert arm_curve(g, ["a", "b", "c"], [0], [1], g[:0], [])["points"] == []
    out = arm_curve(g, ["a", "b", None], [0], [1], g, [None, "b", None])
    assert out["n_test"] == 1 and out["n_base"] == 0 and [p["n"] for p in out["points"]] == [0, 1]
    # n = 0 with an empty base gallery: nothing votes, nothing is right
    assert out["points"][0] == {"n": 0, "active": 0.0, "random": 0.0}


@pytest.mark.parametrize(
    ("active", "random", "labels", "message"),
    [
        ([0], [0], ["a", "b"], "both arms"),
        ([0, 0], [1], ["a", "b"], "repeat"),
        ([2], [1], ["a", "b"], r"\[0, 2\)"),
        ([0], [1], ["a", None], "labelled"),
    ],
)
def test_bad_arms_are_refused(active, random, labels, message):
    g = _unit(np.eye(2))
    with pytest.raises(ValueError, match=message):
        arm_curve(g, labels, active, random, g, ["a", "b"])


def test_mismatched_shapes_are_refused():
    g = _unit(np.eye(3))
    with pytest.raises(ValueError, match="gallery_labels"):
        arm_curve(g, ["a"], [], [], g, ["a", "b", "c"])
    with pytest.raises(ValueError, match="test_emb"):
        arm_curve(g, ["a", "b", "c"], [], [], g[:, :2], ["a", "b", "c"])


def _brute_force(g, labels, gallery_rows, q, truth, k):
    """Top-1 of the served vote over an explicitly built gallery (every row scored, no shortcuts)."""
    gn, qn = _unit(g), _unit(q)
    right = 0
    for t in range(len(q)):
        sims = [float(gn[r] @ qn[t]) for r in gallery_rows]
        scores = vote([labels[r] for r in gallery_rows], sims, k=k) if gallery_rows else {}
        right += bool(scores) and min(scores, key=lambda c: (-scores[c], c)) == truth[t]
    return right / len(q)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(4, 30),
    n_active=st.integers(0, 8),
    n_random=st.integers(0, 8),
    k=st.integers(1, 6),
)
def test_matches_a_brute_force_gallery_at_every_step(seed, n, n_active, n_random, k):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, 4)).astype(np.float32)
    labels = [str(c) for c in rng.integers(0, 3, n)]
    rows = rng.permutation(n)
    active, random = rows[:n_active].tolist(), rows[n_active : n_active + n_random].tolist()
    q = rng.normal(size=(7, 4)).astype(np.float32)
    truth = [str(c) for c in rng.integers(0, 3, 7)]
    out = arm_curve(g, labels, active, random, q, truth, k=k)
    base = [i for i in range(n) if i not in set(active) | set(random)]
    assert out["n_base"] == len(base)
    if min(len(active), len(random)) == 0:
        assert out["points"] == []
        return
    ns = [p["n"] for p in out["points"]]
    assert ns[0] == 0 and ns[-1] == min(len(active), len(random)) and ns == sorted(set(ns))
    for p in out["points"]:
        for arm, picks in (("active", active), ("random", random)):
            assert p[arm] == pytest.approx(_brute_force(g, labels, base + picks[: p["n"]], q, truth, k), abs=1e-4)
