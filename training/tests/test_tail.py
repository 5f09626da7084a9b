"""Tail fine-tune (training/engine/tail.py): the backbone split is exact, the frozen prefix never changes while the
tail and heads train on cached maps, the artifact is a whole LoupeNet that the Recognizer serves, the maps are
removed afterwards, and bad settings fail with a message (CPU only, timm's tiny test_efficientnet, tiny images)."""

import numpy as np
import pytest
import timm
import torch

from inference.batch import predict_paths
from inference.recognizer import Recognizer
from training.engine import resolve_config, train_model
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset
from training.engine.tail import MAPS_DIR, split_backbone


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tail")
    manifest = make_shapes_dataset(root / "img", n=48, size=40, seed=7)
    torch.manual_seed(0)  # "pretrained" weights from a file: pretrained_source "file"
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), root / "w.pth")
    return manifest, str(root / "w.pth")


def config(weights: str, **over) -> dict:
    return {
        **TINY_TEST_CONFIG,
        "backbone": "test_efficientnet",
        "pretrained_path": weights,
        "epochs": 4,
        "quick_epochs": 5,
        "tail_from_block": 3,
        "tail_views": 2,
        "hflip": True,
        "unfreeze_lr_mult": 1.0,
        "early_stopping": {"metric": "primary", "patience": None, "min_delta": 0.0},
        **over,
    }


def assert_served_like_best_epoch(out, manifest: dict, metrics: dict) -> None:
    """The Recognizer serving `out` agrees on the val photos with the run's best-epoch top-1 (measured on float16
    maps: one photo of difference allowed)."""
    rec = Recognizer.load(out)
    val = [it for it in manifest["items"] if it["split"] == "val"]
    head = rec.heads[0]
    probs = predict_paths(rec, [it["path"] for it in val])[0][head]
    top1 = float(np.mean(np.array(rec.label_maps[head])[probs.argmax(1)] == [it["labels"][head] for it in val]))
    assert abs(top1 - metrics["heads"][head]["top1"]) <= 1 / len(val) + 1e-9


def test_prefix_then_tail_is_the_backbone():
    torch.manual_seed(0)
    bb = timm.create_model("test_efficientnet", num_classes=0).eval()
    prefix, tail = split_backbone(bb, 2)
    x = torch.randn(3, 3, 40, 40)
    with torch.inference_mode():
        assert torch.allclose(tail(prefix(x)), bb(x), atol=1e-5)
    with pytest.raises(ValueError, match="between 1 and 4"):
        split_backbone(bb, 5)
    with pytest.raises(ValueError, match="EfficientNet/MobileNet-style"):
        split_backbone(timm.create_model("test_resnet", num_classes=0), 2)


def test_tail_trains_the_last_blocks_only_and_serves(data, tmp_path):
    manifest, weights = data
    seen = []
    out = tmp_path / "run"
    # A short phase 1 (one epoch of heads) leaves phase 2 something to improve, so its best epoch is a trained one.
    m = train_model(manifest, config(weights, quick_epochs=1, epochs=6), out, progress=seen.append)
    start = torch.load(weights, map_location="cpu", weights_only=True)
    art = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    sd = art["state_dict"]
    frozen = [k for k in start if k.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.", "blocks.2."))]
    trained = [
        k for k in start if k.startswith(("blocks.3.", "blocks.4.", "conv_head")) and start[k].is_floating_point()
    ]
    assert frozen and trained
    assert all(torch.equal(sd[f"backbone.{k}"], start[k]) for k in frozen)  # the prefix never changed
    assert any(not torch.equal(sd[f"backbone.{k}"], start[k]) for k in trained)  # the tail learned
    assert m["tail"]["from_block"] == 3 and m["tail"]["views"] == 2
    n_train, n_val = m["n_train"], m["n_val"]
    assert m["tail"]["maps"] == n_train + n_val + n_train  # the centre view of all + one augmented view of train
    assert m["phase1"]["on"] == "feature-cache" and m["pretrained_source"] == "file"
    assert m["epochs_run"] == 6 and len(m["history"]) == 6 and m["metrics_on"] == "val" and m["best_epoch"] >= 1
    assert not (out / MAPS_DIR).exists()  # the maps are gone once the artifact is written
    assert {p.get("phase") for p in seen} >= {"features", "epoch"}
    assert (out / "report.md").is_file() and (out / "metrics.json").is_file()

    # The Recognizer serves the whole network; on the val photos it agrees with the run's own best-epoch figure
    # (which was measured on float16 maps: allow one photo of difference).
    assert_served_like_best_epoch(out, manifest, m)


def test_bad_tail_settings_fail_before_work(data, tmp_path):
    manifest, weights = data
    with pytest.raises(ValueError, match="tail_views"):
        resolve_config(config(weights, tail_views=0))
    with pytest.raises(ValueError, match="tail_from_block"):
        resolve_config(config(weights, tail_from_block="5"))
    with pytest.raises(ValueError, match=r"tail fine-tune \(tail_from_block\) needs a pretrained backbone"):
        train_model(manifest, config(weights, pretrained_path=None, pretrained=True), tmp_path / "a")
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "r.pth")
    with pytest.raises(ValueError, match="EfficientNet/MobileNet-style"):
        train_model(manifest, config(str(tmp_path / "r.pth"), backbone="test_resnet"), tmp_path / "b")


