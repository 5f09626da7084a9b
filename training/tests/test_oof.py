"""Out-of-fold predictions: group-aware folds, every labeled train/val image predicted by a model that never
saw it, test items left out."""

import json

import numpy as np
import pytest

from training.engine.oof import group_folds, out_of_fold_predictions
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset


def test_group_folds_keep_groups_together_and_balance():
    items = [{"id": i, "group": f"g{i // 3}"} for i in range(60)]  # 20 groups of 3
    folds = group_folds(items, 5)
    by_group = {}
    for it, f in zip(items, folds, strict=True):
        by_group.setdefault(it["group"], set()).add(f)
    assert all(len(s) == 1 for s in by_group.values())
    assert sorted(np.bincount(folds).tolist()) == [12] * 5
    assert group_folds(items, 5) == folds  # deterministic
    with pytest.raises(ValueError, match="cannot fill"):
        group_folds(items[:3], 2)
    with pytest.raises(ValueError, match="at least 2"):
        group_folds(items, 1)


def test_out_of_fold_predictions_cover_every_labeled_image_once(tmp_path):
    manifest = make_shapes_dataset(tmp_path / "imgs", n=36, seed=1)
    for i, it in enumerate(manifest["items"]):
        it["group"] = f"g{i // 2}"
    manifest["items"][0]["split"] = "test"
    test_id = manifest["items"][0]["id"]
    result = out_of_fold_predictions(manifest, {**TINY_TEST_CONFIG, "epochs": 3}, tmp_path / "oof", k=3, mode="cheap")
    assert result["n"] == 35 and result["mode"] == "cheap"
    data = np.load(tmp_path / "oof" / "oof_predictions.npz")
    assert str(test_id) not in set(data["ids"].tolist())
    for head in ("shape", "color"):
        p = data[f"probs_{head}"]
        assert p.shape[0] == 35 and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    folds = data["fold"]
    ids = data["ids"].tolist()
    groups = {it["id"]: it["group"] for it in manifest["items"]}
    fold_of_group = {}
    for i, f in zip(ids, folds, strict=True):
        assert fold_of_group.setdefault(groups[int(i)], f) == f
    meta = json.loads((tmp_path / "oof" / "oof_meta.json").read_text())
    assert meta["k"] == 3 and meta["epochs_per_fold"] == 1 and len(meta["folds"]) == 3
    with pytest.raises(ValueError, match="mode"):
        out_of_fold_predictions(manifest, TINY_TEST_CONFIG, tmp_path / "x", mode="fast")
