"""Training configuration: defaults, validation and merging of overrides (no torch import here)."""

from __future__ import annotations

import copy
import math
from typing import Any

DEFAULT_CONFIG: dict[str, Any] = {
    # Model
    "backbone": "mobilenetv3_small_100",  # any timm model name; measured fastest useful CNN on a small CPU
    "pretrained": False,  # True: try timm's hub weights, fall back to random init with a warning
    "pretrained_path": None,  # local weights file (timm/torch/safetensors state dict, or a Loupe model.pt)
    "image_size": 128,
    # Optimisation
    # Measured on the demo LEGO set (~770 images, 12 parts, 9 colours, random init, CPU): lr 1e-3 / 20 epochs
    # gave part top-1 0.12; lr 3e-3 / 40 epochs gave 0.36 (colour 0.99). Use ~1e-3 when fine-tuning pretrained.
    "epochs": 40,
    "batch_size": 32,
    "lr": 3e-3,
    "weight_decay": 0.05,
    "warmup_epochs": 1.0,
    "label_smoothing": 0.1,
    # Class weights in the loss from the train counts: "none", "inverse" (N / (K * n_c)) or "sqrt_inverse".
    "class_weighting": "none",
    # Augmentation (train only; validation is resize + centre crop)
    "hflip": True,  # set False when mirror-image parts are different classes (left/right wedges)
    "rotation_degrees": 15.0,
    "color_jitter": 0.2,  # brightness/contrast/saturation; hue is never jittered (colour labels)
    "crop_scale_min": 0.6,
    # Runtime
    "num_workers": "auto",
    "torch_threads": "auto",  # CPU intra-op threads while training: "auto" = cpus - workers - 1 (min 1)
    "seed": 0,
    "device": "auto",  # "auto" (cuda if available else cpu), "cpu", "cuda", "cuda:1", ...
    "max_train_seconds": None,  # stop training (keeping the best epoch so far) after this many seconds
    "progress_every": 20,  # call progress() every N train steps (and at least every ~15 s)
}


CLASS_WEIGHTINGS = ("none", "inverse", "sqrt_inverse")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"config {key!r}: expected {expected}, got {value!r}")


def _validate(cfg: dict[str, Any]) -> None:
    _check(
        isinstance(cfg["backbone"], str) and cfg["backbone"].strip() != "",
        "backbone",
        cfg["backbone"],
        "a timm model name such as 'mobilenetv3_small_100'",
    )
    _check(isinstance(cfg["pretrained"], bool), "pretrained", cfg["pretrained"], "true or false")
    _check(
        cfg["pretrained_path"] is None or (isinstance(cfg["pretrained_path"], str) and cfg["pretrained_path"]),
        "pretrained_path",
        cfg["pretrained_path"],
        "null or the path of a local weights file",
    )
    _check(
        _is_int(cfg["image_size"]) and 16 <= cfg["image_size"] <= 1024,
        "image_size",
        cfg["image_size"],
        "an integer between 16 and 1024",
    )
    _check(_is_int(cfg["epochs"]) and 1 <= cfg["epochs"] <= 10_000, "epochs", cfg["epochs"], "an integer >= 1")
    _check(
        _is_int(cfg["batch_size"]) and 1 <= cfg["batch_size"] <= 4096,
        "batch_size",
        cfg["batch_size"],
        "an integer between 1 and 4096",
    )
    _check(_is_number(cfg["lr"]) and 0 < cfg["lr"] < 10, "lr", cfg["lr"], "a number > 0 (e.g. 0.001)")
    _check(
        _is_number(cfg["weight_decay"]) and cfg["weight_decay"] >= 0,
        "weight_decay",
        cfg["weight_decay"],
        "a number >= 0",
    )
    _check(
        _is_number(cfg["warmup_epochs"]) and cfg["warmup_epochs"] >= 0,
        "warmup_epochs",
        cfg["warmup_epochs"],
        "a number >= 0",
    )
    _check(
        _is_number(cfg["label_smoothing"]) and 0 <= cfg["label_smoothing"] < 1,
        "label_smoothing",
        cfg["label_smoothing"],
        "a number in [0, 1)",
    )
    _check(
        cfg["class_weighting"] in CLASS_WEIGHTINGS,
        "class_weighting",
        cfg["class_weighting"],
        " or ".join(map(repr, CLASS_WEIGHTINGS)),
    )
    _check(isinstance(cfg["hflip"], bool), "hflip", cfg["hflip"], "true or false")
    _check(
        _is_number(cfg["rotation_degrees"]) and 0 <= cfg["rotation_degrees"] <= 180,
        "rotation_degrees",
        cfg["rotation_degrees"],
        "a number in [0, 180]",
    )
    _check(
        _is_number(cfg["color_jitter"]) and 0 <= cfg["color_jitter"] < 1,
        "color_jitter",
        cfg["color_jitter"],
        "a number in [0, 1)",
    )
    _check(
        _is_number(cfg["crop_scale_min"]) and 0 < cfg["crop_scale_min"] <= 1,
        "crop_scale_min",
        cfg["crop_scale_min"],
        "a number in (0, 1]",
    )
    nw = cfg["num_workers"]
    _check(nw == "auto" or (_is_int(nw) and 0 <= nw <= 64), "num_workers", nw, '"auto" or an integer >= 0')
    tt = cfg["torch_threads"]
    _check(tt == "auto" or (_is_int(tt) and 1 <= tt <= 256), "torch_threads", tt, '"auto" or an integer >= 1')
    _check(_is_int(cfg["seed"]), "seed", cfg["seed"], "an integer")
    dev = cfg["device"]
    _check(
        isinstance(dev, str) and (dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:")),
        "device",
        dev,
        '"auto", "cpu", "cuda", "cuda:N" or "mps"',
    )
    mts = cfg["max_train_seconds"]
    _check(mts is None or (_is_number(mts) and mts > 0), "max_train_seconds", mts, "null or a number > 0")
    _check(
        _is_int(cfg["progress_every"]) and cfg["progress_every"] >= 1,
        "progress_every",
        cfg["progress_every"],
        "an integer >= 1",
    )


def resolve_config(overrides: dict | None = None) -> dict:
    """Return DEFAULT_CONFIG updated with `overrides`, validated.

    Unknown keys and bad values raise ValueError with a message naming the key. The backbone name is checked
    against timm's registry (this imports timm lazily)."""
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise ValueError(f"config overrides must be a dict, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(
            f"unknown config key(s): {', '.join(map(repr, unknown))}; "
            f"allowed keys are: {', '.join(sorted(DEFAULT_CONFIG))}"
        )
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg.update(copy.deepcopy(overrides))
    # Be lenient with integral floats coming from JSON/forms for integer keys (e.g. 10.0 epochs).
    for key in ("image_size", "epochs", "batch_size", "seed", "progress_every"):
        v = cfg[key]
        if isinstance(v, float) and v.is_integer():
            cfg[key] = int(v)
    for key in (
        "lr",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "rotation_degrees",
        "color_jitter",
        "crop_scale_min",
        "max_train_seconds",
    ):
        if _is_int(cfg[key]):
            cfg[key] = float(cfg[key])
    _validate(cfg)
    import timm  # noqa: PLC0415 - heavy import only when really validating a backbone name

    if not timm.is_model(cfg["backbone"]):
        close = timm.list_models(f"*{cfg['backbone'].split('.')[0][:6]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"config 'backbone': {cfg['backbone']!r} is not a timm model name{hint}")
    return cfg