@pytest.mark.parametrize(
    ("over", "stop"),
    [
        ({"max_train_seconds": 0.001}, "time_limit"),  # reached in the first epoch
        ({"early_stopping": {"metric": "primary", "patience": 1, "min_delta": 10.0}}, "early_stopping"),
    ],
)
def test_tail_stops_after_the_first_epoch(data, tmp_path, over, stop):
    manifest, weights = data
    seen = []
    out = tmp_path / "run"
    m = train_model(manifest, config(weights, eval_report=False, **over), out, progress=seen.append)
    assert m["stopped_early"] == stop and m["epochs_run"] == 1 and len(m["history"]) == 1
    assert m["best_epoch"] in (0, 1)  # epoch 0: phase 1's heads on the untouched tail
    # past the budget no augmented view's maps are computed (the centre view only), else all of them
    assert m["tail"]["views"] == (1 if stop == "time_limit" else 2)
    epochs = [p for p in seen if p.get("phase") == "epoch"]
    assert [p["epoch"] for p in epochs] == [1] and epochs[0]["eta_s"] == 0.0
    assert (out / "model.pt").is_file() and not (out / MAPS_DIR).exists()


def test_tail_without_val_photos_selects_on_train(data, tmp_path):
    manifest, weights = data
    items = [{**it, "split": "train"} for it in manifest["items"]]
    m = train_model({**manifest, "items": items}, config(weights, epochs=2, eval_report=False), tmp_path / "run")
    assert m["metrics_on"] == "train" and m["n_val"] == 0 and m["n_train"] == len(items)
    assert m["tail"]["maps"] == 2 * len(items)  # the centre view + one augmented view of every (train) photo
    assert all(h["heads"]["shape"]["n_val"] == len(items) for h in m["history"])  # measured on the train photos


def test_weight_average_is_evaluated_and_kept_while_training_goes_on_live(data, tmp_path):
    """ema_decay: each epoch is evaluated with the moving average (other val figures than the live weights'), the
    training itself is untouched (same train losses as without), and the served model is the averaged best epoch."""
    manifest, weights = data
    common = {"quick_epochs": 1, "epochs": 3, "eval_report": False}
    live = train_model(manifest, config(weights, **common), tmp_path / "live")
    avg = train_model(manifest, config(weights, ema_decay=0.6, **common), tmp_path / "avg")
    assert [h["train_loss"] for h in avg["history"]] == pytest.approx([h["train_loss"] for h in live["history"]])
    assert [h["val_loss"] for h in avg["history"]] != pytest.approx([h["val_loss"] for h in live["history"]])
    assert_served_like_best_epoch(tmp_path / "avg", manifest, avg)


def test_weight_average_settings():
    assert resolve_config({"tail_from_block": 5, "ema_decay": 0.99})["ema_decay"] == 0.99
    for bad in (0, 1, 1.5, "0.9", True):
        with pytest.raises(ValueError, match="ema_decay"):
            resolve_config({"tail_from_block": 5, "ema_decay": bad})
