"""review.active: uncertainty scores, k-center greedy and the review batch (pure numpy, no database)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from review.active import STRATEGIES, TIE_TOL, k_center_greedy, select_batch, uncertainty

# conftest's autouse fixture is function scoped but only isolates folders: harmless to share across examples
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def prob_rows(draw, max_rows: int = 6, max_classes: int = 6) -> np.ndarray:
    """(n, K) non-negative rows with a positive sum (all-zero rows become uniform), not normalised."""
    n = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_classes))
    p = draw(hnp.arrays(np.float64, (n, k), elements=st.floats(0, 1, allow_subnormal=False)))
    p[p.sum(axis=1) == 0] = 1.0
    return p


# -- uncertainty ------------------------------------------------------------------------------------------------


def test_strategies_constant():
    assert STRATEGIES == ("least_confidence", "margin", "entropy")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_uniform_rows_score_one_and_one_hot_rows_score_zero(strategy):
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0, 0, 1, 0], [1, 0, 0, 0], [3, 3, 3, 3]], dtype=float)
    np.testing.assert_allclose(uncertainty(probs, strategy), [1, 0, 0, 1], atol=1e-12)


@pytest.mark.parametrize(
    ("strategy", "row", "expected"),
    [
        ("least_confidence", [0.5, 0.5, 0], 0.75),
        ("margin", [0.5, 0.5, 0], 1.0),
        ("entropy", [0.5, 0.5, 0], math.log(2) / math.log(3)),
        ("least_confidence", [0.7, 0.2, 0.1], 0.3 * 3 / 2),
        ("margin", [0.7, 0.2, 0.1], 0.5),
        ("entropy", [0.7, 0.2, 0.1], -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)),
        ("least_confidence", [0.9, 0.1], 0.2),
        ("margin", [0.9, 0.1], 0.2),
        ("entropy", [0.9, 0.1], -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)),
        ("margin", [0.1, 0.6, 0.3, 0.0], 0.7),
    ],
)
def test_hand_computed_scores(strategy, row, expected):
    assert uncertainty(np.array([row]), strategy)[0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_are_renormalised(strategy):
    raw = np.array([[2.0, 2.0, 0.0], [7.0, 2.0, 1.0]])
    normalised = raw / raw.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(uncertainty(raw, strategy), uncertainty(normalised, strategy), atol=1e-15)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_class_and_empty_inputs_score_zero(strategy):
    out = uncertainty(np.array([[0.3], [1.0]]), strategy)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.0, 0.0])
    assert uncertainty(np.zeros((0, 3)), strategy).shape == (0,)


def test_unknown_strategy_lists_the_strategies():
    with pytest.raises(ValueError, match="least_confidence, margin, entropy"):
        uncertainty(np.array([[0.5, 0.5]]), "bald")


@pytest.mark.parametrize("shape", [(3,), (2, 2, 2), ()])
def test_probs_must_be_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        uncertainty(np.full(shape, 0.5), "entropy")


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ([np.nan, 0.5], "row 1 "),
        ([0.0, 0.0], "row 1 has a non-positive sum"),
        ([-0.5, 1.0], "row 1 "),
        ([np.inf, 1], "row 1 "),
    ],
)
def test_bad_rows_are_named(bad_row, message):
    probs = np.array([[0.5, 0.5], bad_row, [0.0, 0.0]])
    with pytest.raises(ValueError, match=message):
        uncertainty(probs, "margin")


@PROPERTY
@given(prob_rows(), st.sampled_from(STRATEGIES))
def test_scores_are_in_unit_interval(probs, strategy):
    scores = uncertainty(probs, strategy)
    assert scores.shape == (len(probs),)
    assert ((scores >= 0) & (scores <= 1)).all()


@PROPERTY
@given(prob_rows(), st.sampled_from(STRATEGIES), st.randoms(use_true_random=False))
def test_column_permutation_does_not_change_scores(probs, strategy, rnd):
    perm = list(range(probs.shape[1]))
    rnd.shuffle(perm)
    np.testing.assert_allclose(uncertainty(probs[:, perm], strategy), uncertainty(probs, strategy), atol=1e-12)


@PROPERTY
@given(prob_rows(), st.sampled_from(STRATEGIES), st.floats(0, 1), st.floats(0, 1))
def test_mixing_toward_the_top_class_never_increases_uncertainty(probs, strategy, a, b):
    p = probs / probs.sum(axis=1, keepdims=True)
    one_hot = np.eye(p.shape[1])[p.argmax(axis=1)]
    lo, hi = min(a, b), max(a, b)
    less_peaked = uncertainty((1 - lo) * p + lo * one_hot, strategy)
    more_peaked = uncertainty((1 - hi) * p + hi * one_hot, strategy)
    assert (more_peaked <= less_peaked + 1e-12).all()


# -- k_center_greedy --------------------------------------------------------------------------------------------


def three_clusters(per: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points near three orthogonal directions, shuffled; returns (points, cluster of each point)."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(3), per)
    points = np.eye(3)[cluster] * rng.uniform(0.5, 3, (len(cluster), 1)) + rng.normal(0, 0.02, (len(cluster), 3))
    order = rng.permutation(len(cluster))
    return points[order], cluster[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_pick_per_well_separated_cluster(seed):
    points, cluster = three_clusters(seed=seed)
    picks = k_center_greedy(points, 3)
    assert picks[0] == 0
    assert sorted(cluster[picks]) == [0, 1, 2]
    for first in range(len(points)):
        assert sorted(cluster[k_center_greedy(points, 3, first=first)]) == [0, 1, 2]


def test_already_labeled_clusters_are_not_covered_again():
    points, cluster = three_clusters()
    already = np.flatnonzero(cluster == 0)[:1]
    picks = k_center_greedy(points, 2, already=already)
    assert sorted(cluster[picks]) == [1, 2]


def test_never_picks_already_rows_even_when_they_are_candidates():
    x = np.random.default_rng(3).normal(size=(40, 5))
    already = [0, 7, 8, 21]
    picks = k_center_greedy(x, 100, already=already)
    assert not set(picks) & set(already)
    assert sorted(picks) == sorted(set(range(40)) - set(already))


def test_respects_first_and_default_first_is_candidates_0():
    x = np.random.default_rng(4).normal(size=(30, 4))
    assert k_center_greedy(x, 5, first=17)[0] == 17
    assert k_center_greedy(x, 5, candidates=np.array([12, 3, 25]))[0] == 12
    assert k_center_greedy(x, 5, candidates=[12, 3, 25], first=25)[0] == 25
    assert k_center_greedy(x, 1, already=[1, 2], first=9) == [9]


def test_first_pick_with_already_is_the_farthest_candidate():
    x = np.array([[1.0, 0], [0.9, 0.1], [0, 1], [-1, 0.01]])
    assert k_center_greedy(x, 1, already=[0]) == [3]


def test_ties_go_to_the_lowest_candidate_position():
    assert k_center_greedy(np.ones((5, 3)), 5, candidates=[3, 1, 4, 0, 2]) == [3, 1, 4, 0, 2]
    assert k_center_greedy(np.zeros((4, 2)), 3) == [0, 1, 2]
    # duplicates with different lengths are the same direction: ties despite rounding
    x = np.array([[1.0, 0], [1, 1], [3, 3], [0, 1], [7, 7]])
    assert k_center_greedy(x, 5) == [0, 3, 1, 2, 4]


def test_rows_are_normalised_and_zero_rows_are_zero_vectors():
    x = np.random.default_rng(5).normal(size=(25, 3))
    scaled = x * np.random.default_rng(6).uniform(0.1, 100, (25, 1))
    assert k_center_greedy(scaled, 10) == k_center_greedy(x, 10)
    x = np.array([[1.0, 0], [0, 0], [-1, 0]])
    # zero row is at distance 1 from both unit rows, [-1, 0] at distance 2 from [1, 0]
    assert k_center_greedy(x, 3) == [0, 2, 1]
    assert np.array_equal(x, [[1.0, 0], [0, 0], [-1, 0]])  # input untouched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": -1}, "k must be"),
        ({"k": 2, "first": 99}, "not among the candidates"),
        ({"k": 2, "candidates": [1, 2], "first": 0}, "not among the candidates"),
        ({"k": 2, "already": [3], "first": 3}, "already labeled"),
        ({"k": 2, "candidates": [1, 1]}, "duplicates"),
        ({"k": 2, "candidates": [1, 10]}, "outside"),
        ({"k": 2, "already": [-1]}, "outside"),
        ({"k": 2, "candidates": [0.5, 1.0]}, "integer"),
    ],
)
def test_k_center_validation(kwargs, message):
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=message):
        k_center_greedy(x, **kwargs)


def test_k_center_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="2-D"):
        k_center_greedy(np.ones(5), 2)
    with pytest.raises(ValueError, match="finite"):
        k_center_greedy(np.array([[1.0, np.nan]]), 1)


def brute_force_k_center(x, k, candidates, already, first):
    """Reference: the full squared distance matrix, a min over the selected set recomputed at every step."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    dist2 = ((unit[:, None, :] - unit[None, :, :]) ** 2).sum(axis=-1)
    eligible = [c for c in candidates if c not in set(already)]
    selected, picks = list(already), []
    for step in range(min(k, len(eligible))):
        remaining = [c for c in eligible if c not in picks]
        if step == 0 and first is not None:
            choice = first
        elif not selected:
            choice = remaining[0]
        else:
            d = [min(dist2[c, s] for s in selected) for c in remaining]
            top = max(d)
            choice = next(c for c, dc in zip(remaining, d, strict=True) if dc >= top - TIE_TOL)
        picks.append(choice)
        selected.append(choice)
    return picks


