"""Tiny synthetic data sets (coloured shapes on light backgrounds) for tests and demos; no torch import.

manifest = make_shapes_dataset(tmp_path, n=40)
train_model(manifest, {**TINY_TEST_CONFIG}, tmp_path / "run")   # a few seconds on a laptop CPU
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (225, 25, 25), "blue": (25, 50, 225), "green": (30, 170, 60)}
SHAPES = ("square", "circle", "triangle")

# A config that trains in seconds on 2 CPU cores (timm's tiny "test_resnet" backbone; random init).
TINY_TEST_CONFIG = {
    "backbone": "test_resnet",
    "image_size": 32,
    "epochs": 2,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_epochs": 0.5,
    "num_workers": 0,
    "device": "cpu",
}


def draw_shape(shape: str, color: str, size: int = 48, rnd: random.Random | None = None) -> Image.Image:
    rnd = rnd or random.Random(0)
    bg = tuple(rnd.randint(190, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rnd.uniform(0.25, 0.4) * size
    cx, cy = rnd.uniform(r, size - r), rnd.uniform(r, size - r)
    fill = COLORS[color]
    if shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_shapes_dataset(
    root,
    n: int = 40,
    *,
    size: int = 48,
    colors=("red", "blue"),
    shapes=("square", "circle"),
    val_every: int = 4,
    seed: int = 0,
    fmt: str = "PNG",
) -> dict:
    """Write n images under root and return a Loupe manifest with heads "shape" and "color".

    Item i gets colour colors[i % len(colors)] and a random shape; every `val_every`-th item is "val"
    (val_every=0: none), the rest "train". Ids are 1..n; groups are "g<id>"."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    items = []
    for i in range(n):
        color = colors[i % len(colors)]
        shape = rnd.choice(list(shapes))
        path = root / f"img_{i:04d}.{ext}"
        draw_shape(shape, color, size, rnd).save(path, fmt)
        split = "val" if val_every and i % val_every == val_every - 1 else "train"
        items.append(
            {
                "id": i + 1,
                "path": str(path),
                "labels": {"shape": shape, "color": color},
                "group": f"g{i + 1}",
                "source": "synthetic",
                "split": split,
            }
        )
    return {
        "heads": [
            {"name": "shape", "classes": list(shapes), "parent": None},
            {"name": "color", "classes": list(colors), "parent": None},
        ],
        "items": items,
    }
