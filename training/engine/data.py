"""Image loading, transforms and the dataset used by training (and, for the eval transform and the
reduced-size file loader, by inference)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .manifest import Item

log = logging.getLogger("training.engine")

EVAL_RESIZE_RATIO = 1.14  # resize to image_size * 1.14, then centre-crop image_size
# How a photo becomes the square the network sees (config key `resize`): "crop" = resize the shorter side, then
# centre-crop (the ImageNet habit: the ends of a long photo are cut off); "fit" = the whole photo scaled into the
# square, the rest padded with PAD_FILL (letterbox: nothing cut off, for tall or wide crops such as a shelf's
# bottles, whose caps and feet a centre crop would lose).
RESIZE_MODES = ("crop", "fit")
PAD_FILL = (128, 128, 128)  # mid-grey: ~0 after the lite backbones' normalisation (mean 0.5)
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


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    return resize


def resize_mode(config: dict) -> str:
    """The framing of a config — a run's, a partial one, or a model artifact's from before resize modes existed
    (no key: "crop")."""
    return check_resize(config.get("resize", "crop"))


class CenterCropResize:
    """Resize (bicubic) so the shorter side is image_size * ratio, then centre-crop image_size — computed as one
    PIL resize of the crop's source box straight to image_size x image_size. Same geometry as torchvision's
    Resize + CenterCrop (pixels within 2 grey levels), 3x faster (only the kept pixels are resampled): it is on
    every served request and every evaluation. dx, dy move the crop off the centre by that fraction of the margin
    either side (ViewCrop); mirror flips the result.

    resize="fit": the photo is first scaled whole into a square (ImageOps.pad: longer side = the square's side,
    PAD_FILL around) whose side is image_size * ratio / EVAL_RESIZE_RATIO — image_size itself for the centre
    view, so nothing is cut off — and views crop that square as above."""

    def __init__(
        self,
        image_size: int,
        ratio: float = EVAL_RESIZE_RATIO,
        dx: float = 0.0,
        dy: float = 0.0,
        resize: str = "crop",
    ):
        self.size = int(image_size)
        self.resize = check_resize(resize)
        self.short = draft_size(self.size, ratio if resize == "crop" else ratio / EVAL_RESIZE_RATIO)
        self.dx, self.dy, self.mirror = dx, dy, False

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.resize == "fit":
            return self._fit(img)
        w, h = img.size
        if w <= h:  # torchvision's Resize(int): the shorter side to `short`, the longer side truncated
            nw, nh = self.short, int(self.short * h / w)
        else:
            nw, nh = int(self.short * w / h), self.short
        c = self.size
        # torchvision's CenterCrop offsets when dx = dy = 0
        top, left = int(round((nh - c) / 2.0 * (1 + self.dy))), int(round((nw - c) / 2.0 * (1 + self.dx)))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        out = img.resize((c, c), Image.Resampling.BICUBIC, box=box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.mirror else out

    def _fit(self, img: Image.Image) -> Image.Image:
        s, c = self.short, self.size
        out = ImageOps.pad(img, (s, s), method=Image.Resampling.BICUBIC, color=PAD_FILL)
        if s != c:
            top, left = int(round((s - c) / 2.0 * (1 + self.dy))), int(round((s - c) / 2.0 * (1 + self.dx)))
            out = out.crop((left, top, left + c, top + c))
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.mirror else out

    def __repr__(self) -> str:
        fit = "" if self.resize == "crop" else ", resize=fit"
        return f"CenterCropResize(size={self.size}, short={self.short}{fit}, interpolation=bicubic)"


def eval_transform(image_size: int, resize: str = "crop") -> T.Compose:
    """Resize (bicubic) to image_size*1.14, centre-crop image_size -> uint8 HWC tensor; resize="fit": the whole
    photo scaled into image_size x image_size, padded (see CenterCropResize)."""
    return T.Compose([CenterCropResize(image_size, resize=resize), ToUint8HWC()])


class PadToSquare:
    """Pad a photo to a square with PAD_FILL, the photo centred (the training side of resize="fit": the random
    crop then samples the padded square, as serving sees it)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w == h:
            return img
        s = max(w, h)
        out = Image.new("RGB", (s, s), PAD_FILL)
        out.paste(img, ((s - w) // 2, (s - h) // 2))
        return out

    def __repr__(self) -> str:
        return "PadToSquare()"


# Fixed views of a photo for cached features (features.py, the quick retrain's train photos): name -> (shorter side
# as a multiple of image_size, horizontal and vertical offset of the crop as a fraction of the margin either side of
# the centre, mirrored). "centre" is the eval transform. Deterministic, so each view's features are cached like the
# centre's: a quick retrain sees the photo zoomed in and shifted (and mirrored where the recipe flips) without a
# forward pass per epoch.
VIEWS = {
    "centre": (EVAL_RESIZE_RATIO, 0.0, 0.0, False),
    "mirror": (EVAL_RESIZE_RATIO, 0.0, 0.0, True),
    "zoom": (1.35, 0.0, 0.0, False),
    "left": (EVAL_RESIZE_RATIO * 1.15, -0.8, 0.0, False),
    "right": (EVAL_RESIZE_RATIO * 1.15, 0.8, 0.0, False),
    "up": (EVAL_RESIZE_RATIO * 1.15, 0.0, -0.8, False),
    "down": (EVAL_RESIZE_RATIO * 1.15, 0.0, 0.8, False),
}


class ViewCrop(CenterCropResize):
    """One of VIEWS (CenterCropResize with the view's ratio, offsets and mirroring)."""

    def __init__(self, image_size: int, view: str, resize: str = "crop"):
        ratio, dx, dy, mirror = VIEWS[view]
        super().__init__(image_size, ratio, dx, dy, resize=resize)
        self.mirror, self.view = mirror, view

    def __repr__(self) -> str:
        fit = "" if self.resize == "crop" else ", resize=fit"
        return f"ViewCrop(size={self.size}, view={self.view}{fit})"


def view_transform(image_size: int, view: str, resize: str = "crop") -> T.Compose:
    """The eval transform for "centre", else ViewCrop -> uint8 HWC tensor. KeyError for an unknown view."""
    if view == "centre":
        return eval_transform(image_size, resize)
    return T.Compose([ViewCrop(image_size, view, resize), ToUint8HWC()])


# ---- training augmentation presets
#
# Config keys (merged into the training config by config.py; every key is optional here, see AUG_DEFAULTS):
#   augment    "none" | "light" | "standard" (default) | "strong"
#   blur_prob  probability of a Gaussian blur (PIL, after the crop); null = the preset's default
#   noise_std  max std of additive Gaussian pixel noise, as a fraction of 255; null = the preset's default
#   vflip      random vertical flip (default false: photos have an "up", and it is rarely label-preserving)
# plus the existing keys image_size, crop_scale_min, hflip, rotation_degrees and color_jitter.
#
#   preset    crop scale                    flips         rotation          colour jitter (never hue)       blur  noise
#   none      resize + centre crop (= eval_transform: deterministic, every other augmentation key is ignored)
#   light     (max(crop_scale_min, .8), 1)  hflip, vflip  -                 b/c/s color_jitter / 2        0     0
#   standard  (crop_scale_min, 1)           hflip, vflip  rotation_degrees  b/c/s color_jitter            0     0
#   strong    (crop_scale_min, 1)           hflip, vflip  rotation_degrees  b/c 1.5x, s 1x color_jitter     0.2   0.03
# (hflip / vflip only when those keys are true; blur and noise columns are the defaults of blur_prob / noise_std.)
#
# All resizes are bicubic (the small rotation after the crop is bilinear: cheaper, same result). Pixel noise is
# added to the uint8 HWC tensor (int16 arithmetic, clamped to 0..255): the batch stays uint8 until
# normalize_batch, so workers never convert images to float. "standard" with the default keys is the transform
# used before presets existed.

AUG_PRESETS = ("none", "light", "standard", "strong")
AUG_DEFAULTS: dict = {"augment": "standard", "blur_prob": None, "noise_std": None, "vflip": False}
_PRESET_BLUR = {"none": 0.0, "light": 0.0, "standard": 0.0, "strong": 0.2}
_PRESET_NOISE = {"none": 0.0, "light": 0.0, "standard": 0.0, "strong": 0.03}
MAX_NOISE_STD = 0.5


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_aug_config(cfg: dict) -> None:
    """Check the augmentation keys of `cfg` (missing keys take AUG_DEFAULTS); ValueError names the key."""
    augment = cfg.get("augment", AUG_DEFAULTS["augment"])
    if augment not in AUG_PRESETS:
        raise ValueError(f"config 'augment': expected one of {', '.join(map(repr, AUG_PRESETS))}, got {augment!r}")
    blur = cfg.get("blur_prob", AUG_DEFAULTS["blur_prob"])
    if blur is not None and not (_is_num(blur) and 0 <= blur <= 1):
        raise ValueError(f"config 'blur_prob': expected null (preset default) or a number in [0, 1], got {blur!r}")
    noise = cfg.get("noise_std", AUG_DEFAULTS["noise_std"])
    if noise is not None and not (_is_num(noise) and 0 <= noise <= MAX_NOISE_STD):
        raise ValueError(
            f"config 'noise_std': expected null (preset default) or a number in [0, {MAX_NOISE_STD}] "
            f"(fraction of the 0..255 range, e.g. 0.03), got {noise!r}"
        )
    vflip = cfg.get("vflip", AUG_DEFAULTS["vflip"])
    if not isinstance(vflip, bool):
        raise ValueError(f"config 'vflip': expected true or false, got {vflip!r}")


class RandomGaussianBlur:
    """With probability p, blur a PIL image with a Gaussian of radius uniform in [sigma_min, sigma_max] (PIL's
    C filter: much cheaper than torchvision's GaussianBlur, which round-trips PIL images through tensors)."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p = float(p)
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(1).item() >= self.p:
            return img
        lo, hi = self.sigma
        radius = lo + (hi - lo) * torch.rand(1).item()
        return img.filter(ImageFilter.GaussianBlur(radius))

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, sigma=({self.sigma[0]:.2f}, {self.sigma[1]:.2f}))"


class AddGaussianNoiseUint8:
    """uint8 HWC tensor -> uint8 HWC tensor + Gaussian noise of std uniform in [0, max_std] x 255 (per image),
    rounded and clamped to 0..255. Works on the output of ToUint8HWC, so the pipeline stays uint8. The noise is
    luminance noise (one value per pixel, shared by the channels): it does not shift colours, which are labels,
    and costs a third of per-channel noise."""

    def __init__(self, max_std: float):
        self.max_std = float(max_std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_std <= 0:
            return x
        std = torch.rand(1).item() * self.max_std * 255.0
        if std < 0.5:  # would round to no change anyway
            return x
        noise = torch.randn(*x.shape[:-1], 1).mul_(std).round_().to(torch.int16)  # one value for all channels
        return (noise + x).clamp_(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        return f"AddGaussianNoiseUint8(max_std={self.max_std})"


def train_transform(config: dict) -> T.Compose:
    """Training transform for the preset config.get("augment", "standard") (table above) -> uint8 HWC tensor.

    Uses image_size, resize, crop_scale_min, hflip, rotation_degrees and color_jitter, plus the optional keys of
    AUG_DEFAULTS (blur_prob, noise_std, vflip). Raises ValueError on a bad augmentation key."""
    validate_aug_config(config)
    size = config["image_size"]
    resize = resize_mode(config)
    preset = config.get("augment", AUG_DEFAULTS["augment"])
    if preset == "none":
        return eval_transform(size, resize)
    bicubic = InterpolationMode.BICUBIC
    scale_min = config["crop_scale_min"]
    if preset == "light":
        scale_min = max(scale_min, 0.8)
    steps: list = [PadToSquare()] if resize == "fit" else []
    steps.append(T.RandomResizedCrop(size, scale=(scale_min, 1.0), interpolation=bicubic))
    if config["hflip"]:
        steps.append(T.RandomHorizontalFlip())
    if config.get("vflip", False):
        steps.append(T.RandomVerticalFlip())
    if preset != "light" and config["rotation_degrees"] > 0:
        # bilinear on purpose: at the final size a bicubic rotation costs ~20% of loader throughput for no gain
        steps.append(T.RandomRotation(config["rotation_degrees"], interpolation=InterpolationMode.BILINEAR))
    cj = config["color_jitter"]
    if preset == "light":
        bc, sat = cj / 2, cj / 2
    elif preset == "strong":
        bc, sat = min(cj * 1.5, 0.9), cj
    else:
        bc, sat = cj, cj
    if bc > 0 or sat > 0:
        steps.append(T.ColorJitter(brightness=bc, contrast=bc, saturation=sat, hue=0.0))  # hue=0: colour labels
    blur = config.get("blur_prob")
    blur = _PRESET_BLUR[preset] if blur is None else blur
    if blur > 0:
        steps.append(RandomGaussianBlur(blur, sigma=(0.1, max(0.5, size / 100.0))))
    steps.append(ToUint8HWC())
    noise = config.get("noise_std")
    noise = _PRESET_NOISE[preset] if noise is None else noise
    if noise > 0:
        steps.append(AddGaussianNoiseUint8(noise))
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