@PROPERTY
@given(st.data())
def test_matches_brute_force_reference(data):
    n = data.draw(st.integers(1, 30), label="n")
    d = data.draw(st.integers(1, 4), label="d")
    # small integers: many exact and rounding-level ties, zero rows, parallel rows
    x = data.draw(hnp.arrays(np.float64, (n, d), elements=st.integers(-3, 3).map(float)), label="x")
    order = data.draw(st.permutations(range(n)), label="order")
    candidates = order[: data.draw(st.integers(1, n), label="n_candidates")]
    already = data.draw(st.lists(st.integers(0, n - 1), max_size=5, unique=True), label="already")
    eligible = [c for c in candidates if c not in already]
    first = data.draw(st.none() | st.sampled_from(eligible), label="first") if eligible else None
    k = data.draw(st.integers(0, n + 2), label="k")
    picks = k_center_greedy(x, k, candidates=np.array(candidates), already=np.array(already, dtype=int), first=first)
    assert picks == brute_force_k_center(x, k, candidates, already, first)
    assert len(picks) == len(set(picks)) == min(k, len(eligible))
    assert set(picks) <= set(eligible)


def test_k_center_is_linear_time():
    x = np.random.default_rng(0).standard_normal((20_000, 256))
    start = time.perf_counter()
    picks = k_center_greedy(x, 200)
    elapsed = time.perf_counter() - start
    assert len(set(picks)) == 200
    assert elapsed < 5.0, f"k_center_greedy took {elapsed:.2f} s"


