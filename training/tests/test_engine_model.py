"""Tests of the model builder: pretrained weights from a file or the hub (offline fallback), timm backbone families."""

import logging

import pytest
import torch

from training.engine import resolve_config
from training.engine.model import build_model, create_backbone
from training.engine.synthetic import TINY_TEST_CONFIG


def tiny(**over):
    return {**TINY_TEST_CONFIG, **over}


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
