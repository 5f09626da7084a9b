"""Feature cache and quick retrain: the cache key (photo bytes, backbone weights, preprocessing), heads trained on
cached frozen features written as a normal artifact, quick out-of-fold predictions, `manage.py train --quick`."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from inference import evaluation
from training.engine import resolve_config, train_model
from training.engine.data import draft_size, eval_transform, load_image_file, normalize_batch
from training.engine.features import cached_features, item_sha256
from training.engine.manifest import parse_manifest
from training.engine.model import create_backbone
from training.engine.oof import out_of_fold_predictions
from training.engine.quick import NoPretrainedBackbone, heads_predict, train_heads, train_quick
from training.engine.synthetic import TINY_TEST_CONFIG, draw_shape, make_shapes_dataset


def _weights(path: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return str(path)


@pytest.fixture
def data(tmp_path):
    manifest = make_shapes_dataset(tmp_path / "imgs", n=32, seed=3)
    cfg = resolve_config({**TINY_TEST_CONFIG, "pretrained_path": _weights(tmp_path / "w.pth"), "quick_epochs": 15})
    return manifest, cfg, tmp_path


def _direct_features(cfg, items) -> np.ndarray:
    """The backbone's pooled features computed here, without the cache."""
    backbone, _ = create_backbone(cfg["backbone"], image_size=32, pretrained_path=cfg["pretrained_path"])
    backbone.eval()
    tf = eval_transform(32)
    x = torch.stack([tf(load_image_file(it["path"], draft_size(32))) for it in items])
    cfg_data = timm.data.resolve_model_data_config(backbone)
    mean, std = cfg_data["mean"], cfg_data["std"]
    with torch.inference_mode():
        return backbone(normalize_batch(x, mean, std)).numpy()


