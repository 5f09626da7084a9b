"""The shelf detector as a static-shape graph (issue 18.7, the mobile export of stage one). torchvision's Faster
R-CNN has data-dependent shapes (how many proposals survive NMS, how many detections pass the score threshold),
which torch.export, and so litert-torch, cannot trace. StaticDetector computes the same network on a fixed input
size with fixed-size intermediate results:

- the photo is letterboxed by the caller to exactly (height, width) = the detector's (min_size, max_size), so the
  model's own resize is the identity; normalisation and the padding to a multiple of 32 happen inside;
- the anchors of that size are a constant;
- the RPN keeps the top `pre_nms_top_n` proposals per FPN level, suppresses overlaps per level with Cluster-NMS (a
  fixed number of parallel passes that reaches greedy NMS's result: Zheng et al. 2020) and keeps the best
  `post_nms_top_n`, flagging the slots left empty;
- MultiScaleRoIAlign is computed by gathers (torchvision's roi_align, aligned=False, sampling_ratio 2) on every
  level, each RoI taking its FPN level's result;
- the box head, then per-class Cluster-NMS (0.5) and the class-agnostic one (the config's agnostic_nms_iou) over
  every (proposal, class) candidate, then the best `detections_per_image`;
- with the config's tta_hflip, the same on the mirrored input, and the two passes merged as the torch model's
  test-time augmentation (detection.merge_mirrored).

Output: boxes (D, 4) xyxy in input pixels, labels (D,) class index (0-based), scores (D,) best first, D fixed;
rows that are not detections have score 0. Filter at the artifact's score_threshold. Equal to the torch model's
detections up to float rounding and the rare case greedy NMS would need more passes (see NMS_PASSES). No Django."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Cluster-NMS iterations: greedy NMS's result is reached once a pass changes nothing (on the tests' shelves 4 passes
# left one photo of eight different from torchvision, 8 none)
NMS_PASSES = 12


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def cluster_nms(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Boxes sorted best first, `valid` (N,) bool: which survive greedy NMS at iou_threshold (a box is suppressed
    by a better kept box overlapping it by more than the threshold). Static shapes: NMS_PASSES parallel passes."""
    n = boxes.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=boxes.dtype), diagonal=1)
    iou = _box_iou(boxes, boxes) * upper  # iou[i, j], i better than j
    keep = valid
    for _ in range(NMS_PASSES):
        suppressors = iou * keep.to(iou.dtype)[:, None]
        keep = valid & (suppressors.max(dim=0).values <= iou_threshold)
    return keep


