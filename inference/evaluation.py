"""Evaluation and index steps of the loop that run a trained model (the Recognizer): predictions of a version's
items (through the feature cache for a quick retrain), calibration on the validation split, the frozen test split's
report, two versions compared on the same test split, and the Faiss index of the train split. Each writes its
result into the version's artifact folder (atomically) and returns a summary; the pipeline (pipeline/chain.py) calls
them in order."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from django.conf import settings

from labeling import storage
from training.engine.artifact import GALLERY_CACHE, TEST_CACHE
from training.engine.atomic import write_json_atomic
from training.models import ModelVersion

from .batch import embed_paths, predict_items_cached, predict_paths, split_accuracy
from .calibration import calibrate, write_calibration, write_gallery_labels
from .index import build_index
from .recognizer import Recognizer

log = logging.getLogger(__name__)


def predict_items(rec, items: list[dict]):
    """predict_paths for a version's items; for a quick retrain (its backbone is the pretrained one, frozen) through
    the feature cache its training filled, so calibration, the test report and the index do not run every photo
    through the backbone again."""
    if rec.model is not None and (rec.config or {}).get("quick"):
        return predict_items_cached(rec, items, settings.LOUPE_FEATURE_CACHE)
    return predict_paths(rec, [it["path"] for it in items])


def calibrate_version(out_dir: Path, manifest: dict) -> dict:
    """Temperature, suggested thresholds and retrieval rejection per head, fitted on the validation split with
    the train split as gallery (inference.calibration); written as calibration.json."""
    val = [it for it in manifest["items"] if it["split"] == "val"]
    train = [it for it in manifest["items"] if it["split"] == "train"]
    if not val:
        return {}
    rec = Recognizer.load(out_dir)
    v_probs, v_emb, v_ok = predict_items(rec, val)
    _g_probs, g_emb, g_ok = predict_items(rec, train)
    val = [it for it, ok in zip(val, v_ok, strict=True) if ok]
    train = [it for it, ok in zip(train, g_ok, strict=True) if ok]
    # The index build at promote embeds the same train images with the same model: keep them for it.
    np.savez(out_dir / GALLERY_CACHE, ids=np.array([it["id"] for it in train], dtype=np.int64), emb=g_emb[g_ok])
    cal = calibrate(
        heads=rec.heads,
        label_maps=rec.label_maps,
        val_probs={h: p[v_ok] for h, p in v_probs.items()},
        val_labels={h: [it["labels"].get(h) for it in val] for h in rec.heads},
        val_emb=v_emb[v_ok],
        gallery_emb=g_emb[g_ok],
        gallery_labels={h: [it["labels"].get(h) for it in train] for h in rec.heads},
        val_ids=[it["id"] for it in val],  # the model page's example photos of confused pairs
    )
    write_calibration(out_dir, cal)
    return {"temperature": cal["temperature"], "softmax_threshold": cal["softmax_threshold"]}


def test_split_report(out_dir: Path, manifest: dict) -> dict:
    """Accuracy of the trained model on the frozen test split: reported, never trained on or used to pick an
    epoch (the engine does not read test items)."""
    items = [it for it in manifest["items"] if it["split"] == "test"]
    if not items:
        return {}
    rec = Recognizer.load(out_dir)
    predicted = predict_items(rec, items)
    report = split_accuracy(rec, items, predicted)
    write_json_atomic(out_dir / "test_metrics.json", report)
    _probs, emb, ok = predicted
    np.savez(out_dir / TEST_CACHE, ids=np.array([it["id"] for it in items], dtype=np.int64)[ok], emb=emb[ok])
    return report


def model_versions_compare(*, a: ModelVersion, b: ModelVersion) -> dict:
    """Top-1/top-5 per head of two versions on the same images: the newer version's frozen test split.
    Returns {"test_split_of", "n_test", "versions": {"<n>": {head: {"top1", "top5", "n"}}}}; the result is kept
    in the newer version's folder (versions never change). ValueError when that split is empty."""
    if a.project_id != b.project_id:
        raise ValueError("Compare two versions of the same project.")
    newer = a if a.number >= b.number else b
    art = storage.artifact_local(newer.artifact_dir)
    cache = art / f"compare-{min(a.number, b.number)}-{max(a.number, b.number)}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    manifest = storage.manifest_localize(json.loads((art / "manifest.json").read_text()))
    items = [it for it in manifest["items"] if it["split"] == "test"]
    if not items:
        raise ValueError(f"Version {newer.number}'s dataset has no test split to compare on.")
    out = {"test_split_of": newer.number, "n_test": len(items), "versions": {}}
    for v in (a, b):
        recognizer = Recognizer.load(storage.artifact_local(v.artifact_dir))
        out["versions"][str(v.number)] = split_accuracy(recognizer, items)["heads"]
    write_json_atomic(cache, out)
    return out


def index_build(version: ModelVersion) -> ModelVersion:
    version_id = version.id
    try:
        started = time.time()
        art = storage.artifact_local(version.artifact_dir)
        manifest = storage.manifest_localize(json.loads((art / "manifest.json").read_text()))
        gallery = [it for it in manifest["items"] if it["split"] == "train"]
        recognizer = Recognizer.load(art)
        by_id = {it["id"]: it for it in gallery}
        cache = art / GALLERY_CACHE
        if cache.is_file():  # written by the calibration after training: same model, same images
            with np.load(cache) as cached:
                ids, embeddings = cached["ids"], cached["emb"]
        else:
            embeddings, ok = embed_paths(recognizer, [it["path"] for it in gallery])
            ids, embeddings = np.array([it["id"] for it in gallery], dtype=np.int64)[ok], embeddings[ok]
        kept = [by_id[int(i)] for i in ids]
        write_gallery_labels(art, ids, {h: [it["labels"].get(h) for it in kept] for h in recognizer.heads})
        build_index(art, embeddings, ids, kind=settings.LOUPE_INDEX_KIND, flat_max=settings.LOUPE_INDEX_FLAT_MAX)
        storage.artifact_publish(art, since=started)  # published before the version is marked ready
    except Exception as exc:  # noqa: BLE001
        log.exception("index build for model version %s failed", version_id)
        ModelVersion.objects.filter(pk=version_id).update(
            index_status=ModelVersion.IndexStatus.FAILED, index_error=f"{type(exc).__name__}: {exc}"[:5000]
        )
        version.refresh_from_db()
        return version
    ModelVersion.objects.filter(pk=version_id).update(index_status=ModelVersion.IndexStatus.READY, index_size=len(ids))
    version.refresh_from_db()
    return version
