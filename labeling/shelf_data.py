"""Deterministic synthetic shelf photos for the shelf detector and SKU classifier (demo, tests, benchmarks).

``generate_shelves(out_dir, n_photos, seed=...)`` writes::

    out_dir/classes.txt                        the container classes, one a line (YOLO class ids = line numbers)
    out_dir/images/{train,val,test}/<stem>.jpg shelf photos
    out_dir/labels/{train,val,test}/<stem>.txt YOLO boxes: "class xc yc w h", normalised to [0, 1]
    out_dir/skus.json                          the SKUs: name, container class, label design
    out_dir/shelves.json                       per photo: every box (class, SKU, pixel boxes, visible fraction)
                                               and the counts per SKU
    out_dir/crops/{train,val,test}/<sku>/*.jpg the labeled boxes cut out as the shelf endpoint cuts a detected box
                                               (detection_formats.crop_box: a 4 % margin), one folder per SKU
                                               (a class-from-folder SKU classification project, trained with
                                               SKU_PROJECT_OPTIONS)

A photo shows 2-4 shelf rows (wood or metal boards on a wall) filled left to right with bottles, cans, glasses
(jars) and a few `unknown_container` SKUs (cartons), each SKU with its own label design: body and label colours,
stripes, a logo shape and a glyph pattern standing for the brand text. Neighbours may overlap, some rows have a
darker back row partly hidden by the front row, price tags on the board edge cover the products' feet; scale
varies per photo and row; lighting (brightness, colour cast, a gradient), a slight perspective warp and JPEG
compression finish the photo.

Boxes. Every container is drawn through its own alpha mask into an instance-id map (later, nearer drawings
overwrite earlier ones; price tags overwrite too), which is warped with the photo (nearest neighbour). For each
instance:

- ``box``: the tight box of its pixels still visible in the final photo (the visible extent) — the YOLO label
  and the crop;
- ``full_box``: the whole object's box (the unoccluded mask's box, mapped through the perspective, clipped to the
  photo);
- ``visible``: visible pixels / the whole mask's pixels (counted before the warp, which preserves areas up to
  resampling, but only the pixels the warp keeps inside the frame: a container cut off by the photo's edge is as
  hidden as one behind another).

Instances less than ``min_visible`` (default 0.35) visible are not labeled and not counted (they are listed under
``hidden`` in shelves.json). ``counts`` are the labeled boxes per SKU. Boxes are ``[x, y, w, h]`` in pixels
(top-left origin, x1 = x + w exclusive).

Pure Python + Pillow + NumPy, no Django. The same arguments give byte-identical files: all randomness comes from
``random.Random`` seeded from (seed, photo index); the SKU designs from the seed alone.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .detection_formats import crop_box

__all__ = [
    "CONTAINER_CLASSES",
    "SKU_PROJECT_MIN_SIDE",
    "SKU_PROJECT_OPTIONS",
    "SPLITS",
    "Sku",
    "detection_manifest",
    "generate_shelves",
    "make_skus",
    "read_yolo_labels",
]

CONTAINER_CLASSES = ["bottle", "can", "glass", "unknown_container"]
SPLITS = ("train", "val", "test")
MIN_VISIBLE = 0.35
# The training options of a project of these SKU crops (the shelf demo's, bench-shelf's): each crop fitted whole
# into the model's square (a centre crop cuts a bottle's cap and foot off), and no shifted / zoomed views (they cut
# part of a tight crop's label off). make bench-shelf measured both (see its notes and the README). Five views for the
# CPU tail fine-tune (the sku preset has eight): bench-shelf's ~8,000 train crops' maps take 722 s for five views of
# its 1,200 s budget, and make bench-shelf measured five.
SKU_PROJECT_OPTIONS = {"resize": "fit", "quick_views": [], "tail_views": 5}
# The minimum image side of that project: a crop is as small as its box (on 480x360 shelves 9-107 px short side,
# median 31), and a project's default minimum (224 px, for whole-product photos) would leave every crop out of a
# freeze; the model fits each crop into its square whatever its size.
SKU_PROJECT_MIN_SIDE = 8
SPRITE_H = 160  # SKU sprites are drawn once at this height, then resized per instance
BACK_DIM = 0.78
_DIM_LUT = [int(v * BACK_DIM) for v in range(256)] * 3

_LABEL_COLOURS = [
    (200, 30, 40),
    (30, 90, 200),
    (240, 200, 40),
    (30, 150, 70),
    (250, 250, 245),
    (25, 25, 30),
    (240, 120, 20),
    (130, 40, 150),
    (90, 200, 220),
    (120, 60, 20),
    (230, 110, 170),
    (150, 200, 40),
]
_BODY_COLOURS = {
    "bottle": [(60, 120, 50), (110, 70, 30), (200, 210, 215), (40, 60, 110), (150, 40, 40)],
    "can": [(190, 190, 195), (160, 30, 30), (30, 40, 120), (220, 220, 220), (40, 40, 40)],
    "glass": [(210, 220, 225), (180, 150, 90), (120, 160, 110), (230, 230, 230)],
    "unknown_container": [(240, 240, 235), (200, 170, 120), (90, 140, 200)],
}
_LOGOS = ["circle", "triangle", "square", "diamond", "star", "ring", "bar"]
# width / height of the whole container, by kind (varied per SKU a little)
_ASPECT = {"bottle": 0.32, "can": 0.56, "glass": 0.62, "unknown_container": 0.5}


@dataclass(frozen=True)
class Sku:
    name: str
    container: str  # one of CONTAINER_CLASSES
    design: dict  # colours, stripes, logo, glyph rows: what the sprite is drawn from

    def to_json(self) -> dict:
        return {"name": self.name, "container": self.container, "design": self.design}


def make_skus(n_skus: int, seed: int) -> list[Sku]:
    """n_skus distinct SKU designs (a function of the seed): containers cycle bottle, can, glass, with every
    tenth SKU an `unknown_container` (carton); no two SKUs share (container, label colour, logo, stripes)."""
    if n_skus < 1:
        raise ValueError(f"n_skus must be >= 1, got {n_skus}")
    rng = random.Random(f"skus-{seed}")
    skus: list[Sku] = []
    seen: set = set()
    kinds = ["bottle", "can", "glass"]
    for i in range(n_skus):
        kind = "unknown_container" if i % 10 == 9 else kinds[i % 3]
        for _ in range(1000):
            label = rng.randrange(len(_LABEL_COLOURS))
            accent = rng.choice([c for c in range(len(_LABEL_COLOURS)) if c != label])
            logo = rng.choice(_LOGOS)
            stripes = rng.choice([0, 1, 2, 3])
            key = (kind, label, logo, stripes)
            if key not in seen:
                seen.add(key)
                break
        design = {
            "body": list(rng.choice(_BODY_COLOURS[kind])),
            "label": list(_LABEL_COLOURS[label]),
            "accent": list(_LABEL_COLOURS[accent]),
            "cap": list(_LABEL_COLOURS[rng.randrange(len(_LABEL_COLOURS))]),
            "logo": logo,
            "stripes": stripes,
            "stripe_dir": rng.choice(["h", "v", "d"]),
            "glyphs": [[rng.randrange(2, 6) for _ in range(rng.randrange(3, 6))] for _ in range(rng.randrange(1, 3))],
            "aspect": round(_ASPECT[kind] * rng.uniform(0.9, 1.12), 3),
            "label_top": round(rng.uniform(0.35, 0.5) if kind == "bottle" else rng.uniform(0.15, 0.3), 3),
        }
        skus.append(Sku(f"sku_{i:02d}", kind, design))
    return skus


# ----------------------------------------------------------------------------------------------- sprites
def _logo(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, back) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=back)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r * 0.35, cx + r, cy + r * 0.35], fill=fill)
    else:  # star
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)


def _silhouette(kind: str, w: int, h: int, design: dict) -> tuple[Image.Image, tuple[int, int]]:
    """The container's mask (L, w x h) and the (top, bottom) rows of its label band."""
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    if kind == "bottle":
        neck_w = max(2, int(w * 0.36))
        x0 = (w - neck_w) // 2
        d.rectangle([x0, 0, x0 + neck_w - 1, int(h * 0.3)], fill=255)  # neck + cap
        d.polygon(
            [(x0, int(h * 0.28)), (x0 + neck_w - 1, int(h * 0.28)), (w - 1, int(h * 0.42)), (0, int(h * 0.42))], 255
        )
        d.rounded_rectangle([0, int(h * 0.4), w - 1, h - 1], radius=max(1, w // 8), fill=255)
    elif kind == "can":
        d.rounded_rectangle([0, 0, w - 1, h - 1], radius=max(1, w // 10), fill=255)
    elif kind == "glass":
        d.rounded_rectangle([0, int(h * 0.12), w - 1, h - 1], radius=max(1, w // 6), fill=255)
        d.rectangle([int(w * 0.06), 0, int(w * 0.94), int(h * 0.14)], fill=255)  # lid
    else:  # carton: a box with a gable top
        d.rectangle([0, int(h * 0.15), w - 1, h - 1], fill=255)
        d.polygon([(0, int(h * 0.15)), (w // 2, 0), (w - 1, int(h * 0.15))], fill=255)
    top = int(h * design["label_top"])
    bottom = min(h - 2, top + int(h * (0.38 if kind == "bottle" else 0.55)))
    return mask, (top, bottom)


def _sprite(sku: Sku) -> tuple[Image.Image, Image.Image]:
    """(RGB, mask L) of the SKU at SPRITE_H rows, shaded like a cylinder (boxes: flat with one darker side)."""
    d = sku.design
    h = SPRITE_H
    w = max(8, int(round(h * d["aspect"])))
    mask, (top, bottom) = _silhouette(sku.container, w, h, d)
    img = Image.new("RGB", (w, h), tuple(d["body"]))
    draw = ImageDraw.Draw(img)
    label, accent = tuple(d["label"]), tuple(d["accent"])
    draw.rectangle([0, top, w - 1, bottom], fill=label)
    band_h = bottom - top
    n = d["stripes"]
    for k in range(n):  # stripes in the accent colour
        if d["stripe_dir"] == "h":
            y = top + int(band_h * (k + 1) / (n + 1))
            draw.rectangle([0, y - 2, w - 1, y + 2], fill=accent)
        elif d["stripe_dir"] == "v":
            x = int(w * (k + 1) / (n + 1))
            draw.rectangle([x - 2, top, x + 2, bottom], fill=accent)
        else:
            x = int(w * (k + 1) / (n + 1))
            draw.line([(x - w // 3, bottom), (x + w // 3, top)], fill=accent, width=4)
    r = max(3, min(w, band_h) * 0.22)
    _logo(draw, d["logo"], w / 2, top + band_h * 0.33, r, accent, label)
    glyph_col = (20, 20, 20) if sum(label) > 380 else (245, 245, 245)
    gy = top + band_h * 0.62
    for row in d["glyphs"]:  # "text": rows of glyph blocks of seeded widths
        total = sum(row) + len(row) - 1
        unit = (w * 0.8) / max(total, 1)
        x = w * 0.1
        for g in row:
            draw.rectangle([x, gy, x + g * unit - 1, gy + max(2, band_h * 0.07)], fill=glyph_col)
            x += (g + 1) * unit
        gy += band_h * 0.13
    if sku.container == "bottle":
        draw.rectangle([0, 0, w - 1, int(h * 0.08)], fill=tuple(d["cap"]))
    elif sku.container == "glass":
        draw.rectangle([0, 0, w - 1, int(h * 0.14)], fill=tuple(d["cap"]))
    elif sku.container == "can":
        draw.rectangle([0, 0, w - 1, int(h * 0.05)], fill=(200, 200, 205))
        draw.rectangle([0, h - int(h * 0.05), w - 1, h - 1], fill=(170, 170, 175))
    # cylinder shading: bright stripe left of centre, darker edges
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    shade = 0.62 + 0.45 * np.cos(np.clip(xs + 0.25, -1.5, 1.5) * 1.05)
    if sku.container == "unknown_container":
        shade = np.where(xs > 0.45, 0.78, 1.0).astype(np.float32)
    arr = np.asarray(img, dtype=np.float32) * shade[None, :, None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img, mask


# ----------------------------------------------------------------------------------------------- scenes
def _perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> np.ndarray:
    """The 8 homography coefficients mapping points dst -> src (PIL's PERSPECTIVE convention: output -> input)."""
    a = []
    b = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    return np.linalg.solve(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def _apply_h(coeffs: np.ndarray, pts: np.ndarray) -> np.ndarray:
    a, b, c, d, e, f, g, h = coeffs
    x, y = pts[:, 0], pts[:, 1]
    den = g * x + h * y + 1.0
    return np.stack([(a * x + b * y + c) / den, (d * x + e * y + f) / den], axis=1)


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    base = np.array([rng.randint(150, 235), rng.randint(140, 225), rng.randint(130, 215)], dtype=np.float32)
    col = np.clip(base[None, :] * np.linspace(0.85, 1.1, h, dtype=np.float32)[:, None], 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(col[:, None, :], w, axis=1)), "RGB")


def _board(draw: ImageDraw.ImageDraw, rng: random.Random, x0: int, y0: int, x1: int, y1: int, wood: bool) -> None:
    if wood:
        c = (rng.randint(120, 170), rng.randint(75, 105), rng.randint(35, 60))
        draw.rectangle([x0, y0, x1, y1], fill=c)
        for _ in range(max(1, (y1 - y0) // 3)):
            y = rng.randint(y0, y1)
            draw.line([(x0, y), (x1, y + rng.randint(-2, 2))], fill=tuple(max(0, v - 25) for v in c), width=1)
    else:
        g = rng.randint(150, 200)
        draw.rectangle([x0, y0, x1, y1], fill=(g, g, g + 5))
        draw.rectangle([x0, y0, x1, y0 + max(1, (y1 - y0) // 4)], fill=(min(255, g + 40),) * 3)


def _render_photo(
    skus: list[Sku],
    sprites: list[tuple[Image.Image, Image.Image]],
    rng: random.Random,
    size: tuple[int, int],
    rows: tuple[int, ...],
) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """One photo before lighting/warp: (RGB, instance-id map uint8 (0 = none), instances with full boxes,
    mask pixel counts)."""
    w, h = size
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    ids = np.zeros((h, w), dtype=np.uint8)
    inst: list[dict] = []
    dimmed: dict[int, Image.Image] = {}
    n_rows = rng.choice(rows)
    wood = rng.random() < 0.5
    board_h = max(4, int(h * rng.uniform(0.025, 0.04)))
    top_margin = int(h * rng.uniform(0.0, 0.06))
    row_h = (h - top_margin) / n_rows
    # SKUs used on this photo: a planogram of facings (runs of the same SKU), like a real shelf
    for r in range(n_rows):
        floor = int(top_margin + (r + 1) * row_h) - board_h
        ceiling = int(top_margin + r * row_h) + (board_h if r else 0)
        space = floor - ceiling
        layers = [("back", BACK_DIM), ("front", 1.0)] if rng.random() < 0.4 else [("front", 1.0)]
        row_scale = rng.uniform(0.6, 0.9)
        for layer, dim in layers:
            x = rng.randint(-10, 12)
            lift = int(space * 0.2) if layer == "back" else 0  # the back row stands on a riser: its tops show
            y_base = floor - lift
            while x < w - 4 and len(inst) < 250:
                sku_i = rng.randrange(len(skus))
                facings = rng.randint(1, 4)
                for _ in range(facings):
                    if x >= w - 4 or len(inst) >= 250:
                        break
                    sprite, smask = sprites[sku_i]
                    if dim != 1.0:  # the back row is in the shade
                        if sku_i not in dimmed:
                            dimmed[sku_i] = sprite.point(_DIM_LUT)
                        sprite = dimmed[sku_i]
                    kind = skus[sku_i].container
                    target_h = int(space * row_scale * rng.uniform(0.92, 1.05) * (0.72 if kind == "can" else 1.0))
                    target_h = max(10, min(space - lift - 2, target_h))
                    target_w = max(4, int(round(sprite.width * target_h / sprite.height)))
                    spr = sprite.resize((target_w, target_h), Image.BILINEAR)
                    msk = smask.resize((target_w, target_h), Image.NEAREST)
                    top = y_base - target_h
                    img.paste(spr, (x, top), msk)
                    m = np.asarray(msk) > 127
                    ys, xs = np.nonzero(m)
                    gx, gy = xs + x, ys + top
                    keep = (gx >= 0) & (gx < w) & (gy >= 0) & (gy < h)
                    idx = len(inst) + 1
                    ids[gy[keep], gx[keep]] = idx
                    inst.append(
                        {
                            "sku": sku_i,
                            "full": [x, top, x + target_w, top + target_h],
                            "pixels": int(m.sum()),
                            "layer": layer,
                        }
                    )
                    gap = rng.uniform(-0.22, 0.18) if layer == "front" else rng.uniform(-0.1, 0.3)
                    x += max(3, int(target_w * (1 + gap)))
        _board(draw, rng, 0, floor, w - 1, floor + board_h, wood)
        ids[max(0, floor) : min(h, floor + board_h + 1), :] = 0
        # price tags on the board edge, covering the feet of what stands above them
        tx = rng.randint(0, 40)
        while tx < w:
            tw, th = rng.randint(14, 26) * w // 640 + 6, max(5, int(board_h * 1.6))
            ty = floor - th // 3
            draw.rectangle([tx, ty, tx + tw, ty + th], fill=(250, 250, 240), outline=(60, 60, 60))
            draw.rectangle([tx + 2, ty + 2, tx + tw // 2, ty + 4], fill=(200, 20, 20))
            ids[max(0, ty) : min(h, ty + th + 1), max(0, tx) : min(w, tx + tw + 1)] = 0
            tx += rng.randint(60, 150) * w // 640 + tw
    return img, ids, inst


def _finish(img: Image.Image, ids: np.ndarray, rng: random.Random, size: tuple[int, int]):
    """Lighting (brightness, colour cast, a linear gradient), a slight perspective warp of the photo and the id
    map, a little blur. Returns (RGB, warped id map, homography input -> output coefficients)."""
    w, h = size
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.65, 1.2)
    cast = np.array([rng.uniform(0.88, 1.12) for _ in range(3)], dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :] * math.cos(angle)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * math.sin(angle)
    grad = 1.0 + rng.uniform(0.05, 0.3) * (gx + gy)
    arr = arr * (gain * grad)[..., None] * cast[None, None, :]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    j = [(rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.04, 0.04) * h) for _ in range(4)]
    src = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    dst = [(sx + dx, sy + dy) for (sx, sy), (dx, dy) in zip(src, j, strict=True)]
    back = _perspective_coeffs(src, dst)  # output -> input
    fwd = _perspective_coeffs(dst, src)  # input -> output
    coeffs = tuple(float(c) for c in back)
    img = img.transform((w, h), Image.PERSPECTIVE, coeffs, Image.BILINEAR, fillcolor=(90, 90, 90))
    id_img = Image.fromarray(ids, "L").transform((w, h), Image.PERSPECTIVE, coeffs, Image.NEAREST, fillcolor=0)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.SMOOTH)
    return img, np.asarray(id_img), fwd


def _in_frame_counts(ids: np.ndarray, fwd, size: tuple[int, int], n: int) -> np.ndarray:
    """Per instance id (0..n), its unwarped visible pixels whose centres the perspective warp (`fwd`: input ->
    output) keeps inside the frame. The warp moves the frame edges by up to 5 %: a container cut off there is as
    hidden as one behind another (counting before the warp labeled 5-pixel slivers at the edge as 87 % visible)."""
    w, h = size
    ys, xs = np.nonzero(ids)
    out = _apply_h(fwd, np.stack([xs + 0.5, ys + 0.5], axis=1).astype(np.float64))
    inside = (out[:, 0] >= 0) & (out[:, 0] < w) & (out[:, 1] >= 0) & (out[:, 1] < h)
    return np.bincount(ids[ys[inside], xs[inside]], minlength=n + 1)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def _split_of(i: int, n: int, fractions: tuple[float, float, float]) -> str:
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    n_train = n - n_val - n_test
    return "train" if i < n_train else ("val" if i < n_train + n_val else "test")


def generate_shelves(
    out_dir,
    n_photos: int,
    *,
    seed: int = 0,
    n_skus: int = 24,
    size: tuple[int, int] = (640, 480),
    min_visible: float = MIN_VISIBLE,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    crops: bool = True,
    jpeg_quality: tuple[int, int] = (70, 92),
    rows: tuple[int, ...] = (2, 3, 3, 4),
) -> dict:
    """Write n_photos shelf photos with their boxes and counts to out_dir (layout in the module docstring) and
    return a summary {"photos", "boxes", "hidden", "skus", "splits": {split: photos}, "classes"}.

    size = (width, height) in pixels; rows: the shelf-row counts a photo draws from (fewer rows = larger
    containers). Photos are split in order: the first ~70 % train, then val, then test (each
    of val/test gets at least one photo when n_photos >= 3). Same arguments -> byte-identical files."""
    if n_photos < 1:
        raise ValueError(f"n_photos must be >= 1, got {n_photos}")
    w, h = int(size[0]), int(size[1])
    if w < 64 or h < 64:
        raise ValueError(f"size must be at least 64 x 64, got {size}")
    if not 0.0 < min_visible <= 1.0:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    if not rows or not all(isinstance(r, int) and 1 <= r <= 8 for r in rows):
        raise ValueError(f"rows must be a non-empty list of row counts in 1..8, got {rows!r}")
    out = Path(out_dir)
    skus = make_skus(n_skus, seed)
    sprites = [_sprite(s) for s in skus]
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(CONTAINER_CLASSES) + "\n", encoding="utf-8")
    (out / "skus.json").write_text(json.dumps([s.to_json() for s in skus], indent=1) + "\n", encoding="utf-8")
    photos = []
    n_boxes = n_hidden = 0
    per_split = dict.fromkeys(SPLITS, 0)
    for i in range(n_photos):
        rng = random.Random(f"shelf-{seed}-{i}")
        split = _split_of(i, n_photos, splits)
        per_split[split] += 1
        stem = f"shelf_{i:05d}"
        img, flat_ids, inst = _render_photo(skus, sprites, rng, (w, h), tuple(rows))
        img, ids, fwd = _finish(img, flat_ids, rng, (w, h))
        visible_px = _in_frame_counts(flat_ids, fwd, (w, h), len(inst))
        data = _jpeg(img, rng.randint(*jpeg_quality))
        (out / "images" / split / f"{stem}.jpg").write_bytes(data)
        boxes, hidden = _boxes(ids, inst, visible_px, fwd, skus, (w, h), min_visible)
        n_boxes += len(boxes)
        n_hidden += len(hidden)
        lines = []
        for b in boxes:
            x, y, bw, bh = b["box"]
            cls = CONTAINER_CLASSES.index(b["class"])
            lines.append(f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        (out / "labels" / split / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")
        if crops and boxes:
            decoded = Image.open(io.BytesIO(data)).convert("RGB")
            for k, b in enumerate(boxes):
                x, y, bw, bh = b["box"]
                folder = out / "crops" / split / b["sku"]
                folder.mkdir(parents=True, exist_ok=True)
                crop = crop_box(decoded, (x, y, bw, bh))  # cut as the shelf endpoint cuts a detected box
                (folder / f"{stem}_{k:03d}.jpg").write_bytes(_jpeg(crop, 90))
        counts: dict[str, int] = {}
        for b in boxes:
            counts[b["sku"]] = counts.get(b["sku"], 0) + 1
        photos.append(
            {
                "image": f"images/{split}/{stem}.jpg",
                "label_file": f"labels/{split}/{stem}.txt",
                "split": split,
                "width": w,
                "height": h,
                "boxes": boxes,
                "hidden": hidden,
                "counts": dict(sorted(counts.items())),
            }
        )
    meta = {
        "format": "loupe-shelves-v1",
        "seed": seed,
        "size": [w, h],
        "min_visible": min_visible,
        "classes": CONTAINER_CLASSES,
        "box_format": "xywh pixels, top-left origin; box = visible extent, full_box = whole object",
        "photos": photos,
    }
    (out / "shelves.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return {
        "photos": n_photos,
        "boxes": n_boxes,
        "hidden": n_hidden,
        "skus": len(skus),
        "splits": per_split,
        "classes": list(CONTAINER_CLASSES),
    }


def _boxes(ids, inst, visible_px, fwd, skus, size, min_visible) -> tuple[list[dict], list[dict]]:
    """The labeled boxes (visible >= min_visible) and the hidden instances of one photo, in drawing order."""
    w, h = size
    # tight boxes of every id's visible pixels in the warped map
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    starts = np.searchsorted(sorted_ids, np.arange(len(inst) + 2))
    boxes, hidden = [], []
    for k, it in enumerate(inst, start=1):
        sku = skus[it["sku"]]
        visible = float(visible_px[k]) / max(1, it["pixels"])
        x0, y0, x1, y1 = it["full"]
        corners = _apply_h(fwd, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64))
        fx0, fy0 = np.clip(corners.min(axis=0), 0, [w, h])
        fx1, fy1 = np.clip(corners.max(axis=0), 0, [w, h])
        full_box = [int(round(fx0)), int(round(fy0)), int(round(fx1 - fx0)), int(round(fy1 - fy0))]
        entry = {"class": sku.container, "sku": sku.name, "visible": round(min(1.0, visible), 4), "full_box": full_box}
        pix = order[starts[k] : starts[k + 1]]
        if visible < min_visible or len(pix) < 16:
            hidden.append(entry)
            continue
        py, px = np.divmod(pix, w)
        bx0, by0, bx1, by1 = int(px.min()), int(py.min()), int(px.max()) + 1, int(py.max()) + 1
        if bx1 - bx0 < 3 or by1 - by0 < 3:
            hidden.append(entry)
            continue
        boxes.append({**entry, "box": [bx0, by0, bx1 - bx0, by1 - by0], "layer": it["layer"]})
    return boxes, hidden


# ----------------------------------------------------------------------------------------------- readers
def read_yolo_labels(path) -> list[tuple[int, float, float, float, float]]:
    """[(class id, xc, yc, w, h)] of a YOLO label file (normalised floats); ValueError naming the bad line."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 5:
            raise ValueError(f"{path}:{n}: expected 'class xc yc w h', got {line!r}")
        cls, *vals = parts
        rows.append((int(cls), *(float(v) for v in vals)))
    return rows


def detection_manifest(out_dir, *, splits: tuple[str, ...] = SPLITS) -> dict:
    """The detector engine's manifest for a generated shelf set: {"classes": CONTAINER_CLASSES, "items": [{"path",
    "split", "boxes": [[x, y, w, h, class], ...], "counts"}]} (absolute paths, visible-extent boxes)."""
    out = Path(out_dir).resolve()
    meta = json.loads((out / "shelves.json").read_text(encoding="utf-8"))
    items = [
        {
            "path": str(out / p["image"]),
            "split": p["split"],
            "boxes": [[*b["box"], b["class"]] for b in p["boxes"]],
            "counts": p["counts"],
        }
        for p in meta["photos"]
        if p["split"] in splits
    ]
    return {"classes": list(meta["classes"]), "items": items}