def _roi_align_level(feat: torch.Tensor, rois: torch.Tensor, scale: float, out: int, ratio: int) -> torch.Tensor:
    """torchvision.ops.roi_align(feat (1, C, H, W), rois (K, 4) xyxy, out, scale, ratio, aligned=False) by gathers:
    (K, C, out, out)."""
    _, c, h, w = feat.shape
    k = rois.shape[0]
    x1, y1, x2, y2 = (rois * scale).unbind(1)
    roi_w = (x2 - x1).clamp(min=1.0)
    roi_h = (y2 - y1).clamp(min=1.0)
    steps = (
        torch.arange(out, dtype=feat.dtype)[:, None] + (torch.arange(ratio, dtype=feat.dtype)[None, :] + 0.5) / ratio
    )
    steps = steps.reshape(-1)  # (out * ratio,) sample offsets in bins
    ys = y1[:, None] + steps[None, :] * (roi_h / out)[:, None]  # (K, out * ratio)
    xs = x1[:, None] + steps[None, :] * (roi_w / out)[:, None]
    y = ys[:, :, None].expand(k, out * ratio, out * ratio)
    x = xs[:, None, :].expand(k, out * ratio, out * ratio)
    inside = (y >= -1.0) & (y <= h) & (x >= -1.0) & (x <= w)
    y = y.clamp(min=0.0)
    x = x.clamp(min=0.0)
    y_low = y.floor().clamp(max=h - 1)
    x_low = x.floor().clamp(max=w - 1)
    y = torch.where(y_low >= h - 1, y_low, y)
    x = torch.where(x_low >= w - 1, x_low, x)
    y_high = (y_low + 1).clamp(max=h - 1)
    x_high = (x_low + 1).clamp(max=w - 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    flat = feat.reshape(c, h * w)

    def at(yy, xx):
        idx = (yy * w + xx).to(torch.int64).reshape(-1)
        return flat.index_select(1, idx).reshape(c, k, out * ratio, out * ratio)

    val = (
        (hy * hx)[None] * at(y_low, x_low)
        + (hy * lx)[None] * at(y_low, x_high)
        + (ly * hx)[None] * at(y_high, x_low)
        + (ly * lx)[None] * at(y_high, x_high)
    ) * inside.to(feat.dtype)[None]
    val = val.reshape(c, k, out, ratio, out, ratio).mean(dim=(3, 5))
    return val.permute(1, 0, 2, 3)


class StaticDetector(nn.Module):
    """image (1, 3, height, width) float RGB in [0, 1] -> (boxes (D, 4), labels (D,), scores (D,)); see the module
    docstring. `model`: the eval-mode torchvision FasterRCNN of training.engine.detection.build_detector."""

    def __init__(
        self, model: nn.Module, height: int, width: int, *, agnostic_iou: float | None = None, hflip: bool = False
    ):
        super().__init__()
        from torchvision.models.detection.image_list import ImageList  # noqa: PLC0415

        model = model.eval()
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        self.rpn_coder = model.rpn.box_coder
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor
        self.box_coder = model.roi_heads.box_coder
        self.height, self.width = int(height), int(width)
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(t.image_std).view(1, 3, 1, 1))
        div = t.size_divisible
        self.pad_h = (-self.height) % div
        self.pad_w = (-self.width) % div
        rpn, heads = model.rpn, model.roi_heads
        self.pre_nms_top_n = rpn._pre_nms_top_n["testing"]
        self.post_nms_top_n = rpn._post_nms_top_n["testing"]
        self.rpn_nms = rpn.nms_thresh
        self.rpn_min_size = rpn.min_size
        self.score_thresh = heads.score_thresh
        self.nms = heads.nms_thresh
        self.detections = heads.detections_per_img
        self.agnostic_iou = agnostic_iou
        self.hflip = bool(hflip)
        pool = heads.box_roi_pool
        self.featmap_names = list(pool.featmap_names)
        self.output_size = pool.output_size[0] if isinstance(pool.output_size, tuple | list) else pool.output_size
        self.sampling_ratio = pool.sampling_ratio
        with torch.no_grad():  # the constant anchors of this size, and the levels' sizes and scales
            x = torch.zeros(1, 3, self.height + self.pad_h, self.width + self.pad_w)
            feats = self.backbone(x)
            maps = list(feats.values())
            anchors = rpn.anchor_generator(ImageList(x, [(self.height, self.width)]), maps)[0]
            from torchvision.ops.poolers import _setup_scales  # noqa: PLC0415

            scales, mapper = _setup_scales([feats[n] for n in self.featmap_names], [(self.height, self.width)], 224, 4)
        self.register_buffer("anchors", anchors)
        per_cell = anchors.shape[0] // sum(m.shape[-2] * m.shape[-1] for m in maps)  # anchors per location
        self.level_sizes = [int(m.shape[-2] * m.shape[-1] * per_cell) for m in maps]
        self.scales = list(scales)
        self.k_min, self.k_max = int(mapper.k_min), int(mapper.k_max)

    def _clip(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes (..., 4) clipped to the input, as torchvision's clip_boxes_to_image."""
        x = boxes[..., 0::2].clamp(0, self.width)
        y = boxes[..., 1::2].clamp(0, self.height)
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)

    def _proposals(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.models.detection.rpn import concat_box_prediction_layers  # noqa: PLC0415

        objectness, deltas = self.rpn_head(feats)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = self.rpn_coder.decode(deltas.detach(), [self.anchors]).reshape(-1, 4)
        objectness = objectness.reshape(-1)
        picked_boxes, picked_scores, picked_levels = [], [], []
        start = 0
        offset = float(max(self.height, self.width) + 1)
        for level, n in enumerate(self.level_sizes):
            top = torch.topk(objectness[start : start + n], min(self.pre_nms_top_n, n))
            picked_scores.append(top.values)
            picked_boxes.append(boxes[start : start + n].index_select(0, top.indices))
            picked_levels.append(torch.full((top.values.shape[0],), level * offset))
            start += n
        boxes = torch.cat(picked_boxes)
        scores = torch.sigmoid(torch.cat(picked_scores))
        shift = torch.cat(picked_levels)
        boxes = self._clip(boxes)
        valid = ((boxes[:, 2] - boxes[:, 0]) >= self.rpn_min_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.rpn_min_size)
        order = torch.topk(torch.where(valid, scores, scores - 2.0), scores.shape[0]).indices  # best first
        boxes, scores, shift, valid = boxes[order], scores[order], shift[order], valid[order]
        keep = cluster_nms(boxes + shift[:, None], valid, self.rpn_nms)  # per level: levels shifted apart
        top = torch.topk(torch.where(keep, scores, scores - 2.0), min(self.post_nms_top_n, scores.shape[0]))
        return boxes.index_select(0, top.indices), keep.index_select(0, top.indices)

    def _roi_pool(self, feats: dict, rois: torch.Tensor) -> torch.Tensor:
        area = (rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])
        lvl = torch.floor(4 + torch.log2(torch.sqrt(area.clamp(min=1e-12)) / 224) + 1e-6)
        lvl = lvl.clamp(self.k_min, self.k_max) - self.k_min
        out = 0.0
        for i, name in enumerate(self.featmap_names):
            pooled = _roi_align_level(feats[name], rois, self.scales[i], self.output_size, self.sampling_ratio)
            out = out + pooled * (lvl == i).to(pooled.dtype)[:, None, None, None]
        return out

    def forward(self, image: torch.Tensor):
        if not self.hflip:
            return self._detect(image, self.agnostic_iou)
        # the test-time augmentation, as detection.merge_mirrored: each pass's best detections after its per-class
        # NMS, the mirror's flipped back, then per-class and class-agnostic NMS over both
        boxes, labels, scores = self._detect(image, None)
        mb, ml, ms = self._detect(image.flip(-1), None)
        from .detection import mirror_boxes  # noqa: PLC0415

        boxes = torch.cat([boxes, mirror_boxes(mb, self.width)])
        labels, scores = torch.cat([labels, ml]), torch.cat([scores, ms])
        order = torch.topk(scores, scores.shape[0]).indices  # best first; empty rows (score 0) last
        boxes, labels, scores = (t.index_select(0, order) for t in (boxes, labels, scores))
        return self._suppress(boxes, labels, scores, scores > 0, self.agnostic_iou)

    def _suppress(self, boxes, labels, scores, ok, agnostic_iou: float | None):
        """Candidates sorted best first, `ok` the valid ones: per-class NMS, the class-agnostic one, the best
        `detections` (rows that are not detections: score 0)."""
        offset = float(max(self.height, self.width) + 1)
        keep = cluster_nms(boxes + (labels.to(boxes.dtype) * offset)[:, None], ok, self.nms)  # per class
        if agnostic_iou is not None:
            keep = cluster_nms(boxes, keep, agnostic_iou)
        scores = torch.where(keep, scores, torch.zeros_like(scores))
        order = torch.topk(scores, min(self.detections, scores.shape[0])).indices  # as torchvision: after NMS
        return boxes.index_select(0, order), labels.index_select(0, order), scores.index_select(0, order)

    def _detect(self, image: torch.Tensor, agnostic_iou: float | None):
        x = (image - self.mean) / self.std
        x = F.pad(x, (0, self.pad_w, 0, self.pad_h))
        feats = self.backbone(x)
        rois, roi_valid = self._proposals(list(feats.values()))
        pooled = self._roi_pool(feats, rois)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        n_classes = class_logits.shape[-1]
        boxes = self.box_coder.decode(box_regression, [rois]).reshape(-1, n_classes, 4)
        boxes = self._clip(boxes)[:, 1:].reshape(-1, 4)
        scores = F.softmax(class_logits, -1)[:, 1:]
        labels = torch.arange(n_classes - 1).view(1, -1).expand_as(scores).reshape(-1)
        scores = scores.reshape(-1)
        ok = roi_valid[:, None].expand(-1, n_classes - 1).reshape(-1)
        ok = ok & (scores > self.score_thresh)
        ok = ok & ((boxes[:, 2] - boxes[:, 0]) >= 1e-2) & ((boxes[:, 3] - boxes[:, 1]) >= 1e-2)
        top = torch.topk(torch.where(ok, scores, scores - 2.0), scores.shape[0])  # every candidate, best first
        boxes, labels, ok, scores = (
            boxes.index_select(0, top.indices),
            labels.index_select(0, top.indices),
            ok.index_select(0, top.indices),
            scores.index_select(0, top.indices),
        )
        return self._suppress(boxes, labels, scores, ok, agnostic_iou)


def letterbox(image: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, float]:
    """A (3, h, w) [0, 1] photo as StaticDetector's input: scaled (bilinear) to fit height x width with its aspect
    ratio, pasted at the top-left of a black canvas -> ((1, 3, height, width), scale). Boxes of the output divided
    by `scale` are in the photo's pixels. A photo of exactly that size passes unchanged (scale 1)."""
    _, h, w = image.shape
    scale = min(height / h, width / w)
    if (h, w) != (height, width):
        nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        image = F.pad(image, (0, width - nw, 0, height - nh))
    return image[None], scale
