"""Hierarchy consistency: the predicted child (model) always belongs to the predicted parent (make)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from training.engine.hierarchy import consistent, decode, parent_index


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
