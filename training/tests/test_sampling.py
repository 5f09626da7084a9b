"""Tests of the train samplers (training.engine.sampling) and the augmentation presets (training.engine.data).
Pure Python + torch on CPU, no database; tiny images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from training.engine.config import DEFAULT_CONFIG
from training.engine.data import (
    AUG_DEFAULTS,
    AUG_PRESETS,
    ManifestDataset,
    collate_skip,
    train_transform,
    validate_aug_config,
)
from training.engine.manifest import IGNORE_INDEX, Item, parse_manifest
from training.engine.sampling import (
    SAMPLING_DEFAULTS,
    EpochWeightedSampler,
    PKBatchSampler,
    build_train_sampler,
    curriculum_weights,
    manifest_train_sources,
    source_weights,
    validate_sampling_config,
)

CURRICULUM = [
    {"until_epoch": 5, "weights": {"synthetic": 0.8, "real": 0.2}},
    {"weights": {"real": 0.7, "synthetic": 0.3}},
]


def _labels(n_classes=10, per_class=(1, 2, 3, 5, 8, 13), n_ignore=7):
    labels = []
    for c in range(n_classes):
        labels += [c] * per_class[c % len(per_class)]
    labels += [IGNORE_INDEX] * n_ignore
    rng = np.random.default_rng(1)
    return np.array(rng.permutation(labels))


# ------------------------------------------------------------------------------------------------ PK sampler


def test_pk_batches_have_p_distinct_classes_times_k_and_never_ignored_rows():
    labels = _labels()
    sampler = PKBatchSampler(labels, p=4, k=3, epoch_length=40, seed=3)
    assert len(sampler) == 40
    batches = list(sampler)
    assert len(batches) == 40
    seen_classes = Counter()
    for batch in batches:
        assert len(batch) == 12
        assert all(labels[i] != IGNORE_INDEX for i in batch)
        per_class = Counter(int(labels[i]) for i in batch)
        assert len(per_class) == 4
        assert set(per_class.values()) == {3}
        seen_classes.update(per_class.keys())
        for c in per_class:  # classes with >= K images give K distinct images
            if (labels == c).sum() >= 3:
                assert len({i for i in batch if labels[i] == c}) == 3
    # shuffled rounds: every class appears, about equally often (40 * 4 / 10 = 16 each)
    assert set(seen_classes) == set(range(10))
    assert max(seen_classes.values()) - min(seen_classes.values()) <= 1


def test_pk_default_epoch_length_and_p_clamped_to_classes():
    labels = np.array([0] * 10 + [1] * 10 + [IGNORE_INDEX] * 50)
    sampler = PKBatchSampler(labels, p=8, k=2, seed=0)
    assert sampler.p == 2 and sampler.batch_size == 4
    assert len(sampler) == 5  # 20 labelled / 4
    with pytest.raises(ValueError, match="no labelled item"):
        PKBatchSampler(np.full(5, IGNORE_INDEX), p=2, k=2)
    with pytest.raises(ValueError, match="pk_k"):
        PKBatchSampler(labels, p=2, k=0)


def test_pk_set_epoch_is_deterministic():
    labels = _labels()
    a = PKBatchSampler(labels, p=3, k=2, epoch_length=10, seed=7)
    b = PKBatchSampler(labels, p=3, k=2, epoch_length=10, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(a) == list(b)  # same (seed, epoch) -> same order, however often iterated
    a.set_epoch(3)
    assert list(a) != first
    c = PKBatchSampler(labels, p=3, k=2, epoch_length=10, seed=8)
    c.set_epoch(2)
    assert list(c) != first


# ------------------------------------------------------------------------------------- weights and curriculum


def _sources(n_real=300, n_synth=30, n_legacy=20):
    return ["real"] * n_real + ["synthetic"] * n_synth + ["legacy"] * n_legacy


def _share(sampler, sources, source="synthetic"):
    drawn = list(sampler)
    return sum(sources[i] == source for i in drawn) / len(drawn)


def test_source_weights_are_shares_not_item_weights():
    sources = _sources()
    w = source_weights(sources, {"real": 0.5, "synthetic": 0.5})
    assert w.shape == (len(sources),) and abs(w.sum() - 1) < 1e-9
    assert abs(w[np.array(sources) == "synthetic"].sum() - 0.5) < 1e-9
    assert w[np.array(sources) == "legacy"].sum() == 0  # missing from the mapping -> never drawn
    # a share for a source without items is redistributed
    w = source_weights(sources, {"real": 0.5, "production": 0.5})
    assert abs(w[np.array(sources) == "real"].sum() - 1) < 1e-9


def test_missing_source_error():
    with pytest.raises(ValueError, match="no train item can be drawn"):
        source_weights(["real", "real"], {"synthetic": 1.0})
    with pytest.raises(ValueError, match="unknown source"):
        source_weights(["real"], {"synth": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        source_weights(["real"], {"real": -1})


def test_curriculum_shares_change_with_epoch():
    sources = _sources()
    cfg = {"sampler": "weighted", "source_curriculum": CURRICULUM}
    sampler, kind = build_train_sampler(sources, [0] * len(sources), cfg, seed=0)
    assert kind == "weighted" and isinstance(sampler, EpochWeightedSampler)
    sampler.num_samples = 20_000
    for epoch, expected in [(1, 0.8), (5, 0.8), (6, 0.3), (30, 0.3)]:
        sampler.set_epoch(epoch)
        assert abs(_share(sampler, sources) - expected) < 0.05, epoch
        assert _share(sampler, sources, "legacy") == 0
    assert abs(curriculum_weights(sources, CURRICULUM, 2)[np.array(sources) == "synthetic"].sum() - 0.8) < 1e-9


def test_weighted_sampler_deterministic_per_seed_and_epoch():
    w = np.arange(1, 21, dtype=float)
    a = EpochWeightedSampler(w, 50, seed=1)
    b = EpochWeightedSampler(lambda epoch: w, 50, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(a) == list(b)
    assert len(list(a)) == len(a) == 50
    first = list(a)
    a.set_epoch(5)
    assert list(a) != first
    with pytest.raises(ValueError, match="not all 0"):
        list(EpochWeightedSampler(np.zeros(3), 5))


def test_build_train_sampler_kinds_and_fixed_weights():
    sources = _sources(20, 20, 0)
    targets = [i % 4 for i in range(40)]
    assert build_train_sampler(sources, targets, {}, seed=0) == (None, "shuffle")
    pk, kind = build_train_sampler(sources, targets, {"sampler": "pk", "pk_p": 2, "pk_k": 3}, seed=0)
    assert kind == "pk" and isinstance(pk, PKBatchSampler) and pk.batch_size == 6
    ws, kind = build_train_sampler(
        sources, targets, {"sampler": "weighted", "source_weights": {"synthetic": 1.0}}, seed=0
    )
    assert kind == "weighted" and len(ws) == 40 and all(i >= 20 for i in ws)
    with pytest.raises(ValueError, match="misaligned"):
        build_train_sampler(sources[:3], targets, {"sampler": "weighted", "source_weights": {"real": 1}}, seed=0)


def test_manifest_train_sources_aligned_with_parse_manifest():
    manifest = {
        "heads": [{"name": "part", "classes": ["a", "b"]}],
        "items": [
            {"path": "x0.jpg", "split": "train", "labels": {"part": "a"}, "source": "synthetic"},
            {"path": "x1.jpg", "split": "val", "labels": {"part": "a"}, "source": "real"},
            {"path": "x2.jpg", "split": "test", "labels": {"part": "b"}, "source": "legacy"},
            {"path": "x3.jpg", "split": "train", "labels": {"part": "b"}},
        ],
    }
    assert manifest_train_sources(manifest) == ["synthetic", "real"]
    assert len(parse_manifest(manifest).train) == 2


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"sampler": "random"}, "'sampler'"),
        ({"sampler": "pk", "pk_p": 0}, "'pk_p'"),
        ({"sampler": "pk", "pk_k": 2.5}, "'pk_k'"),
        ({"sampler": "weighted"}, "needs 'source_weights' or 'source_curriculum'"),
        ({"sampler": "shuffle", "source_weights": {"real": 1}}, "'source_weights' only applies"),
        ({"sampler": "weighted", "source_weights": {"real": 1}, "source_curriculum": CURRICULUM}, "both set"),
        ({"sampler": "weighted", "source_weights": {"real": 0}}, "at least one share"),
        ({"sampler": "weighted", "source_weights": []}, "'source_weights'"),
        ({"sampler": "weighted", "source_curriculum": []}, "non-empty list"),
        ({"sampler": "weighted", "source_curriculum": [{"until_epoch": 3, "weights": {"real": 1}}]}, "last stage"),
        ({"sampler": "weighted", "source_curriculum": [{"weights": {"real": 1}}] * 2}, "missing 'until_epoch'"),
        (
            {
                "sampler": "weighted",
                "source_curriculum": [
                    {"until_epoch": 5, "weights": {"real": 1}},
                    {"until_epoch": 5, "weights": {"real": 1}},
                    {"weights": {"real": 1}},
                ],
            },
            "greater than",
        ),
        ({"sampler": "weighted", "source_curriculum": [{"until": 3, "weights": {"real": 1}}]}, "unknown key"),
        ({"sampler": "weighted", "source_curriculum": [{"until_epoch": 3}, {"weights": {"real": 1}}]}, "'weights'"),
    ],
)
def test_sampling_config_validation(cfg, match):
    with pytest.raises(ValueError, match=match):
        validate_sampling_config(cfg)


def test_sampling_defaults_are_valid():
    validate_sampling_config(SAMPLING_DEFAULTS)
    validate_sampling_config({})
    validate_sampling_config({"sampler": "weighted", "source_curriculum": CURRICULUM})


# ------------------------------------------------------------------------------------------------ augmentation


def _cfg(**kw):
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(image_size=32, **kw)
    return cfg


def _top_bright(size=48) -> Image.Image:
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[: size // 2] = 230
    return Image.fromarray(a)


@pytest.mark.parametrize("preset", AUG_PRESETS)
def test_presets_give_uint8_hwc(preset):
    t = train_transform(_cfg(augment=preset))
    x = t(_top_bright())
    assert x.shape == (32, 32, 3) and x.dtype == torch.uint8


def test_no_vertical_flip_by_default_and_vflip_option():
    img = _top_bright()
    for preset in ("standard", "strong"):
        t = train_transform(_cfg(augment=preset))
        for _ in range(50):
            x = t(img).float()
            assert x[:8].mean() > x[-8:].mean() + 50, preset
    t = train_transform(_cfg(vflip=True, rotation_degrees=0.0, crop_scale_min=1.0))
    torch.manual_seed(0)
    outs = [t(img).float() for _ in range(30)]
    flipped = sum(bool(x[:8].mean() < x[-8:].mean()) for x in outs)
    assert 0 < flipped < 30


def test_none_is_deterministic_and_standard_is_not():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    t = train_transform(_cfg(augment="none", blur_prob=1.0, noise_std=0.2, vflip=True))
    assert all(torch.equal(t(img), t(img)) for _ in range(5))
    s = train_transform(_cfg())
    assert not all(torch.equal(s(img), s(img)) for _ in range(5))


def test_bicubic_and_preset_contents():
    assert "bicubic" in repr(train_transform(_cfg())).lower()
    assert "bicubic" in repr(train_transform(_cfg(augment="none"))).lower()
    standard = repr(train_transform(_cfg()))
    assert "RandomHorizontalFlip" in standard and "RandomRotation" in standard and "ColorJitter" in standard
    assert "VerticalFlip" not in standard and "Blur" not in standard and "Noise" not in standard
    assert "hue=None" in standard or "hue=0" in standard
    strong = repr(train_transform(_cfg(augment="strong")))
    assert "RandomGaussianBlur" in strong and "AddGaussianNoiseUint8" in strong
    light = repr(train_transform(_cfg(augment="light")))
    assert "RandomRotation" not in light and "scale=(0.8, 1.0)" in light
    no_flip = repr(train_transform(_cfg(hflip=False, blur_prob=0.5)))
    assert "HorizontalFlip" not in no_flip and "RandomGaussianBlur(p=0.5" in no_flip


def test_noise_stays_uint8_and_clamped():
    t = train_transform(_cfg(augment="none"))
    noisy = train_transform(_cfg(noise_std=0.5, rotation_degrees=0.0, color_jitter=0.0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert torch.equal(t(white), torch.full((32, 32, 3), 255, dtype=torch.uint8))
    outs = [noisy(white) for _ in range(10)]
    assert all(o.dtype == torch.uint8 for o in outs)
    assert any(o.min() < 200 for o in outs)  # noise applied (clamped at 255 on top)


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"augment": "heavy"}, "'augment'"),
        ({"blur_prob": 1.5}, "'blur_prob'"),
        ({"noise_std": -0.1}, "'noise_std'"),
        ({"noise_std": True}, "'noise_std'"),
        ({"vflip": "yes"}, "'vflip'"),
    ],
)
def test_aug_config_validation(cfg, key):
    with pytest.raises(ValueError, match=key):
        validate_aug_config(cfg)
    with pytest.raises(ValueError, match=key):
        train_transform(_cfg(**cfg))


def test_aug_defaults_valid_and_dataset_batches(tmp_path):
    validate_aug_config(AUG_DEFAULTS)
    items = []
    for i in range(4):
        path = tmp_path / f"{i}.jpg"
        _top_bright(64).save(path)
        items.append(Item(i, str(path), (i % 2,)))
    ds = ManifestDataset(items, train_transform(_cfg(augment="strong")), min_side=48)
    x, y, idx, bad = collate_skip([ds[i] for i in range(4)])
    assert x.shape == (4, 32, 32, 3) and x.dtype == torch.uint8 and y.tolist() == [[0], [1], [0], [1]] and not bad


@pytest.mark.parametrize("w,h,size", [(224, 224, 224), (300, 224, 224), (224, 500, 224), (40, 50, 32), (1000, 37, 32)])
def test_centre_crop_resize_matches_torchvision_resize_then_crop(w, h, size):
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from training.engine.data import CenterCropResize, draft_size

    # photo-like content: gradients, an edge and mild noise (PIL rounds and clips between its two resampling
    # passes, so white noise at full amplitude differs more, in both orders, from any exact answer)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 / w, yy * 200 / h, ((xx + yy) % 64) * 3], axis=2) + 20
    base[h // 3 : h // 2, w // 4 : w // 2] = 230
    noise = np.random.default_rng(w * h).normal(0, 8, base.shape)
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    ref = T.Compose([T.Resize(draft_size(size), interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size)])(img)
    ours = CenterCropResize(size)(img)
    assert ours.size == ref.size == (size, size)
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 3  # same geometry; bicubic rounding only
