"""Tests of the pure-Python training engine (no database, no network, CPU only, tiny images)."""

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.engine import DEFAULT_CONFIG, parse_manifest, resolve_config, train_model
from training.engine.loop import resolve_num_workers
from training.engine.model import build_model, create_backbone
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset

REPO = Path(__file__).resolve().parents[2]


def tiny(**over):
    return {**TINY_TEST_CONFIG, **over}


# ------------------------------------------------------------------------------------------------ config
def test_resolve_config_defaults_and_overrides():
    cfg = resolve_config(None)
    assert cfg == DEFAULT_CONFIG and cfg is not DEFAULT_CONFIG
    for key in (
        "backbone",
        "pretrained",
        "pretrained_path",
        "image_size",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "num_workers",
        "seed",
        "device",
        "max_train_seconds",
    ):
        assert key in cfg
    cfg = resolve_config({"epochs": 3, "lr": 1, "image_size": 64.0})
    assert cfg["epochs"] == 3 and cfg["lr"] == 1.0 and cfg["image_size"] == 64 and isinstance(cfg["image_size"], int)
    assert resolve_config(cfg) == cfg  # idempotent: a resolved config can be passed again


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"epoch": 3}, ["unknown config key", "'epoch'", "epochs"]),
        ({"epochs": 0}, ["'epochs'"]),
        ({"epochs": True}, ["'epochs'"]),
        ({"lr": -1}, ["'lr'"]),
        ({"num_workers": "many"}, ["'num_workers'"]),
        ({"device": "tpu"}, ["'device'"]),
        ({"backbone": "no_such_net_xyz"}, ["'backbone'", "not a timm model"]),
        ({"label_smoothing": 1.5}, ["'label_smoothing'"]),
    ],
)
def test_resolve_config_rejects(overrides, words):
    with pytest.raises(ValueError) as exc:
        resolve_config(overrides)
    for w in words:
        assert w in str(exc.value)


def test_num_workers_auto():
    assert resolve_num_workers("auto", cpus=2) == 0
    assert resolve_num_workers("auto", cpus=4) == 3
    assert resolve_num_workers("auto", cpus=32) == 4
    assert resolve_num_workers(2, cpus=2) == 2


# ---------------------------------------------------------------------------------------------- manifest
def _base_manifest():
    return {
        "heads": [{"name": "part", "classes": ["a", "b"], "parent": None}],
        "items": [
            {"id": 1, "path": "/x/1.jpg", "labels": {"part": "a"}, "split": "train"},
            {"id": 2, "path": "/x/2.jpg", "labels": {"part": None}, "split": "val"},
        ],
    }


def _bad(mutate):
    m = _base_manifest()
    mutate(m)
    return m


@pytest.mark.parametrize(
    "manifest, words",
    [
        (_bad(lambda m: m["items"].pop(0)), ["no items with split 'train'"]),
        (_bad(lambda m: m["heads"][0].update(classes=[])), ["head 'part' has no classes"]),
        (
            _bad(lambda m: m["items"][0]["labels"].update(part="zzz")),
            ["'zzz'", "head 'part'", "not one of its classes"],
        ),
        (_bad(lambda m: m["items"][0].pop("path")), ["missing 'path'", "id 1"]),
        (_bad(lambda m: m["items"][0].update(split="training")), ["'split' must be one of"]),
        (_bad(lambda m: m.update(heads=[])), ["at least one head"]),
        (_bad(lambda m: m["heads"].append({"name": "part", "classes": ["x"]})), ["defined twice"]),
        (_bad(lambda m: m["items"][0]["labels"].update(colour="red")), ["unknown head", "colour"]),
        (_bad(lambda m: m["items"][0]["labels"].update(part=None)), ["no train item has a known label"]),
        (_bad(lambda m: m.pop("items")), ["no 'items' key"]),
    ],
)
def test_bad_manifest_raises_before_training(manifest, words, tmp_path):
    with pytest.raises(ValueError) as exc:
        train_model(manifest, tiny(), tmp_path / "out")
    for w in words:
        assert w in str(exc.value)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_parse_manifest_masks_unknown_and_ignores_test():
    m = _base_manifest()
    m["items"].append({"id": 3, "path": "/nope.jpg", "labels": {"part": "b"}, "split": "test"})
    m["items"].append({"id": 4, "path": "/x/4.jpg", "labels": {}, "split": "train"})  # missing key == null
    parsed = parse_manifest(m)
    assert [it.targets for it in parsed.train] == [(0,), (-100,)]
    assert [it.targets for it in parsed.val] == [(-100,)]
    assert parsed.n_test == 1


# ------------------------------------------------------------------------------------------------ training
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


def test_learns_trivially_separable_colour(tmp_path):
    # red vs blue squares on light backgrounds: the model must get (nearly) every val image right
    manifest = make_shapes_dataset(tmp_path / "img", n=48, size=32, shapes=("square",))
    m = train_model(manifest, tiny(epochs=3), tmp_path / "out")
    assert m["n_val"] == 12
    assert m["heads"]["color"]["top1"] >= 0.9
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]


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


