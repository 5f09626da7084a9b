"""The health scan's similarity features (labeling.health, settings.LOUPE_SIMILARITY_EMBEDDER points here): every
readable photo embedded with the pretrained similarity backbone through the shared feature cache (the same
features the quick retrain reads). The scan lives in labeling, the engine above it; the scan reaches this function
through the setting, so labeling never imports the engine."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings

from training.engine.config import resolve_config
from training.engine.features import cached_features
from training.engine.model import backbone_stats, create_backbone


def embed(items: list[dict], progress: Callable[[int, int], None]) -> dict:
    """items: [{"path", "sha256"}]. Returns {"base": {backbone, image_size, pretrained_source}, "X": (N, D) float32
    or None, "ok": (N,) bool or None, "reason": why there are no features (no pretrained weights), "cache":
    {hits, misses, failed}}."""
    size = settings.LOUPE_SIMILARITY_IMAGE_SIZE
    cfg = resolve_config({"backbone": settings.LOUPE_SIMILARITY_BACKBONE, "pretrained": True, "image_size": size})
    backbone, weights = create_backbone(cfg["backbone"], image_size=size, pretrained=True)
    base = {"backbone": cfg["backbone"], "image_size": size, "pretrained_source": weights["source"]}
    if weights["source"] == "none":
        reason = (
            f"no pretrained weights for {cfg['backbone']} ({weights['detail']}): freezes merge near-duplicates only"
        )
        return {"base": base, "X": None, "ok": None, "reason": reason, "cache": {}}
    _dim, mean, std = backbone_stats(backbone, size)
    feats = cached_features(
        items,
        cfg,
        settings.LOUPE_FEATURE_CACHE,
        backbone=backbone,
        mean=mean,
        std=std,
        progress=lambda p: progress(p["done"], p["total"]),
    )
    cache = {k: feats.stats[k] for k in ("hits", "misses", "failed")}
    return {"base": base, "X": feats.X, "ok": feats.ok, "reason": None, "cache": cache}