# -- select_batch -----------------------------------------------------------------------------------------------


def random_inputs(n: int = 200, k: int = 5, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(k, 0.5), size=n), rng.normal(size=(n, d))


@pytest.mark.parametrize(("size", "share", "n_random"), [(20, 0.25, 5), (20, 0.1, 2), (7, 0.0, 0), (10, 1.0, 10)])
def test_random_share_count(size, share, n_random):
    probs, emb = random_inputs()
    batch = select_batch(probs, emb, strategy="entropy", size=size, random_share=share)
    assert len(batch) == size
    flags = [is_random for _, is_random, _ in batch]
    assert sum(flags) == n_random
    assert flags == [False] * (size - n_random) + [True] * n_random  # active picks first


def test_default_random_share_is_ten_percent():
    probs, emb = random_inputs()
    assert sum(r for _, r, _ in select_batch(probs, emb, strategy="margin", size=30)) == 3


def test_random_rows_are_a_uniform_draw_from_the_seed():
    probs, emb = random_inputs()
    batch = select_batch(probs, emb, strategy="margin", size=12, random_share=1.0, seed=42)
    expected = np.random.default_rng(42).choice(len(probs), size=12, replace=False)
    assert [row for row, _, _ in batch] == expected.tolist()


def test_scores_are_the_rows_uncertainty():
    probs, emb = random_inputs()
    scores = uncertainty(probs, "least_confidence")
    for row, _, score in select_batch(probs, emb, strategy="least_confidence", size=25, random_share=0.2):
        assert score == scores[row]
        assert isinstance(row, int) and isinstance(score, float)


def uncertainty_pool(scores: np.ndarray, excluded: set[int], size: int) -> set[int]:
    ranked = sorted((i for i in range(len(scores)) if i not in excluded), key=lambda i: (-scores[i], i))
    return set(ranked[:size])


@PROPERTY
@given(
    size=st.integers(0, 60),
    share=st.floats(0, 1),
    pool_factor=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    strategy=st.sampled_from(STRATEGIES),
)
def test_batch_invariants(size, share, pool_factor, seed, strategy):
    probs, emb = random_inputs(n=50, seed=seed % 7)
    probs[::5] = probs[0]  # repeated rows: score ties
    batch = select_batch(
        probs, emb, strategy=strategy, size=size, random_share=share, pool_factor=pool_factor, seed=seed
    )
    total = min(size, 50)
    rows = [row for row, _, _ in batch]
    assert len(rows) == len(set(rows)) == total
    random_rows = {row for row, is_random, _ in batch if is_random}
    active = [row for row, is_random, _ in batch if not is_random]
    assert len(random_rows) == round(total * share)
    scores = uncertainty(probs, strategy)
    pool = uncertainty_pool(scores, random_rows, pool_factor * len(active))
    assert set(active) <= pool
    if active:
        assert active[0] == min(pool, key=lambda i: (-scores[i], i))  # the most uncertain candidate


