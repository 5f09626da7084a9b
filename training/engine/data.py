"""Image loading, transforms and the dataset used by training (and, for the eval transform and the
reduced-size file loader, by inference)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .manifest import Item

log = logging.getLogger("training.engine")

EVAL_RESIZE_RATIO = 1.14  # resize to image_size * 1.14, then centre-crop image_size
TRAIN_DECODE_RATIO = 1.5  # JPEG draft target for training: leaves room for RandomResizedCrop


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert to RGB; transparent pixels are composited onto white.
    Always returns a new image, so the source (and its file) can be closed."""
    src = img
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img.copy() if img is src else img


def draft_size(image_size: int, ratio: float = EVAL_RESIZE_RATIO) -> int:
    return int(math.ceil(image_size * ratio))


def load_image_file(path: str, min_side: int | None = None) -> Image.Image:
    """Open an image file as RGB. For JPEGs, `min_side` lets libjpeg decode at a reduced scale (1/2, 1/4,
    1/8) while keeping both sides >= min_side. Raises OSError/ValueError (PIL's) on unreadable files."""
    with Image.open(path) as img:
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        return to_rgb(img)


class ToUint8HWC:
    """PIL RGB -> uint8 tensor (H, W, 3). Float conversion and normalisation happen per batch (see
    normalize_batch): per-sample torch ops are slow when run in the main process with several threads, and
    uint8 batches are 4x cheaper to move to the GPU."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))

    def __repr__(self) -> str:
        return "ToUint8HWC()"


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) normalised, in channels_last memory layout."""
    mean_t = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    x = x.permute(0, 3, 1, 2).float()
    return (x - mean_t) / std_t


def eval_transform(image_size: int) -> T.Compose:
    """Resize (bicubic) to image_size*1.14, centre-crop image_size -> uint8 HWC tensor."""
    return T.Compose(
        [
            T.Resize(draft_size(image_size), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            ToUint8HWC(),
        ]
    )


def train_transform(config: dict) -> T.Compose:
    """RandomResizedCrop (bicubic) + optional hflip / rotation / colour jitter (never hue) -> uint8 HWC."""
    size = config["image_size"]
    steps: list = [
        T.RandomResizedCrop(size, scale=(config["crop_scale_min"], 1.0), interpolation=InterpolationMode.BICUBIC)
    ]
    if config["hflip"]:
        steps.append(T.RandomHorizontalFlip())
    if config["rotation_degrees"] > 0:
        steps.append(T.RandomRotation(config["rotation_degrees"], interpolation=InterpolationMode.BILINEAR))
    cj = config["color_jitter"]
    if cj > 0:
        steps.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=0.0))  # hue=0: colour labels
    steps.append(ToUint8HWC())
    return T.Compose(steps)


class ManifestDataset(Dataset):
    """Items -> (image tensor, targets (H,) int64, index). An unreadable file yields (None, None, index, error)
    so that the collate function can drop it instead of crashing the epoch."""

    def __init__(self, items: Sequence[Item], transform, min_side: int | None):
        self.items = list(items)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            img = load_image_file(item.path, self.min_side)
            x = self.transform(img)
        except Exception as exc:  # noqa: BLE001 - any decode failure must only skip this file
            return None, None, index, f"{type(exc).__name__}: {exc}"
        return x, torch.tensor(item.targets, dtype=torch.long), index, None


def collate_skip(batch):
    """Stack the readable samples; return (x or None, y or None, indices, [(index, error), ...])."""
    good = [b for b in batch if b[0] is not None]
    bad = [(b[2], b[3]) for b in batch if b[0] is None]
    if not good:
        return None, None, [], bad
    x = torch.stack([b[0] for b in good])
    y = torch.stack([b[1] for b in good])
    return x, y, [b[2] for b in good], bad
