"""Phase 1 on cached features: when phase 1 freezes the whole pretrained backbone, its features do not change
during phase 1, so the heads train on cached features of the photos (the quick retrain's train_heads, seconds once
the cache is warm) instead of freeze_backbone_epochs epochs of backbone passes over augmented photos."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from . import quick
from .epoch import no_readable_train_images
from .features import cached_features
from .manifest import ParsedManifest

log = logging.getLogger("training.engine")


def heads_on_cached_features(
    model,
    parsed: ParsedManifest,
    cfg: dict,
    feature_items: list[dict],
    cache_dir,
    skipped: dict[str, str],
    progress: Callable[[dict], None] | None,
) -> tuple[dict, dict, int]:
    """Train the model's heads on cached features of the train split (best epoch on val) and load them into the
    model. Images whose features cannot be computed are added to `skipped`. Returns (train_heads' fit, the phase-1
    summary for metrics["phase1"], images trained on summed over its epochs)."""
    t_p1 = time.monotonic()
    feats = cached_features(feature_items, cfg, cache_dir, progress=progress)
    p1_items = parsed.train + parsed.val
    n_train = len(parsed.train)
    Y = np.array([it.targets for it in p1_items], dtype=np.int64).reshape(len(p1_items), len(parsed.head_names))
    is_train = np.arange(len(p1_items)) < n_train
    tr, va = feats.ok & is_train, feats.ok & ~is_train
    for it, ok in zip(p1_items, feats.ok, strict=True):
        if not ok and it.path not in skipped:
            skipped[it.path] = "cannot be read (feature cache)"
            log.warning("skipping unreadable image %s", it.path)
    if not tr.any():
        raise no_readable_train_images(n_train, skipped)
    # The ArcFace margin stays at its warm-up value for all of phase 1, as on the photos.
    fit = quick.train_heads(
        feats.X[tr],
        Y[tr],
        feats.X[va],
        Y[va],
        parsed.heads,
        {**cfg, "arcface_margin": cfg["arcface_warmup_margin"]},
    )
    missing, unexpected = model.load_state_dict(fit["state_dict"], strict=False)
    if unexpected or any(not k.startswith("backbone.") for k in missing):
        raise RuntimeError(f"phase-1 heads do not fit the model: missing {missing}, unexpected {unexpected}")
    summary = {
        "on": "feature-cache",
        "seconds": round(time.monotonic() - t_p1, 3),
        "epochs": len(fit["history"]),
        "best_epoch": fit["best"]["epoch"],
        "replaces_epochs": cfg["freeze_backbone_epochs"],
        "cache": {k: feats.stats[k] for k in ("hits", "misses", "failed", "seconds")},
    }
    return fit, summary, int(tr.sum()) * len(fit["history"])
