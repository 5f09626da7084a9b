"""Shelf recognition's pure parts (no Django): the crops of a photo's boxes for the SKU model, the answer's boxes and
counts, and the annotated photo.

Public API::

    crop_boxes(image, detections, *, margin=CROP_MARGIN) -> [PIL.Image]       one crop per detection, a margin around
    shelf_boxes(detections, skus, *, scale) -> [box dict]                     the answer's boxes (see inference.apis)
    shelf_counts(boxes) -> {"counts": {sku: n}, "unknown": n, "containers": {class: n}}
    annotate(image, boxes, *, scale, max_side=ANNOTATE_MAX_SIDE, quality=85) -> JPEG bytes
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from labeling.detection_formats import CROP_MARGIN, crop_box

if TYPE_CHECKING:
    from .detector import Detection

ANNOTATE_MAX_SIDE = 1600  # the annotated photo's longer side at most (pixels)
_ACCEPTED, _UNKNOWN, _NO_SKU = (40, 200, 70), (255, 150, 20), (70, 150, 255)


def crop_boxes(image: Image.Image, detections: Sequence[Detection], *, margin: float = CROP_MARGIN) -> list:
    """crop_box of each detection."""
    return [crop_box(image, (d.x, d.y, d.w, d.h), margin=margin) for d in detections]


def shelf_boxes(detections: Sequence[Detection], skus: Sequence[dict | None], *, scale: tuple[float, float]) -> list:
    """The answer's boxes: {"box": {x, y, w, h} in pixels of the uploaded photo (detections are in pixels of the
    decoded photo, `scale` = (sx, sy) maps them back), "container": {label, confidence}, "sku": {label, confidence,
    reason} or None (no SKU model)}."""
    sx, sy = scale
    out = []
    for d, sku in zip(detections, skus, strict=True):
        out.append(
            {
                "box": {
                    "x": round(d.x * sx, 1),
                    "y": round(d.y * sy, 1),
                    "w": round(d.w * sx, 1),
                    "h": round(d.h * sy, 1),
                },
                "container": {"label": d.label, "confidence": round(d.score, 4)},
                "sku": sku,
            }
        )
    return out


def shelf_counts(boxes: Sequence[dict]) -> dict:
    """{"counts": {SKU: boxes given that SKU}, "unknown": boxes with no SKU (rejected, or no SKU model),
    "containers": {container class: boxes}}; keys sorted."""
    counts: dict[str, int] = {}
    containers: dict[str, int] = {}
    unknown = 0
    for b in boxes:
        containers[b["container"]["label"]] = containers.get(b["container"]["label"], 0) + 1
        label = (b["sku"] or {}).get("label")
        if label is None:
            unknown += 1
        else:
            counts[label] = counts.get(label, 0) + 1
    return {"counts": dict(sorted(counts.items())), "unknown": unknown, "containers": dict(sorted(containers.items()))}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def annotate(
    image: Image.Image,
    boxes: Sequence[dict],
    *,
    scale: tuple[float, float] = (1.0, 1.0),
    max_side: int = ANNOTATE_MAX_SIDE,
    quality: int = 85,
) -> bytes:
    """The photo as a JPEG with every box drawn and named (its SKU, else its container class, and the confidence):
    green = SKU given, orange = SKU rejected, blue = no SKU model. `boxes` are shelf_boxes' (pixels of the uploaded
    photo; `scale` is what maps the decoded `image` to them). The photo is first reduced to at most max_side pixels
    on its longer side, so the labels stay readable and the answer small."""
    out = image.convert("RGB")
    f = min(1.0, max_side / max(out.size))
    if f < 1.0:
        out = out.resize((max(1, round(out.width * f)), max(1, round(out.height * f))), Image.Resampling.LANCZOS)
    else:
        out = out.copy()
    kx, ky = out.width / (image.width * scale[0]), out.height / (image.height * scale[1])
    side = max(out.size)
    line = max(2, side // 400)
    font = _font(max(11, side // 60))
    draw = ImageDraw.Draw(out)
    for b in boxes:
        x0, y0 = b["box"]["x"] * kx, b["box"]["y"] * ky
        x1, y1 = x0 + b["box"]["w"] * kx, y0 + b["box"]["h"] * ky
        sku = b["sku"]
        if sku is None:
            colour, text = _NO_SKU, f"{b['container']['label']} {b['container']['confidence']:.2f}"
        elif sku["label"] is None:
            colour, text = _UNKNOWN, f"? {b['container']['label']} {sku['confidence']:.2f}"
        else:
            colour, text = _ACCEPTED, f"{sku['label']} {sku['confidence']:.2f}"
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        ly = y0 - th if y0 - th >= 0 else y0  # above the box, or inside its top when at the photo's edge
        lx = min(max(0.0, x0), max(0.0, out.width - tw))
        draw.rectangle((lx, ly, lx + tw, ly + th), fill=colour)
        draw.text((lx + 2 - tx0, ly + 2 - ty0), text, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
