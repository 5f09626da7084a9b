"""Loupe training engine (pure Python, no Django).

Public API::

    DEFAULT_CONFIG: dict
    resolve_config(overrides: dict | None) -> dict
    train_model(manifest: dict, config: dict | None, out_dir, *, progress=None) -> dict

`train_model` (and torch/timm) are imported lazily so that `resolve_config` stays cheap to import.
"""

from .config import DEFAULT_CONFIG, resolve_config
from .manifest import parse_manifest

__all__ = ["DEFAULT_CONFIG", "resolve_config", "train_model", "parse_manifest"]


def train_model(manifest, config, out_dir, *, progress=None):
    from .loop import train_model as _train_model  # noqa: PLC0415 - heavy imports (torch, timm) on demand

    return _train_model(manifest, config, out_dir, progress=progress)


train_model.__doc__ = """Train on the manifest's "train" split; see training.engine.loop.train_model."""
