"""Hierarchy consistency: the predicted child (model) always belongs to the predicted parent (make)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from training.engine.hierarchy import consistent, decide, decode, parent_index


def test_parent_index_maps_children_to_parents():
    idx = parent_index(["Corolla", "Civic", "Mystery"], ["Honda", "Toyota"], {"Corolla": "Toyota", "Civic": "Honda"})
    assert idx.tolist() == [1, 0, -1]


def test_weak_child_evidence_does_not_override_a_confident_parent():
    # make says Toyota (0.9); model alone slightly prefers Civic (a Honda): the answer stays within Toyota.
    makes, models = ["Honda", "Toyota"], ["Civic", "Accord", "Corolla", "Yaris"]
    cp = parent_index(models, makes, {"Civic": "Honda", "Accord": "Honda", "Corolla": "Toyota", "Yaris": "Toyota"})
    q_make, q_model = consistent(np.array([0.1, 0.9]), np.array([0.35, 0.05, 0.3, 0.3]), cp)
    make, model = decode(q_make, q_model, cp)
    assert makes[make] == "Toyota" and models[model] in ("Corolla", "Yaris")
    assert np.isclose(q_make.sum(), 1) and np.isclose(q_model.sum(), 1)


@settings(max_examples=200, deadline=None)
@given(
    n_parents=st.integers(1, 6),
    n_children=st.integers(1, 15),
    seed=st.integers(0, 10_000),
    unknown_share=st.floats(0, 0.5),
)
def test_decode_never_contradicts(n_parents, n_children, seed, unknown_share):
    rng = np.random.default_rng(seed)
    cp = rng.integers(0, n_parents, n_children)
    cp[rng.random(n_children) < unknown_share] = -1
    p_parent = rng.dirichlet(np.ones(n_parents))
    p_child = rng.dirichlet(np.ones(n_children))
    q_parent, q_child = consistent(p_parent, p_child, cp)
    assert np.all(q_parent >= 0) and np.all(q_child >= 0)
    assert np.isclose(q_parent.sum(), 1) and np.isclose(q_child.sum(), 1)
    parent, child = decode(q_parent, q_child, cp)
    assert parent == int(np.argmax(q_parent))
    if child >= 0:
        assert cp[child] in (parent, -1)
        if cp[child] == -1:  # only when the chosen parent has no child class
            assert not np.any(cp == parent)
    # batches give the same as single rows
    qb_parent, qb_child = consistent(np.stack([p_parent, p_parent]), np.stack([p_child, p_child]), cp)
    assert np.allclose(qb_parent[1], q_parent) and np.allclose(qb_child[0], q_child)


@settings(max_examples=100, deadline=None)
@given(n_parents=st.integers(1, 5), n_children=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_batch_decisions_are_the_recognizers(n_parents, n_children, seed):
    rng = np.random.default_rng(seed)
    cp = rng.integers(-1, n_parents, n_children)
    parents = [f"P{i}" for i in range(n_parents)]
    children = [f"C{i}" for i in range(n_children)]
    heads = [
        {"name": "make", "classes": parents, "parent": None},
        {"name": "other", "classes": ["x", "y"], "parent": None},
        {
            "name": "model",
            "classes": children,
            "parent": "make",
            "class_parents": {c: parents[p] for c, p in zip(children, cp, strict=True) if p >= 0},
        },
    ]
    p_make = rng.dirichlet(np.ones(n_parents), size=7)
    p_other = rng.dirichlet(np.ones(2), size=7)
    p_model = rng.dirichlet(np.ones(n_children), size=7)
    q, pred = decide([p_make, p_other, p_model], heads)
    assert np.array_equal(pred[1], p_other.argmax(axis=1)) and np.allclose(q[1], p_other)
    for i in range(7):
        q_make, q_model = consistent(p_make[i], p_model[i], cp)
        assert (pred[0][i], pred[2][i]) == decode(q_make, q_model, cp)
        assert np.allclose(q[0][i], q_make) and np.allclose(q[2][i], q_model)


def test_training_metrics_count_the_decision_served():
    """evaluate_logits (quick retrain, tail fine-tune) scores a child head by its top-down decision: a flat arg-max
    model of another make is not what the Recognizer answers, so it must not count as a hit."""
    import torch  # noqa: PLC0415

    from training.engine.quick import evaluate_logits  # noqa: PLC0415

    heads = [
        {"name": "make", "classes": ["Honda", "Toyota"], "parent": None},
        {
            "name": "model",
            "classes": ["Civic", "Corolla", "Yaris"],
            "parent": "make",
            "class_parents": {"Civic": "Honda", "Corolla": "Toyota", "Yaris": "Toyota"},
        },
    ]
    make = torch.log(torch.tensor([[0.1, 0.9], [0.1, 0.9]]))
    model = torch.log(torch.tensor([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25]]))  # flat arg-max: Civic (a Honda)
    Y = torch.tensor([[1, 0], [1, 1]])  # truths: Toyota Civic (inconsistent label), Toyota Corolla
    res = evaluate_logits([make, model], Y, heads)
    assert res["heads"]["model"]["top1"] == 0.5  # decided Corolla both times: row 2 right, row 1 wrong
    assert res["heads"]["make"]["top1"] == 1.0
    assert res["heads"]["model"]["per_class_counts"] == ([1, 1, 0], [0, 1, 0])
    # without the hierarchy the arg-max (Civic) would have scored row 1 and missed row 2
    flat = [dict(h, parent=None) for h in heads]
    assert evaluate_logits([make, model], Y, flat)["heads"]["model"]["per_class_counts"] == ([1, 1, 0], [1, 0, 0])
