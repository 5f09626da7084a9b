"""Hierarchy-consistent predictions (car make → model, coarse → fine): the child head never contradicts its
parent. Pure numpy; used by inference after averaging the probabilities of the views of one object.

With p_parent over parent classes and p_child over child classes, each child class c has one parent π(c).
The joint score of a consistent pair is p_child(c) · p_parent(π(c)); normalised over children it gives the
consistent child distribution q_child, and summing q_child over the children of each parent gives the
consistent parent distribution q_parent (parents without any child class keep their own share). Decoding is
top-down: the parent is argmax q_parent, the child is the best child *of that parent* — so a predicted model
always belongs to the predicted make (a weak model then falls below its threshold and is returned as null,
while the make stays)."""

from __future__ import annotations

import numpy as np


def parent_index(child_classes: list[str], parent_classes: list[str], class_parents: dict[str, str]) -> np.ndarray:
    """For each child class, the index of its parent class (-1 when the mapping does not say)."""
    pos = {c: i for i, c in enumerate(parent_classes)}
    return np.array([pos.get(class_parents.get(c), -1) for c in child_classes], dtype=np.int64)


def consistent(p_parent: np.ndarray, p_child: np.ndarray, child_parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (q_parent, q_child), the joint-consistent probability vectors (1-D, or 2-D batches). Child
    classes with an unknown parent (-1) keep their own probability times the mean parent confidence, so they
    are neither favoured nor dropped."""
    p_parent = np.asarray(p_parent, dtype=np.float64)
    p_child = np.asarray(p_child, dtype=np.float64)
    single = p_parent.ndim == 1
    if single:
        p_parent, p_child = p_parent[None], p_child[None]
    known = child_parent >= 0
    parent_of = np.where(known, child_parent, 0)
    support = p_parent[:, parent_of]  # (N, C): p_parent of each child's parent
    support = np.where(known[None, :], support, p_parent.mean(axis=1, keepdims=True))
    joint = p_child * support
    total = joint.sum(axis=1, keepdims=True)
    q_child = np.divide(joint, total, out=np.full_like(joint, 1.0 / joint.shape[1]), where=total > 0)
    # Parents with children get the mass of their children; childless parents keep their share of p_parent.
    has_child = np.zeros(p_parent.shape[1], dtype=bool)
    has_child[child_parent[known]] = True
    q_parent = np.zeros_like(p_parent)
    np.add.at(q_parent.T, child_parent[known], q_child[:, known].T)
    childless_mass = (p_parent * ~has_child).sum(axis=1, keepdims=True)
    q_parent = q_parent * (1.0 - childless_mass) + p_parent * ~has_child
    # Unknown-parent children's mass is spread like the parent distribution (they imply no parent).
    unknown_mass = q_child[:, ~known].sum(axis=1, keepdims=True)
    if np.any(~known):
        q_parent = q_parent * (1.0 - unknown_mass) + p_parent * unknown_mass
    q_parent /= q_parent.sum(axis=1, keepdims=True)
    if single:
        return q_parent[0], q_child[0]
    return q_parent, q_child


def decode(q_parent: np.ndarray, q_child: np.ndarray, child_parent: np.ndarray) -> tuple[int, int]:
    """Top-down decision for one object: (parent index, child index) with the child belonging to the parent
    (or, when the parent has no child class, the best child whose parent is unknown; -1 if none)."""
    parent = int(np.argmax(q_parent))
    members = np.flatnonzero(child_parent == parent)
    if members.size == 0:
        members = np.flatnonzero(child_parent < 0)
    if members.size == 0:
        return parent, -1
    return parent, int(members[np.argmax(q_child[members])])


def leaf_head(heads) -> str:
    """The name of the most specific head: the first that is no other head's parent (car: model, lego: part,
    grocery: fine); the first head when every head is someone's parent. `heads` are manifest dicts (name, parent)."""
    parents = {h.get("parent") for h in heads}
    return next((h["name"] for h in heads if h["name"] not in parents), heads[0]["name"])


def decide(
    probs: list[np.ndarray], heads: list[dict], cache: dict[str, np.ndarray] | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The Recognizer's decisions for a batch: probs[h] (N, K_h) per head (manifest heads: name, classes, parent,
    class_parents) -> (q, pred): q[h] the hierarchy-consistent probabilities (the head's own where it has no parent
    head), pred[h] (N,) int64 the decided class (-1: none). A child head is decoded top-down under its parent
    (consistent, then decode: the parent is argmax q_parent, the child the best of that parent's children), heads
    taken in order, so the accuracy figures of training, the reports and the test split are those of what is
    served. `cache` (child head name -> parent_index) keeps the class mapping between calls (the Recognizer's)."""
    q = [np.asarray(p, dtype=np.float64) for p in probs]
    pred = [p.argmax(axis=1) if p.shape[1] else np.full(len(p), -1) for p in q]
    names = {h["name"]: i for i, h in enumerate(heads)}
    for c, head in enumerate(heads):
        a = names.get(head.get("parent"))
        if a is None or not head.get("class_parents"):
            continue
        cp = cache.get(head["name"]) if cache is not None else None
        if cp is None:  # a Python loop over the classes: once per model version with a cache
            cp = parent_index(head["classes"], heads[a]["classes"], head["class_parents"])
            if cache is not None:
                cache[head["name"]] = cp
        q[a], q[c] = consistent(q[a], q[c], cp)
        parent = q[a].argmax(axis=1)
        member = cp[None, :] == parent[:, None]  # (N, K_child): the children of the decided parent
        none = ~member.any(axis=1)
        member[none] = (cp < 0)[None, :]  # a parent without child classes: the children of unknown parent
        scores = np.where(member, q[c], -np.inf)
        child = scores.argmax(axis=1)
        child[~member.any(axis=1)] = -1
        pred[a], pred[c] = parent, child
    return q, pred
