"""Tests of the engine's config resolution and of its purity (no Django)."""

import subprocess
import sys
from pathlib import Path

import pytest

from training.engine import DEFAULT_CONFIG, resolve_config

REPO = Path(__file__).resolve().parents[2]


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


def test_engine_imports_no_django():
    code = (
        "import sys; import training.engine, training.engine.loop, training.engine.phase1; "
        "import inference.decode, inference.recognizer, inference.index, inference.batch; "
        "bad = [m for m in sys.modules if m == 'django' or m.startswith('django.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
