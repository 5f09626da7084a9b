"""Phase 1 (heads on the frozen pretrained backbone) on cached features: train_model(cache_dir=...) trains the heads
with the quick retrain's train_heads instead of backbone passes over the photos, then goes on with phase 2; without
a cache the photos path is unchanged; a run resumed after phase 1 does not redo it (CPU only, tiny images)."""

import copy

import numpy as np
import pytest
import timm
import torch

from training.engine import parse_manifest, resolve_config, train_model
from training.engine import quick as quick_mod
from training.engine.features import cached_features
from training.engine.runtime import resolve_torch_threads
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phase1")
    manifest = make_shapes_dataset(root / "img", n=32, size=32, seed=5)
    torch.manual_seed(0)  # "pretrained" weights from a file: pretrained_source "file"
    torch.save(timm.create_model("test_resnet").state_dict(), root / "w.pth")
    return manifest, str(root / "w.pth")


def cfg_of(weights: str, **over) -> dict:
    return {
        **TINY_TEST_CONFIG,
        "pretrained_path": weights,
        "epochs": 3,
        "freeze_backbone_epochs": 2,
        "quick_epochs": 8,
        "checkpoint_every": 1,
        "eval_report": False,
        **over,
    }


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def without_time(metrics):
    out = {k: v for k, v in metrics.items() if k not in ("seconds", "resumed_from_epoch", "phase1")}
    out["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]
    return out


@pytest.mark.parametrize("head_type", ["softmax", "arcface"])
def test_phase1_on_cached_features_is_train_heads(data, tmp_path, head_type):
    manifest, weights = data
    config = cfg_of(weights, head_type=head_type, arcface_dim=16)
    seen = []
    m = train_model(
        copy.deepcopy(manifest), config, tmp_path / "run", cache_dir=tmp_path / "cache", progress=seen.append
    )
    assert m["pretrained_source"] == "file"
    # The run's progress shows the feature pass (epoch 0, photos done of all), then phase 1 as epoch 2.
    feature_ticks = [p for p in seen if p.get("phase") == "features"]
    assert feature_ticks and feature_ticks[-1]["step"] == feature_ticks[-1]["steps_per_epoch"] == 32
    assert all(p["epoch"] == 0 and p["pretrained"]["source"] == "file" for p in feature_ticks)
    assert any(p.get("epoch") == 2 and p.get("phase") != "features" for p in seen)
    p1 = m["phase1"]
    assert p1["on"] == "feature-cache" and p1["replaces_epochs"] == 2 and 1 <= p1["epochs"] <= 8
    assert p1["cache"]["misses"] == 32 and p1["cache"]["hits"] == 0
    assert [h["epoch"] for h in m["history"]] == [2, 3]
    assert m["history"][0]["phase1"] == "feature-cache" and m["history"][0]["backbone_frozen"]
    assert not m["history"][1]["backbone_frozen"]

    # No backbone pass over the photos in phase 1: no train batch ran, the backbone is the starting one.
    ck = load(tmp_path / "run" / "checkpoints" / "epoch-002.pt")
    assert ck["global_step"] == 0 and ck["phase1"]["on"] == "feature-cache"
    start = load(weights)
    for k, v in start.items():
        if not k.startswith("fc."):
            assert torch.equal(ck["model"][f"backbone.{k}"], v), k

    # Its heads are the heads train_heads fits on the same (now cached) features, ArcFace at its warm-up margin.
    cfg = resolve_config(config)
    parsed = parse_manifest(copy.deepcopy(manifest))
    items = parsed.train + parsed.val
    feats = cached_features([{"path": it.path} for it in items], cfg, tmp_path / "cache")
    assert feats.stats["hits"] == 32
    Y = np.array([it.targets for it in items], dtype=np.int64)
    n = len(parsed.train)
    threads = torch.get_num_threads()
    torch.set_num_threads(resolve_torch_threads(cfg["torch_threads"], 0))  # as train_model: same float sums
    try:
        fit = quick_mod.train_heads(
            feats.X[:n],
            Y[:n],
            feats.X[n:],
            Y[n:],
            parsed.heads,
            {**cfg, "arcface_margin": cfg["arcface_warmup_margin"]},
        )
    finally:
        torch.set_num_threads(threads)
    assert fit["best"]["epoch"] == p1["best_epoch"]
    for k, v in fit["state_dict"].items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    e3 = load(tmp_path / "run" / "checkpoints" / "epoch-003.pt")
    assert e3["global_step"] > 0  # phase 2 trains the whole network on the photos
    assert any(not torch.equal(e3["model"][k], ck["model"][k]) for k in ck["model"] if k.startswith("backbone."))
    if head_type == "arcface":
        assert m["history"][0]["arcface_margin"] == pytest.approx(cfg["arcface_warmup_margin"])
        assert m["history"][1]["arcface_margin"] == pytest.approx(cfg["arcface_margin"])


def test_without_cache_dir_phase1_runs_on_the_photos(data, tmp_path):
    manifest, weights = data
    m = train_model(copy.deepcopy(manifest), cfg_of(weights), tmp_path / "run")
    assert "phase1" not in m
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert [h["backbone_frozen"] for h in m["history"]] == [True, True, False]
    assert load(tmp_path / "run" / "checkpoints" / "epoch-001.pt")["global_step"] > 0
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "over",
    [{"freeze_fraction": 0.5}, {"pretrained_path": None, "pretrained": False}],
    ids=["partly-frozen", "random-init"],
)
def test_cache_is_only_used_for_a_fully_frozen_pretrained_backbone(data, tmp_path, over):
    manifest, weights = data
    m = train_model(copy.deepcopy(manifest), cfg_of(weights, **over), tmp_path / "run", cache_dir=tmp_path / "cache")
    assert "phase1" not in m and [h["epoch"] for h in m["history"]] == [1, 2, 3]


def test_resume_after_phase1_does_not_redo_it(data, tmp_path, monkeypatch):
    manifest, weights = data
    config = cfg_of(weights)
    full = train_model(copy.deepcopy(manifest), config, tmp_path / "full", cache_dir=tmp_path / "cache")

    def kill_after_phase1(p):
        if p["phase"] == "epoch" and p["epoch"] == 2:
            raise Killed("killed after phase 1")

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_model(copy.deepcopy(manifest), config, out, cache_dir=tmp_path / "cache", progress=kill_after_phase1)
    assert load(out / "checkpoints" / "latest.pt")["epoch"] == 2 and not (out / "model.pt").exists()

    def no_phase1(*a, **k):
        raise AssertionError("phase 1 ran again")

    monkeypatch.setattr(quick_mod, "train_heads", no_phase1)
    resumed = train_model(copy.deepcopy(manifest), config, out, cache_dir=tmp_path / "cache")
    assert resumed["resumed_from_epoch"] == 2 and resumed["phase1"]["on"] == "feature-cache"
    assert without_time(resumed) == without_time(full)
    a, b = load(out / "model.pt")["state_dict"], load(tmp_path / "full" / "model.pt")["state_dict"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
