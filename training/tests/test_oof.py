"""Out-of-fold predictions: group-aware folds, every labeled image (test split included) predicted by a model that
never saw it."""

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
    """Test-split items are predicted too (a wrong test label is a reviewer's business); unlabeled items are not."""
    manifest = make_shapes_dataset(tmp_path / "imgs", n=36, seed=1)
    for i, it in enumerate(manifest["items"]):
        it["group"] = f"g{i // 2}"
    manifest["items"][0]["split"] = "test"
    manifest["items"][1]["labels"] = {}  # no known label on any head: nothing to judge
    test_id, unlabeled_id = manifest["items"][0]["id"], manifest["items"][1]["id"]
    result = out_of_fold_predictions(manifest, {**TINY_TEST_CONFIG, "epochs": 3}, tmp_path / "oof", k=3, mode="cheap")
    assert result["n"] == 35 and result["mode"] == "cheap"
    data = np.load(tmp_path / "oof" / "oof_predictions.npz")
    ids = set(data["ids"].tolist())
    assert str(test_id) in ids and str(unlabeled_id) not in ids
    row = data["ids"].tolist().index(str(test_id))
    assert data["targets_shape"][row] == manifest["heads"][0]["classes"].index(manifest["items"][0]["labels"]["shape"])
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


def test_fold_models_average_the_photo_with_its_mirror_image(tmp_path):
    """With hflip in the training augmentation a fold model's probabilities are the mean over the photo and its
    mirror image; with hflip off, the photo's alone."""
    import shutil

    import torch

    from training.engine.data import eval_transform, normalize_batch
    from training.engine.model import build_model
    from training.engine.oof import _predict, tta_flips

    assert tta_flips({"hflip": True, "vflip": True}) == [(), (3,), (2,)]
    assert tta_flips({"hflip": True, "augment": "none"}) == [()] and tta_flips({"hflip": False}) == [()]
    manifest = make_shapes_dataset(tmp_path / "imgs", n=24, seed=2)
    out_of_fold_predictions(manifest, {**TINY_TEST_CONFIG, "epochs": 2}, tmp_path / "oof", k=3, mode="full")
    items = manifest["items"][:6]
    fold = tmp_path / "oof" / "fold-0"
    ckpt = torch.load(fold / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["hflip"] is True
    model, _ = build_model(ckpt["config"], ckpt["heads"], load_weights=False)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    from PIL import Image

    tf = eval_transform(ckpt["config"]["image_size"])
    x = normalize_batch(
        torch.stack([tf(Image.open(it["path"]).convert("RGB")) for it in items]), ckpt["mean"], ckpt["std"]
    )
    with torch.inference_mode():
        (one,), (mirrored,) = ([torch.softmax(lg, 1).numpy() for lg in model(v)[0][:1]] for v in (x, x.flip(3)))
    head = ckpt["heads"][0]["name"]
    assert np.allclose(_predict(fold, items, 4)[head], (one + mirrored) / 2, atol=1e-5)
    plain = tmp_path / "plain"
    shutil.copytree(fold, plain)
    torch.save({**ckpt, "config": {**ckpt["config"], "hflip": False}}, plain / "model.pt")
    assert np.allclose(_predict(plain, items, 4)[head], one, atol=1e-5)
    assert not np.allclose(one, mirrored, atol=1e-5)
