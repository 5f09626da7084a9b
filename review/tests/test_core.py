"""review.core.rank_label_issues: cleanlab's calibrated count of label issues cuts the self-confidence ranking."""

import numpy as np
import pytest
from cleanlab.count import num_label_issues

from review.core import rank_label_issues


def _underconfident(seed=0, n=900, k=6, flip=0.1):
    """Out-of-fold-like probabilities of a model that is right more often than it is confident: the true class
    gets 0.35-0.9 and the rest is spread; 10 % of the given labels are flipped to another class."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n) * 0.1
    p_true = rng.uniform(0.35, 0.9, n)
    probs = probs / probs.sum(1, keepdims=True) * (1 - p_true[:, None])
    probs[np.arange(n), true] = p_true
    given = true.copy()
    flipped = rng.choice(n, int(flip * n), replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, k, len(flipped))) % k
    return given, probs, set(flipped.tolist())


def test_the_queue_is_the_calibrated_count_of_lowest_self_confidence_rows():
    given, probs, flipped = _underconfident()
    issues = rank_label_issues(given, probs)
    n = num_label_issues(given, probs, estimation_method="off_diagonal_calibrated")
    plain = num_label_issues(given, probs, estimation_method="off_diagonal")
    assert plain < 0.7 * len(flipped) and n > 0.9 * len(flipped)  # the plain off-diagonal count misses many flips
    found = {it.index for it in issues}
    assert len(issues) <= 1.2 * len(flipped) and len(found & flipped) >= 0.9 * len(flipped)
    quality = [it.quality for it in issues]
    assert quality == sorted(quality)  # worst first
    assert all(it.suggested != it.given for it in issues)
    top = [it.index for it in issues[: len(flipped)]]
    assert sum(i in flipped for i in top) >= 0.9 * len(flipped)


def test_not_predicted_rows_are_left_out_and_bad_inputs_refused():
    given, probs, _ = _underconfident(seed=1, n=300)
    probs[:5] = np.nan
    assert all(it.index >= 5 for it in rank_label_issues(given, probs))
    assert rank_label_issues(np.zeros(4, int), np.full((4, 2), 0.5)) == []
    with pytest.raises(ValueError, match="must match"):
        rank_label_issues(given[:3], probs)
    with pytest.raises(ValueError, match="class indices"):
        rank_label_issues(np.full(len(probs), 9), probs)