def test_cache_key_photo_backbone_and_preprocessing(data, monkeypatch):
    manifest, cfg, tmp = data
    items = manifest["items"]
    cache = tmp / "cache"
    first = cached_features(items, cfg, cache)
    assert first.stats["hits"] == 0 and first.stats["misses"] == 32 and first.ok.all()
    assert first.weights["source"] == "file"
    np.testing.assert_allclose(first.X, _direct_features(cfg, items), rtol=1e-5, atol=1e-5)

    from training.engine import data as data_mod

    calls = []
    real = data_mod.ManifestDataset
    monkeypatch.setattr(data_mod, "ManifestDataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = cached_features(items, cfg, cache)  # same photos, weights and preprocessing: all hits, no forward pass
    assert again.stats["hits"] == 32 and again.stats["misses"] == 0 and not calls
    assert np.array_equal(again.X, first.X)

    # A changed photo (same path, new bytes) misses; the others still hit.
    draw_shape("circle", "green", 48).save(items[0]["path"])
    changed = cached_features(items, cfg, cache)
    assert changed.stats["misses"] == 1 and changed.stats["hits"] == 31
    assert not np.allclose(changed.X[0], first.X[0]) and np.array_equal(changed.X[1:], first.X[1:])

    # Other backbone weights, another backbone, or another image size: all miss.
    other_w = {**cfg, "pretrained_path": _weights(tmp / "w2.pth", seed=1)}
    assert cached_features(items, other_w, cache).stats["misses"] == 32
    assert cached_features(items, {**cfg, "image_size": 48}, cache).stats["misses"] == 32
    other_bb = {**cfg, "backbone": "resnet10t", "pretrained_path": None, "pretrained": False}
    assert cached_features(items[:4], other_bb, cache).stats["misses"] == 4
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 4  # one folder per (backbone, weights, preprocessing)

    # The manifest's sha256 is the key when given (content-addressed storage), else the file's bytes.
    assert item_sha256({"path": items[1]["path"], "sha256": "A" * 64}) == "a" * 64
    content = Path(items[1]["path"]).read_bytes()
    import hashlib

    assert item_sha256({"path": items[1]["path"]}) == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("head_type", ["softmax", "arcface"])
def test_quick_retrain_is_heads_trained_on_the_same_features(data, head_type):
    manifest, cfg, tmp = data
    cfg = {**cfg, "head_type": head_type, "arcface_dim": 16}
    metrics = train_quick(manifest, cfg, tmp / "q", cache_dir=tmp / "cache")
    assert metrics["quick"] is True and metrics["cache"]["misses"] == 32 and metrics["cache"]["hits"] == 0
    assert metrics["pretrained_source"] == "file" and metrics["n_train"] == 24 and metrics["n_val"] == 8
    for name in ("model.pt", "label_maps.json", "config.json", "metrics.json", "report.md"):
        assert (tmp / "q" / name).exists(), name

    parsed = parse_manifest(manifest)
    items = parsed.train + parsed.val
    X = _direct_features(resolve_config(cfg), [{"path": it.path} for it in items])
    Y = np.array([it.targets for it in items])
    fit = train_heads(X[:24], Y[:24], X[24:], Y[24:], parsed.heads, cfg)
    ckpt = torch.load(tmp / "q" / "model.pt", map_location="cpu", weights_only=True)
    for k, v in fit["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert ckpt["config"]["quick"] is True

    # A Recognizer on the artifact predicts what the heads predict on the features.
    from inference.batch import predict_paths
    from inference.recognizer import Recognizer

    rec = Recognizer.load(tmp / "q", backend="torch", num_threads=0)
    probs, emb, ok = predict_paths(rec, [it.path for it in items])
    assert ok.all()
    want, want_emb = heads_predict(fit["model"], X)
    for j, head in enumerate(rec.heads):
        np.testing.assert_allclose(probs[head], want[j], atol=1e-4)
    np.testing.assert_allclose(emb, want_emb, atol=1e-4)

    # The low-confidence queue's path: the same predictions through the cache keyed by the model's own backbone.
    from inference.batch import predict_items_cached

    paths = [{"path": it.path} for it in items]
    for _ in range(2):
        c_probs, c_emb, c_ok = predict_items_cached(rec, paths, tmp / "cache")
        assert c_ok.all()
        for head in rec.heads:
            np.testing.assert_allclose(c_probs[head], probs[head], atol=1e-5)
        np.testing.assert_allclose(c_emb, emb, atol=1e-5)

    # Warm cache: no backbone pass, the same heads (deterministic with the seed).
    again = train_quick(manifest, cfg, tmp / "q2", cache_dir=tmp / "cache")
    assert again["cache"]["hits"] == 32 and again["cache"]["misses"] == 0
    ckpt2 = torch.load(tmp / "q2" / "model.pt", map_location="cpu", weights_only=True)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(ckpt2["state_dict"][k], v), k


def test_views_are_cached_crops_of_their_own_and_quick_trains_on_them(data):
    """data.VIEWS: a view is the crop it names (checked on a two-colour photo), has its own cache key (the centre's
    key is the one it had before views existed), and a quick retrain with quick_views trains the heads on the train
    photos' centre rows + view rows: exactly train_heads on those features."""
    from PIL import Image as PILImage

    from training.engine.data import VIEWS, ViewCrop, view_transform
    from training.engine.features import preprocessing_key

    photo = PILImage.new("RGB", (200, 100), (255, 0, 0))
    photo.paste((0, 0, 255), (100, 0, 200, 100))  # left half red, right half blue
    crops = {v: np.asarray(ViewCrop(64, v)(photo), dtype=float).mean((0, 1)) for v in ("left", "right", "mirror")}
    assert crops["left"][0] > 200 > crops["left"][2] and crops["right"][2] > 200 > crops["right"][0]
    centre = np.asarray(view_transform(64, "centre")(photo), dtype=float)
    mirrored = np.asarray(view_transform(64, "mirror")(photo), dtype=float)
    np.testing.assert_allclose(mirrored, centre[:, ::-1], atol=2)
    zoom = np.asarray(ViewCrop(64, "zoom")(photo))
    assert zoom.shape == (64, 64, 3) and set(VIEWS) >= {"centre", "zoom", "left", "right", "up", "down", "mirror"}
    assert "view" not in preprocessing_key(32, [0.5] * 3, [0.5] * 3)
    assert preprocessing_key(32, [0.5] * 3, [0.5] * 3, "zoom")["view"][0] == "zoom"

    manifest, cfg, tmp = data
    cache = tmp / "cache"
    items = manifest["items"]
    plain = cached_features(items, cfg, cache)
    zoomed = cached_features(items, cfg, cache, view="zoom")
    assert zoomed.stats["misses"] == 32 and zoomed.stats["key"] != plain.stats["key"]
    assert not np.allclose(zoomed.X, plain.X)
    assert cached_features(items, cfg, cache, view="zoom").stats["hits"] == 32
    with pytest.raises(ValueError, match="unknown view 'sideways'"):
        cached_features(items, cfg, cache, view="sideways")

    qcfg = {**cfg, "quick_views": ["zoom", "left"]}
    metrics = train_quick(manifest, qcfg, tmp / "qv", cache_dir=cache)
    assert metrics["views"] == ["centre", "zoom", "left"]
    assert metrics["cache"]["misses"] == 24 and metrics["cache"]["hits"] == 32 + 24  # left: the 24 train photos
    parsed = parse_manifest(manifest)
    train = [{"path": it.path} for it in parsed.train]
    val = [{"path": it.path} for it in parsed.val]
    X_val = cached_features(val, cfg, cache).X
    X_train = np.concatenate([cached_features(train, cfg, cache, view=v).X for v in ("centre", "zoom", "left")])
    Y_train = np.array([it.targets for it in parsed.train] * 3)
    fit = train_heads(X_train, Y_train, X_val, np.array([it.targets for it in parsed.val]), parsed.heads, qcfg)
    ckpt = torch.load(tmp / "qv" / "model.pt", map_location="cpu", weights_only=True)
    for k, v in fit["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for bad in (["sideways"], ["zoom", "zoom"], ["centre"], "zoom"):
        with pytest.raises(ValueError, match="quick_views"):
            resolve_config({**cfg, "quick_views": bad})


def test_quick_retrain_masks_unknown_labels_and_needs_pretrained_weights(data):
    manifest, cfg, tmp = data
    for it in manifest["items"][::2]:
        it["labels"]["color"] = None  # unknown colour: out of that head's loss and metrics
    metrics = train_quick(manifest, cfg, tmp / "q", cache_dir=tmp / "cache")
    # the even items are the 16 train photos among the first 32 (every 4th item is val)
    assert metrics["heads"]["color"]["n_train"] == 8 and metrics["heads"]["shape"]["n_train"] == 24
    assert metrics["heads"]["color"]["n_val"] == 8 and metrics["heads"]["color"]["top1"] is not None
    with pytest.raises(NoPretrainedBackbone, match="quick retrain needs a pretrained backbone"):
        train_quick(manifest, {**cfg, "pretrained_path": None}, tmp / "r", cache_dir=tmp / "cache")


def test_quick_out_of_fold_covers_every_labeled_image_in_a_fraction_of_a_training(data):
    manifest, cfg, tmp = data
    for i, it in enumerate(manifest["items"]):
        it["group"] = f"g{i // 2}"
    manifest["items"][0]["split"] = "test"  # predicted too: a wrong test label is a reviewer's business
    t0 = time.process_time()  # CPU seconds: other processes on a busy machine do not count
    result = out_of_fold_predictions(manifest, cfg, tmp / "oof", k=3, mode="quick", cache_dir=tmp / "cache")
    quick_s = time.process_time() - t0
    assert result["n"] == 32 and result["mode"] == "quick"
    arrays = np.load(tmp / "oof" / "oof_predictions.npz")
    assert str(manifest["items"][0]["id"]) in arrays["ids"].tolist()
    for head in ("shape", "color"):
        p = arrays[f"probs_{head}"]
        assert p.shape[0] == 32 and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    meta = json.loads((tmp / "oof" / "oof_meta.json").read_text())
    assert meta["cache"]["misses"] == 32 and len(meta["folds"]) == 3
    out_of_fold_predictions(manifest, cfg, tmp / "oof2", k=3, mode="quick", cache_dir=tmp / "cache")
    assert json.loads((tmp / "oof2" / "oof_meta.json").read_text())["cache"]["hits"] == 32
    assert np.array_equal(np.load(tmp / "oof2" / "oof_predictions.npz")["probs_shape"], arrays["probs_shape"])
    # One full training (a tenth of the epochs of a real run) costs more than all K quick folds.
    t0 = time.process_time()
    train_model(manifest, {**cfg, "epochs": 4, "eval_report": False}, tmp / "full")
    assert quick_s < time.process_time() - t0


def test_quick_fold_heads_train_on_every_other_fold_without_label_smoothing(data, monkeypatch):
    """Quick folds hold no fold out for selection (a fixed schedule on frozen features) and train without label
    smoothing, whatever the recipe: their probabilities feed confident learning, not a served model."""
    from training.engine import quick

    manifest, cfg, tmp = data
    calls = []
    real = quick.train_heads

    def spy(X_train, Y_train, X_val, Y_val, heads, config, **kw):
        calls.append((len(X_train), len(X_val), config["label_smoothing"], config["lr"]))
        return real(X_train, Y_train, X_val, Y_val, heads, config, **kw)

    monkeypatch.setattr(quick, "train_heads", spy)
    result = out_of_fold_predictions(
        manifest, {**cfg, "label_smoothing": 0.1}, tmp / "oof", k=4, mode="quick", cache_dir=tmp / "cache"
    )
    folds = np.load(tmp / "oof" / "oof_predictions.npz")["fold"]
    assert [c[0] for c in calls] == [result["n"] - int((folds == f).sum()) for f in range(4)]
    assert all(c[1] == 0 and c[2] == 0.0 and c[3] == cfg["lr"] for c in calls)
    meta = json.loads((tmp / "oof" / "oof_meta.json").read_text())
    assert meta["fold_training"]["folds"] == "the other k-1" and len(meta["folds"]) == 4


@pytest.mark.django_db
def test_train_command_quick_end_to_end(shapes_project, tmp_path, settings, capsys):
    from django.core.management import CommandError, call_command

    from conftest import TINY_TRAIN
    from training import selectors, services
    from training.models import TrainingRun

    settings.LOUPE_FEATURE_CACHE = tmp_path / "cache"
    project = shapes_project(6)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_TRAIN.items()]
    with pytest.raises(CommandError, match="quick retrain needs a pretrained backbone"):
        call_command("train", project.slug, "--quick", *sets)
    sets.append(f"--set=pretrained_path={_weights(tmp_path / 'w.pth')}")
    call_command("train", project.slug, "--quick", *sets)
    assert "Model v1" in capsys.readouterr().out
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.SUCCEEDED and run.config["quick"] is True
    assert run.pretrained_source == "file" and run.epochs == 60
    version = run.model_version
    assert version.metrics["quick"] is True and version.metrics["cache"]["misses"] > 0
    assert version.is_active and version.index_status == "ready"
    # Calibration and the test report of a quick version read the cache its training filled: they agree with
    # a full pass of every photo through the model.
    from inference.batch import predict_paths
    from inference.recognizer import Recognizer

    assert "temperature" in version.metrics["calibration"] and version.metrics["test"]["heads"]
    rec = Recognizer.load(run.artifact_dir)
    items = [it for it in json.loads((Path(run.artifact_dir) / "manifest.json").read_text())["items"]]
    cached = evaluation.predict_items(rec, items)
    direct = predict_paths(rec, [it["path"] for it in items])
    for head in rec.heads:
        np.testing.assert_allclose(cached[0][head], direct[0][head], atol=1e-4)
    manifest = json.loads((Path(run.artifact_dir) / "manifest.json").read_text())
    assert all(len(it["sha256"]) == 64 for it in manifest["items"])
    # The mislabel queue's out-of-fold predictions of a pretrained version are quick (warm cache).
    assert selectors.oof_mode_for(version) == "quick"
    summary = services.model_version_oof(version=version, k=2)
    assert summary["mode"] == "quick" and summary["n"] > 0


def test_the_feature_pass_uses_every_core_not_taken_by_a_loader_worker():
    from training.engine.features import feature_threads

    assert feature_threads("auto", 0, cpus=2) == 2  # training keeps one free (resolve_torch_threads): 1
    assert feature_threads("auto", 1, cpus=2) == 1
    assert feature_threads("auto", 3, cpus=2) == 1
    assert feature_threads(3, 0, cpus=2) == 3  # an explicit torch_threads wins


def test_fit_frames_the_whole_photo_in_training_the_cache_and_serving(data):
    """resize "fit" (config): the whole photo scaled into the square and padded grey — a tall photo keeps its top
    and bottom, which the centre crop cuts off — with views cropping the padded square; the training transform
    pads before its random crop; the feature cache keys it apart (the crop's key is unchanged); a quick retrain's
    artifact serves through the same framing (its predictions are the heads on the fit features); ONNX's input
    contract says so; an unknown mode is refused."""
    from PIL import Image as PILImage

    from training.engine.data import PAD_FILL, PadToSquare, ViewCrop, train_transform, view_transform
    from training.engine.features import preprocessing_key
    from training.engine.onnx_export import preprocess_contract

    tall = PILImage.new("RGB", (40, 160), (0, 255, 0))
    tall.paste((255, 0, 0), (0, 0, 40, 30))  # red top, blue bottom: outside a centre crop
    tall.paste((0, 0, 255), (0, 130, 40, 160))
    crop, fit = (np.asarray(eval_transform(64, r)(tall), dtype=int) for r in ("crop", "fit"))
    assert crop.shape == fit.shape == (64, 64, 3)
    assert crop[0, 32].tolist() == [0, 255, 0] and crop[-1, 32].tolist() == [0, 255, 0]  # the ends are gone
    assert fit[1, 32, 0] > 200 and fit[-2, 32, 2] > 200 and fit[32, 32, 1] > 200  # red top, blue bottom, green
    assert np.abs(fit[32, 1] - PAD_FILL).max() <= 2 and np.abs(fit[32, -2] - PAD_FILL).max() <= 2  # grey bars
    zoom = np.asarray(ViewCrop(64, "zoom", "fit")(tall), dtype=int)
    assert zoom.shape == (64, 64, 3) and not np.array_equal(zoom, fit)
    assert np.array_equal(np.asarray(view_transform(64, "centre", "fit")(tall), dtype=int), fit)
    steps = train_transform({**data[1], "image_size": 64, "resize": "fit"}).transforms
    assert isinstance(steps[0], PadToSquare) and PadToSquare()(tall).size == (160, 160)
    with pytest.raises(ValueError, match="resize must be one of crop, fit"):
        eval_transform(64, "squash")
    with pytest.raises(ValueError, match="config 'resize'"):
        resolve_config({**data[1], "resize": "squash"})
    before = preprocessing_key(32, [0.5] * 3, [0.5] * 3)
    assert before["resize"] == "shorter side 1.14 x image_size, centre crop"  # the crop's cache key is unchanged
    assert preprocessing_key(32, [0.5] * 3, [0.5] * 3, resize="fit") != before
    assert preprocess_contract(32, [0.5] * 3, [0.5] * 3, "fit")["resize"] == "fit"
    assert preprocess_contract(32, [0.5] * 3, [0.5] * 3)["center_crop"] == [32, 32]

    # Tall photos: the shapes photos squeezed to a third of their width.
    manifest, cfg, tmp = data
    for it in manifest["items"]:
        with PILImage.open(it["path"]) as im:
            im.convert("RGB").resize((im.width // 3, im.height)).save(it["path"])
    fcfg = {**cfg, "resize": "fit"}
    crop_feats = cached_features(manifest["items"], cfg, tmp / "cache")
    fit_feats = cached_features(manifest["items"], fcfg, tmp / "cache")
    assert fit_feats.stats["key"] != crop_feats.stats["key"] and fit_feats.stats["misses"] == 32
    assert not np.allclose(fit_feats.X, crop_feats.X)
    metrics = train_quick(manifest, fcfg, tmp / "fit", cache_dir=tmp / "cache")
    assert metrics["cache"]["hits"] == 32 and metrics["cache"]["misses"] == 0  # the features just cached

    from inference.batch import predict_paths
    from inference.recognizer import Recognizer

    rec = Recognizer.load(tmp / "fit", backend="torch", num_threads=0)
    assert rec.config["resize"] == "fit"
    probs, _emb, ok = predict_paths(rec, [it["path"] for it in manifest["items"]])
    ckpt = torch.load(tmp / "fit" / "model.pt", map_location="cpu", weights_only=True)
    from training.engine.quick import heads_module

    parsed = parse_manifest(manifest)
    heads = heads_module(resolve_config(fcfg), parsed.heads, fit_feats.X.shape[1])
    assert not heads.load_state_dict(ckpt["state_dict"], strict=False).missing_keys  # the artifact's heads
    want, _ = heads_predict(heads.eval(), fit_feats.X)
    assert ok.all()
    for j, head in enumerate(rec.heads):
        np.testing.assert_allclose(probs[head], want[j], atol=1e-4)
