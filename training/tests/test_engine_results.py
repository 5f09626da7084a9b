"""Tests of what a finished training run writes and reports: the artifact files, metrics.json, progress calls, the
evaluation report (one shared run over a manifest with every awkward case at once; CPU only, tiny images)."""

import copy
import json

import pytest
import torch

from training.engine import resolve_config, train_model
from training.engine.model import create_backbone
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset


def tiny(**over):
    return {**TINY_TEST_CONFIG, **over}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One shared training run over a manifest with every awkward case at once."""
    root = tmp_path_factory.mktemp("engine")
    manifest = make_shapes_dataset(
        root / "img", n=40, size=40, colors=("red", "blue"), shapes=("square", "circle", "triangle")
    )
    items = manifest["items"]
    for it in items:
        if it["split"] == "val":
            it["labels"]["shape"] = None  # head with all-unknown val labels -> n_val 0, no crash
    for it in items[:6]:
        if it["split"] == "train":
            it["labels"]["color"] = None  # unknown colour in train: masked out of the loss
    corrupt = root / "img" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    items.append(
        {
            "id": 900,
            "path": str(corrupt),
            "labels": {"shape": "square", "color": "red"},
            "group": "gx",
            "source": "real",
            "split": "train",
        }
    )
    missing_test = [str(root / "does-not-exist" / f"t{i}.jpg") for i in range(3)]
    for i, p in enumerate(missing_test):  # would be counted as skipped if training ever touched them
        items.append(
            {
                "id": 1000 + i,
                "path": p,
                "labels": {"shape": "circle", "color": "blue"},
                "group": "gt",
                "source": "real",
                "split": "test",
            }
        )
    calls = []
    out = root / "run"
    metrics = train_model(copy.deepcopy(manifest), tiny(epochs=3, progress_every=2), out, progress=calls.append)
    return {
        "manifest": manifest,
        "metrics": metrics,
        "out": out,
        "calls": calls,
        "corrupt": str(corrupt),
        "missing_test": missing_test,
    }


def test_train_writes_all_files(run):
    out = run["out"]
    for name in ("model.pt", "label_maps.json", "metrics.json", "config.json"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "loupe-v1"
    assert ckpt["heads"] == run["manifest"]["heads"]
    assert ckpt["label_maps"] == {"shape": ["square", "circle", "triangle"], "color": ["red", "blue"]}
    assert ckpt["config"] == resolve_config(tiny(epochs=3, progress_every=2))
    assert ckpt["embedding_dim"] > 0 and len(ckpt["mean"]) == 3 and len(ckpt["std"]) == 3
    assert ckpt["state_dict"]["heads.0.weight"].shape == (3, ckpt["embedding_dim"])
    assert json.loads((out / "label_maps.json").read_text()) == ckpt["label_maps"]
    assert json.loads((out / "config.json").read_text()) == ckpt["config"]
    assert json.loads((out / "metrics.json").read_text()) == run["metrics"]


def test_metrics_content(run):
    m = run["metrics"]
    for key in ("heads", "primary", "best_epoch", "history", "n_train", "n_val", "skipped_files", "device", "seconds"):
        assert key in m, key
    assert m["n_train"] == 31 and m["n_val"] == 10 and m["n_test"] == 3
    assert m["device"] == "cpu" and m["metrics_on"] == "val"
    assert len(m["history"]) == 3 and 1 <= m["best_epoch"] <= 3
    # all val "shape" labels are unknown: no metrics for that head, and the primary is the colour top-1
    shape = {k: m["heads"]["shape"][k] for k in ("top1", "top5", "n_val", "n_train", "per_class", "most_confused")}
    assert shape == {"top1": None, "top5": None, "n_val": 0, "n_train": 31, "per_class": {}, "most_confused": []}
    assert m["heads"]["color"]["n_val"] == 10 and m["heads"]["color"]["n_train"] == 26
    assert m["primary"] == m["heads"]["color"]["top1"]
    assert m["heads"]["color"]["top5"] == 1.0  # top-5 with K=2 is top-2


def test_corrupt_file_skipped_and_test_split_never_read(run):
    m = run["metrics"]
    assert m["skipped_files"] == 1
    assert m["skipped_paths"] == [run["corrupt"]]
    for p in run["missing_test"]:
        assert p not in m["skipped_paths"]


def test_progress_calls(run):
    calls = run["calls"]
    epoch_calls = [c for c in calls if c["phase"] == "epoch"]
    assert [c["epoch"] for c in epoch_calls] == [1, 2, 3]
    for c in calls:
        for key in ("epoch", "epochs", "step", "steps_per_epoch", "loss", "metrics", "eta_s"):
            assert key in c
        assert c["epochs"] == 3 and isinstance(c["loss"], float) and c["eta_s"] >= 0
    for c in epoch_calls:
        assert c["step"] == c["steps_per_epoch"]
        assert set(c["metrics"]) == {"shape", "color"}
        assert set(c["metrics"]["color"]) >= {"top1", "top5"}
    assert any(c["phase"] == "train" and c["metrics"] == {} for c in calls)  # mid-epoch calls
    assert epoch_calls[-1]["eta_s"] == 0.0


def test_evaluation_artifacts(run):
    out, m = run["out"], run["metrics"]
    for name in ("confusion_color.png", "confusion_shape.png", "curves.png", "report.md", "confusion_color.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    color = m["heads"]["color"]
    assert set(color["per_class"]) <= {"red", "blue"} and sum(c["n"] for c in color["per_class"].values()) == 10
    for c in color["per_class"].values():
        assert 0 <= c["recall"] <= 1 and c["accuracy"] == c["recall"]
    assert isinstance(color["most_confused"], list)
    # Retrieval of validation embeddings against a Faiss gallery of the train split.
    r = m["retrieval"]["color"]
    assert 0 <= r["recall@1"] <= r["recall@5"] <= 1 and 0 <= r["map"] <= 1 and r["n_gallery"] > 0
    text = (out / "report.md").read_text()
    assert "color" in text and "curves.png" in text and "confusion_color.png" in text


def test_pretrained_from_loupe_artifact_and_bad_files(run, tmp_path):
    cfg = resolve_config(tiny(pretrained_path=str(run["out"] / "model.pt")))
    backbone, weights = create_backbone(cfg["backbone"], image_size=32, pretrained_path=cfg["pretrained_path"])
    assert weights == {"source": "file", "detail": f"backbone of Loupe model {run['out'] / 'model.pt'}"}
    sd = torch.load(run["out"] / "model.pt", weights_only=True)["state_dict"]
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, sd["backbone." + k])
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone("test_resnet", image_size=32, pretrained_path=str(tmp_path / "nope.pth"))
    other = tmp_path / "other.pth"
    torch.save({"something.else": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="does not look like weights for backbone 'test_resnet'"):
        create_backbone("test_resnet", image_size=32, pretrained_path=str(other))