def duplicated_clusters(
    order: tuple[int, ...], per: int = 6, others: int = 60, noise: float = 1e-3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs, embeddings, cluster id) of clusters of near-identical photos along orthogonal directions, cluster c's
    uncertainty ranked order[c] (0 = most uncertain, all above the confident `others`, whose cluster id is -1)."""
    rng = np.random.default_rng(0)
    n_clusters, classes = len(order), 4
    emb, probs, cluster = [], [], []
    for c, rank in enumerate(order):
        for j in range(per):
            emb.append(np.eye(n_clusters + 2)[c] + rng.normal(0, noise, n_clusters + 2))
            top = 0.26 + 0.02 * rank + 0.001 * j  # near uniform: high uncertainty, clusters strictly ordered
            probs.append([top] + [(1 - top) / (classes - 1)] * (classes - 1))
            cluster.append(c)
    for _ in range(others):
        emb.append(rng.normal(size=n_clusters + 2))
        probs.append([0.97, 0.01, 0.01, 0.01])
        cluster.append(-1)
    perm = rng.permutation(len(emb))
    return np.array(probs)[perm], np.array(emb)[perm], np.array(cluster)[perm]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_active_picks_are_diverse_across_duplicated_clusters(strategy):
    probs, emb, cluster = duplicated_clusters((0, 1, 2))
    # pure uncertainty (a pool of exactly n_active rows) would label three copies of the same photo
    narrow = select_batch(probs, emb, strategy=strategy, size=3, random_share=0, pool_factor=1)
    assert [cluster[r] for r, _, _ in narrow] == [0, 0, 0]
    batch = select_batch(probs, emb, strategy=strategy, size=3, random_share=0, pool_factor=6)
    picked = [cluster[r] for r, _, _ in batch]
    assert picked[0] == 0  # the most uncertain photo first
    assert sorted(picked) == [0, 1, 2]


def test_labeled_embeddings_count_as_covered():
    # uncertainty: cluster 0 > 2 > 3 > 1; exact duplicates on orthogonal axes tie on distance: the more uncertain wins
    probs, emb, cluster = duplicated_clusters((0, 3, 1, 2), per=5, noise=0.0)
    plain = select_batch(probs, emb, strategy="entropy", size=2, random_share=0, pool_factor=10)
    assert [cluster[r] for r, _, _ in plain] == [0, 2]
    labeled = np.eye(6)[[2, 3]] * 5.0
    covered = select_batch(
        probs, emb, strategy="entropy", size=2, random_share=0, pool_factor=10, labeled_embeddings=labeled
    )
    assert [cluster[r] for r, _, _ in covered] == [0, 1]
    empty = select_batch(
        probs, emb, strategy="entropy", size=2, random_share=0, pool_factor=10, labeled_embeddings=np.zeros((0, 6))
    )
    assert empty == plain


def test_deterministic_for_a_seed():
    probs, emb = random_inputs(n=300)
    kwargs = {"strategy": "entropy", "size": 40, "random_share": 0.5}
    assert select_batch(probs, emb, seed=7, **kwargs) == select_batch(probs, emb, seed=7, **kwargs)
    assert select_batch(probs, emb, seed=7, **kwargs) != select_batch(probs, emb, seed=8, **kwargs)


def test_small_pools_and_sizes():
    probs, emb = random_inputs(n=8)
    assert select_batch(probs, emb, strategy="margin", size=0) == []
    everything = select_batch(probs, emb, strategy="margin", size=50, random_share=0.5)
    assert sorted(row for row, _, _ in everything) == list(range(8))
    assert sum(r for _, r, _ in everything) == 4  # round(min(size, n) * share)
    assert select_batch(np.zeros((0, 3)), np.zeros((0, 4)), strategy="margin", size=5) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"random_share": -0.1}, "random_share"),
        ({"random_share": 1.5}, "random_share"),
        ({"random_share": float("nan")}, "random_share"),
        ({"size": -1}, "size"),
        ({"pool_factor": 0}, "pool_factor"),
        ({"strategy": "bald"}, "unknown strategy"),
        ({"embeddings": np.zeros((9, 4))}, "rows"),
        ({"embeddings": np.zeros(10)}, "rows"),
        ({"labeled_embeddings": np.zeros((3, 5))}, "labeled_embeddings"),
    ],
)
def test_select_batch_validation(kwargs, message):
    probs, emb = random_inputs(n=10, d=4)
    args = {"probs": probs, "embeddings": emb, "strategy": "entropy", "size": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        select_batch(**args)
