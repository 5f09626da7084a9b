"""The artifact folder of a model version: the names of the files the engine, the calibration and the index write
into it, and one reader for its JSON files. Defined here, at the bottom of the layers, so that every app can read
an artifact without importing the app that wrote the file. Pure: no Django."""

from __future__ import annotations

import json
from pathlib import Path

CALIBRATION_FILE = "calibration.json"  # inference.calibration: temperatures, thresholds, reliability bins
INDEX_FILE = "index.faiss"  # inference.index.build_index: the Faiss index of the train split
IDS_FILE = "gallery_ids.npy"  # the index's row -> image id
INDEX_META_FILE = "index.json"  # the index's kind, size, nprobe and measured recall
GALLERY_CACHE = "gallery_embeddings.npz"  # train-split embeddings from the calibration, reused by the index build
TEST_CACHE = "test_embeddings.npz"  # test-split embeddings from the test report, reused by the arms probe


def read_artifact_json(artifact_dir, name: str) -> dict | None:
    """The JSON file `name` of an artifact folder; None when it is missing or unreadable."""
    try:
        return json.loads((Path(artifact_dir) / name).read_text())
    except (OSError, ValueError):
        return None
