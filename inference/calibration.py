"""Per-version calibration on the validation split (pure: numpy + faiss, no Django), written as
calibration.json beside the model and read by the Recognizer:

- temperature per head (temperature scaling of the softmax confidences, fitted on the validation NLL);
- a suggested softmax threshold per head: the smallest confidence at which the accepted validation answers
  reach `target_precision`;
- retrieval rejection per head: `max_distance` (nearest labelled gallery neighbour) and `min_margin` (vote margin
  between the first and second class) at which the accepted retrieval answers reach `target_precision` with the
  most coverage; the gallery is the train split, queries are the validation photos.

Gallery labels (gallery_labels.json: {"ids": [...], "labels": {head: [...]}}) let retrieval vote per head."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from training.engine.artifact import CALIBRATION_FILE, read_artifact_json
from training.engine.atomic import write_json_atomic

from .decision import calibrate_retrieval, calibrate_thresholds, fit_temperature, retrieval_evidence

GALLERY_LABELS_FILE = "gallery_labels.json"
K_NEIGHBOURS = 20
RELIABILITY_BINS = 10
MISTAKES_KEPT = 200  # wrong validation answers kept per head (most confident first) for the model page


def _write_json(path: Path, data) -> None:
    write_json_atomic(path, data)


def write_gallery_labels(artifact_dir, ids: Sequence[int], labels: dict[str, Sequence[str | None]]) -> Path:
    path = Path(artifact_dir) / GALLERY_LABELS_FILE
    _write_json(path, {"ids": [int(i) for i in ids], "labels": {h: list(v) for h, v in labels.items()}})
    return path


def read_gallery_labels(artifact_dir) -> dict[int, dict[str, str | None]] | None:
    path = Path(artifact_dir) / GALLERY_LABELS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    heads = data["labels"]
    return {int(i): {h: heads[h][n] for h in heads} for n, i in enumerate(data["ids"])}


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), rows renormalised: the temperature-scaled probabilities from probabilities."""
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    p = np.exp(logp)
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def reliability_bins(conf: np.ndarray, right: np.ndarray, n_bins: int = RELIABILITY_BINS) -> dict:
    """Equal-width confidence bins for a reliability diagram: conf (N,) top-1 confidences 0-1, right (N,) bool.
    {"edges": n_bins + 1 floats, "count", "confidence" (mean), "accuracy" per bin (None when empty), "ece"}."""
    conf = np.asarray(conf, dtype=np.float64)
    right = np.asarray(right, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count, mean_conf, acc = [], [], []
    ece = 0.0
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        count.append(n)
        mean_conf.append(round(float(conf[sel].mean()), 4) if n else None)
        acc.append(round(float(right[sel].mean()), 4) if n else None)
        if n:
            ece += n * abs(float(conf[sel].mean()) - float(right[sel].mean()))
    return {
        "edges": [round(float(e), 4) for e in edges],
        "count": count,
        "confidence": mean_conf,
        "accuracy": acc,
        "ece": round(ece / len(conf), 4) if len(conf) else None,
    }


def calibrate(
    *,
    heads: list[str],
    label_maps: dict[str, list[str]],
    val_probs: dict[str, np.ndarray],
    val_labels: dict[str, Sequence[str | None]],
    val_emb: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: dict[str, Sequence[str | None]],
    target_precision: float = 0.95,
    val_ids: Sequence[int] | None = None,
) -> dict:
    """The calibration dict (see the module docstring) from validation predictions and a train gallery, plus
    per head the reliability bins before/after temperature scaling and, when `val_ids` (one per validation row)
    are given, the wrong validation answers as [id, true class, predicted class, confidence] rows."""
    out: dict = {
        "target_precision": target_precision,
        "temperature": {},
        "softmax_threshold": {},
        "retrieval": {},
        "reliability": {},
        "mistakes": {},
    }
    index = None
    if len(gallery_emb) and len(val_emb):
        g = np.ascontiguousarray(gallery_emb, dtype=np.float32)
        faiss.normalize_L2(g)
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        q = np.ascontiguousarray(val_emb, dtype=np.float32)
        faiss.normalize_L2(q)
        sims, nn = index.search(q, min(K_NEIGHBOURS, len(g)))
    for head in heads:
        classes = label_maps[head]
        pos = {c: i for i, c in enumerate(classes)}
        y = np.array([pos.get(lbl, -1) if lbl is not None else -1 for lbl in val_labels[head]])
        known = y >= 0
        probs = np.asarray(val_probs[head], dtype=np.float64)
        t = fit_temperature(np.log(np.clip(probs, 1e-12, None)), y) if known.any() else 1.0
        out["temperature"][head] = round(float(t), 4)
        scaled = apply_temperature(probs, t)
        conf = scaled.max(axis=1)
        right = scaled.argmax(axis=1) == y
        if known.any():
            out["reliability"][head] = {
                "before": reliability_bins(probs.max(axis=1)[known], (probs.argmax(axis=1) == y)[known]),
                "after": reliability_bins(conf[known], right[known]),
            }
        if val_ids is not None:
            wrong = np.flatnonzero(known & ~right)
            wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:MISTAKES_KEPT]
            pred = scaled.argmax(axis=1)
            out["mistakes"][head] = [
                [int(val_ids[r]), classes[y[r]], classes[pred[r]], round(float(conf[r]), 4)] for r in wrong
            ]
        out["softmax_threshold"][head] = (
            round(
                float(
                    calibrate_thresholds(conf[known & right], conf[known & ~right], target_precision=target_precision)
                ),
                4,
            )
            if known.any()
            else None
        )
        if index is None or not known.any():
            continue
        d_ok, d_bad, m_ok, m_bad = [], [], [], []
        g_labels = gallery_labels[head]
        for row in np.flatnonzero(known):
            ev = retrieval_evidence(
                [g_labels[j] for j in nn[row] if j >= 0], [float(s) for s in sims[row][nn[row] >= 0]]
            )
            if not ev.scores:
                continue  # no labelled neighbour: not a retrieval answer at all
            best = min(ev.scores, key=lambda c: (-ev.scores[c], c))
            (d_ok if best == classes[y[row]] else d_bad).append(ev.top1_distance)
            (m_ok if best == classes[y[row]] else m_bad).append(ev.margin)
        if d_ok or d_bad:
            cal = calibrate_retrieval(
                np.array(d_ok), np.array(d_bad), np.array(m_ok), np.array(m_bad), target_precision=target_precision
            )
            cal["n"] = len(d_ok) + len(d_bad)
            cal["accuracy"] = round(len(d_ok) / cal["n"], 4)
            out["retrieval"][head] = cal
    out["n_val"] = int(len(val_emb))
    out["n_gallery"] = int(len(gallery_emb))
    return out


def write_calibration(artifact_dir, calibration: dict) -> Path:
    path = Path(artifact_dir) / CALIBRATION_FILE
    _write_json(path, calibration)
    return path


def read_calibration(artifact_dir) -> dict | None:
    return read_artifact_json(artifact_dir, CALIBRATION_FILE)