def test_no_val_items_metrics_on_train_and_time_limit(tmp_path):
    manifest = make_shapes_dataset(tmp_path / "img", n=16, size=32, val_every=0)
    m = train_model(manifest, tiny(epochs=5, max_train_seconds=0.01), tmp_path / "out")
    assert m["metrics_on"] == "train" and m["n_val"] == 0
    assert m["heads"]["color"]["n_val"] == 16  # evaluated on the train items, flagged above
    assert m["stopped_early"] == "time_limit" and m["epochs_run"] == 1
    assert (tmp_path / "out" / "model.pt").is_file()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "mean train (optimistic) top-1" in report and "n_train (optimistic)" in report
    assert "val top-1" not in report and "| n_val | 0 |" in report


def test_all_train_files_unreadable(tmp_path):
    manifest = _base_manifest()
    with pytest.raises(ValueError, match="none of the 1 train images could be read"):
        train_model(manifest, tiny(epochs=1), tmp_path / "out")


# ------------------------------------------------------------------------------------------- pretrained
def test_pretrained_local_file_is_loaded(tmp_path):
    torch.manual_seed(123)
    import timm

    src = timm.create_model("test_resnet")  # with its 1000-class classifier, like a real checkpoint
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    cfg = resolve_config(tiny(pretrained_path=str(path)))
    model, info = build_model(cfg, [{"name": "h", "classes": ["a", "b"]}])
    assert info["pretrained_source"] == "file" and info["pretrained_detail"] == str(path)
    expected = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    got = model.backbone.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


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


def test_pretrained_hub_unavailable_falls_back(monkeypatch, caplog):
    import timm

    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        if pretrained:  # never reach the network in tests
            raise RuntimeError("offline: cannot reach huggingface.co")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake)
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        backbone, weights = create_backbone("test_resnet", image_size=32, pretrained=True)
    assert weights["source"] == "none" and backbone is not None
    msgs = [r.getMessage() for r in caplog.records]
    assert any("no pretrained weights for test_resnet" in m and "random init" in m for m in msgs)


def test_engine_imports_no_django():
    code = (
        "import sys; import training.engine, training.engine.loop, inference.core; "
        "bad = [m for m in sys.modules if m == 'django' or m.startswith('django.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_class_weights_balance_the_loss():
    import torch

    from training.engine.loop import _heads_loss, class_weights
    from training.engine.manifest import IGNORE_INDEX

    targets = [(0,)] * 8 + [(1,)] * 2 + [(IGNORE_INDEX,)]
    assert class_weights(targets, [3], "none") == [None]
    (w,) = class_weights(targets, [3], "inverse")
    assert torch.allclose(w, torch.tensor([10 / (2 * 8), 10 / (2 * 2), 0.0]))
    (ws,) = class_weights(targets, [3], "sqrt_inverse")
    assert torch.allclose(ws, w.sqrt())
    # With inverse weights each class contributes equally, whatever its count.
    logits = [torch.zeros(10, 3)]
    y = torch.tensor([[0]] * 8 + [[1]] * 2)
    assert torch.isclose(_heads_loss(logits, y, 0.0, [w]), _heads_loss(logits, y, 0.0))
    with pytest.raises(ValueError, match="class_weighting"):
        resolve_config({"class_weighting": "heavy"})


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


def test_unknown_labels_contribute_no_loss():
    """An unknown colour (IGNORE_INDEX, the LEGO 9999 convention) changes neither the loss nor its gradient."""
    from training.engine.loop import _heads_loss
    from training.engine.manifest import IGNORE_INDEX

    torch.manual_seed(0)
    part = torch.randn(4, 3, requires_grad=True)
    color = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([[0, 1], [1, IGNORE_INDEX], [2, 3], [0, IGNORE_INDEX]])
    loss = _heads_loss([part, color], y, 0.1)
    loss.backward()
    assert torch.all(color.grad[1] == 0) and torch.all(color.grad[3] == 0)
    assert torch.any(part.grad[1] != 0)  # the part label of the same image still trains
    known = torch.tensor([0, 2])
    colour_only = torch.nn.functional.cross_entropy(color[known], y[known, 1], label_smoothing=0.1)
    part_only = torch.nn.functional.cross_entropy(part, y[:, 0], label_smoothing=0.1)
    assert torch.isclose(loss, colour_only + part_only)


def test_the_test_split_is_refused_for_training(tmp_path):
    """Test items are never trained on, read, or used for model selection: a manifest whose labeled items are
    all in the test split cannot train."""
    manifest = make_shapes_dataset(tmp_path / "img", n=8, size=24)
    for it in manifest["items"]:
        it["split"] = "test"
    with pytest.raises(ValueError, match="no items with split 'train'"):
        train_model(manifest, tiny(), tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()
    with pytest.raises(ValueError, match="'split' must be one of"):
        parse_manifest({**manifest, "items": [{**manifest["items"][0], "split": "holdout"}]})


@pytest.mark.parametrize(
    "backbone", ["efficientnet_b0", "tf_efficientnetv2_b0", "resnet18", "convnext_atto", "mobilenetv3_small_100"]
)
def test_timm_backbone_families_build_and_run(backbone):
    """The seeds' backbone families come from timm's registry (random init here: no hub access in tests)."""
    from training.engine.model import build_model

    cfg = resolve_config({"backbone": backbone, "image_size": 64})
    heads = [{"name": "make", "classes": ["a", "b"]}, {"name": "model", "classes": ["x", "y", "z"], "parent": "make"}]
    model, info = build_model(cfg, heads)
    model.eval()
    with torch.inference_mode():
        logits, feats = model(torch.randn(2, 3, 64, 64))
    assert [tuple(lg.shape) for lg in logits] == [(2, 2), (2, 3)] and feats.shape == (2, info["embedding_dim"])
