"""Loupe training engine (pure Python, no Django).

Public API::

    DEFAULT_CONFIG: dict
    resolve_config(overrides: dict | None) -> dict            # unknown key / bad value -> ValueError
    train_model(manifest: dict, config: dict | None, out_dir, *, progress=None, resume=True, fresh=False,
                cache_dir=None) -> dict
    parse_manifest(manifest: dict) -> ParsedManifest          # the validation train_model runs first

Output of train_model in out_dir: model.pt, label_maps.json, metrics.json, config.json (each written to a
temp name, then os.replace), and checkpoints/ (latest.pt every epoch, best.pt, epoch-NNN.pt every
config["checkpoint_every"] epochs) from which a later call with the same manifest and config resumes.
torch/timm are imported lazily, on the first train_model call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import DEFAULT_CONFIG, resolve_config
from .manifest import parse_manifest

__all__ = ["DEFAULT_CONFIG", "resolve_config", "train_model", "parse_manifest"]


def train_model(
    manifest: dict,
    config: dict | None,
    out_dir: str | Path,
    *,
    progress: Callable[[dict], None] | None = None,
    resume: bool = True,
    fresh: bool = False,
    cache_dir: str | Path | None = None,
) -> dict:
    """Train on the manifest's "train" items, pick the best epoch on "val" (never reads "test"), write the
    artifacts into out_dir and return the metrics dict (also written as metrics.json).

    Raises ValueError (message for a person) for a bad manifest/config before training. An exception raised
    by `progress` aborts training and propagates (use it to cancel); no artifact is written then, but the
    checkpoints of the epochs already finished are kept. resume=True (default) continues from
    out_dir/checkpoints/latest.pt when it was written for the same manifest and config (same final result as
    an uninterrupted run); fresh=True deletes the checkpoints and starts over. cache_dir (a feature cache):
    phase 1 of a fully frozen pretrained backbone trains the heads on cached features instead of the photos.
    See training.engine.loop.train_model for details."""
    from .loop import train_model as _train_model  # noqa: PLC0415 - torch/timm only when training

    return _train_model(manifest, config, out_dir, progress=progress, resume=resume, fresh=fresh, cache_dir=cache_dir)
