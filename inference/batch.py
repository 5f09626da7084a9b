"""Batch prediction over image files (pure Python, no Django): a Recognizer run on many photos read from disk
(reduced-size JPEG decode, decoding threads), through the backbone feature cache, and per-head accuracy of a
labelled split.

Public API::

    predict_paths(recognizer, paths, batch_size=64) -> (probs {head: (N, K)}, embeddings (N, D), ok (N,) bool)
    predict_items_cached(recognizer, items, cache_dir) -> same as predict_paths
    embed_paths(recognizer, paths, batch_size=64) -> (embeddings (N, D) float32, ok (N,) bool)
    split_accuracy(recognizer, items, predicted=None) -> {"heads": {head: {"top1", "top5", "n"}}, "n", "unreadable"}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from inference.recognizer import Recognizer
from training.engine.data import draft_size, load_image_file
from training.engine.hierarchy import decide

log = logging.getLogger(__name__)


def predict_paths(
    recognizer: Recognizer, paths: Sequence[str], batch_size: int = 64
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Run image files through the model (reduced-size JPEG decode, validation transform).

    Returns ({head: (N, K) float32 probabilities}, embeddings (N, D) float32, ok (N,) bool). A file that cannot
    be read does not raise: its rows are all zeros, ok[i] is False and a warning naming the file is logged."""
    n = len(paths)
    out = np.zeros((n, recognizer.embedding_dim), dtype=np.float32)
    probs = {h: np.zeros((n, len(recognizer.label_maps[h])), dtype=np.float32) for h in recognizer.heads}
    ok = np.zeros(n, dtype=bool)
    if n == 0:
        return probs, out, ok
    tf = recognizer._transform
    min_side = draft_size(recognizer.image_size)

    def load(path: str):
        try:
            return tf(load_image_file(path, min_side))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            log.warning("cannot read %s: %s: %s", path, type(exc).__name__, exc)
            return None

    workers = max(1, min(4, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes/resizes without holding the GIL
        for start in range(0, n, batch_size):
            chunk = list(pool.map(load, paths[start : start + batch_size]))
            good = [i for i, t in enumerate(chunk) if t is not None]
            if not good:
                continue
            p, emb = recognizer._forward(torch.stack([chunk[i] for i in good]))
            rows = np.asarray(good) + start
            out[rows] = emb
            for h in recognizer.heads:
                probs[h][rows] = p[h]
            ok[rows] = True
    return probs, out, ok


def predict_items_cached(
    recognizer: Recognizer, items: Sequence[dict], cache_dir
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """predict_paths for items ({"path"[, "sha256"]}) through the feature cache (training.engine.features) keyed by
    this model's own backbone weights: only photos not seen by this backbone go through it; the heads run on the
    cached features. Same outputs as predict_paths with the torch backend; falls back to predict_paths when the
    version is served from model.onnx alone."""
    from training.engine.features import cached_features  # noqa: PLC0415

    if recognizer.model is None:
        return predict_paths(recognizer, [it["path"] for it in items])
    n = len(items)
    probs = {h: np.zeros((n, len(recognizer.label_maps[h])), dtype=np.float32) for h in recognizer.heads}
    out = np.zeros((n, recognizer.embedding_dim), dtype=np.float32)
    if n == 0:
        return probs, out, np.zeros(0, dtype=bool)
    model = recognizer.model
    config = {**recognizer.config, "device": str(recognizer.device)}
    feats = cached_features(items, config, cache_dir, backbone=model.backbone, mean=recognizer.mean, std=recognizer.std)
    rows = np.flatnonzero(feats.ok)
    with torch.inference_mode():
        for start in range(0, len(rows), 4096):
            chunk = rows[start : start + 4096]
            logits, emb = model.heads_forward(torch.from_numpy(feats.X[chunk]).to(recognizer.device))
            for h, lg in zip(recognizer.heads, logits, strict=True):
                probs[h][chunk] = F.softmax(lg.float(), dim=1).cpu().numpy()
            out[chunk] = F.normalize(emb.float(), dim=1).cpu().numpy()
    return probs, out, feats.ok


def embed_paths(recognizer: Recognizer, paths: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Embed image files: (embeddings (N, D) float32, ok (N,) bool); see predict_paths."""
    _probs, emb, ok = predict_paths(recognizer, paths, batch_size)
    return emb, ok


def split_accuracy(recognizer: Recognizer, items: Sequence[dict], predicted=None) -> dict:
    """Top-1/top-5 per head of the model on manifest items ({"path", "labels": {head: class or None}}) as
    {"heads": {head: {"top1", "top5", "n"}}, "n", "unreadable"}; unknown labels, or classes the model does not
    know, are not counted. Top-1 is the decision served (a child head decoded under its parent head), top-5 the
    order of the hierarchy-consistent probabilities. `predicted`: predict_paths' answer for these items when the
    caller already has it."""
    probs, _emb, ok = predicted if predicted is not None else predict_paths(recognizer, [it["path"] for it in items])
    # the decisions served: a child head decoded under its parent head (hierarchy.decide, as recognize() does)
    q, pred = decide([probs[h] for h in recognizer.heads], recognizer.heads_meta)
    out: dict[str, dict] = {}
    for hi, h in enumerate(recognizer.heads):
        index = {c: i for i, c in enumerate(recognizer.label_maps[h])}
        rows = [(r, index[it["labels"].get(h)]) for r, it in enumerate(items) if ok[r] and it["labels"].get(h) in index]
        if not rows:
            out[h] = {"top1": None, "top5": None, "n": 0}
            continue
        r_idx = np.array([r for r, _ in rows])
        y = np.array([c for _, c in rows])
        p = q[hi][r_idx]
        k = min(5, p.shape[1])
        topk = np.argsort(-p, axis=1, kind="stable")[:, :k]
        out[h] = {
            "top1": float((pred[hi][r_idx] == y).mean()),
            "top5": float((topk == y[:, None]).any(axis=1).mean()),
            "n": len(rows),
        }
    return {"heads": out, "n": len(items), "unreadable": int((~ok).sum())}
