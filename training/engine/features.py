"""Frozen-backbone feature cache: pooled backbone features per image, on disk, keyed by (image content sha256,
backbone, preprocessing), so that heads retrain in seconds once the cache is warm (quick.py) and the review
queues refresh without full forward passes.

Layout: <cache_dir>/<model key>/<sha[:2]>/<sha>.npy, one float32 (D,) vector per image, each written whole
(temp name + os.replace), and <cache_dir>/<model key>/key.json saying what the key stands for. The model key is
a hash of: the timm backbone name, a fingerprint of its weights (sha256 of the whole state dict, buffers
included: the same weights give the same key whatever file or hub they came from, and a fine-tuned backbone gets
its own key), the timm version, and the preprocessing (image size, resize/crop ratio, interpolation, mean/std,
views). The features are exactly what LoupeNet's heads see in eval mode (the validation transform: bicubic
resize to 1.14 x image_size, centre crop; one view, no flip averaging), so heads trained on them predict the
same through a Recognizer loaded from the artifact.

Pure: no Django. torch/timm are imported by the functions that need them."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("training.engine")

CACHE_FORMAT = "loupe-features-v1"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Features:
    """X: (N, D) float32 pooled backbone features in item order (zeros where not ok); ok: (N,) bool (False for
    unreadable files); stats: {"hits", "misses", "failed", "seconds", "key"}; weights: {"source", "detail"} of the
    backbone (None when a backbone module was passed in)."""

    X: np.ndarray
    ok: np.ndarray
    stats: dict
    weights: dict | None = None
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


def item_sha256(item: dict) -> str:
    """The image's content sha256: the manifest's "sha256", else a content-addressed file name
    (<sha256>.<ext>), else the hash of the file's bytes."""
    sha = item.get("sha256")
    if isinstance(sha, str) and _SHA_RE.match(sha.lower()):
        return sha.lower()
    stem = Path(item["path"]).stem.lower()
    if _SHA_RE.match(stem):
        return stem
    h = hashlib.sha256()
    with open(item["path"], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes and bytes, in name order)."""
    import torch  # noqa: PLC0415

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def preprocessing_key(
    image_size: int, mean: Sequence[float], std: Sequence[float], view: str = "centre", resize: str = "crop"
) -> dict:
    """What the pixels went through before the backbone (see data.eval_transform; another view than the centre
    crop adds its data.VIEWS spec, so the centre's key is the same as before views existed; likewise the "crop"
    resize's key is the same as before resize modes existed)."""
    from .data import EVAL_RESIZE_RATIO, PAD_FILL, VIEWS, check_resize  # noqa: PLC0415

    extra = {} if view == "centre" else {"view": [view, *VIEWS[view]]}
    if check_resize(resize) == "fit":
        how = f"whole photo padded to a square ({list(PAD_FILL)}), side x {EVAL_RESIZE_RATIO} / view ratio, crop"
    else:
        how = f"shorter side {EVAL_RESIZE_RATIO} x image_size, centre crop"
    return extra | {
        "image_size": int(image_size),
        "resize": how,
        "interpolation": "bicubic",
        "jpeg_draft": True,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "views": "single (no flip averaging)",
    }


def model_key(backbone_name: str, fingerprint: str, prep: dict) -> tuple[str, dict]:
    """(key, description) of a backbone + weights + preprocessing."""
    import timm  # noqa: PLC0415

    desc = {
        "format": CACHE_FORMAT,
        "backbone": backbone_name,
        "weights_sha256": fingerprint,
        "timm": str(timm.__version__),
        "preprocessing": prep,
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]
    return key, desc


def _write_atomic(path: Path, writer: Callable[[Path], None]) -> None:
    from .atomic import write_atomic  # noqa: PLC0415

    write_atomic(path, writer)


def _save_npy(path: Path, vec: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, vec)

    _write_atomic(path, write)


def _load_npy(path: Path, dim: int | None) -> np.ndarray | None:
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if vec.ndim != 1 or vec.dtype != np.float32 or (dim is not None and vec.shape[0] != dim):
        return None
    return vec


def feature_threads(value, num_workers: int, cpus: int | None = None) -> int:
    """Torch threads of the feature pass. "auto": every core not taken by a loader worker. Unlike training
    (runtime.resolve_torch_threads keeps a core free), the pass is short, inference only and usually alone on its
    worker: measured on 2 cores (lite0, 224 px, grocery photos), 2 threads took 16.5 s for 400 photos against 26.9 s
    with 1 on an idle machine, and 15.2 s against 12.2 s for 200 photos beside a process spinning on one core."""
    from .runtime import cpu_count  # noqa: PLC0415 - torch only when needed

    if value != "auto":
        return int(value)
    return max(1, (cpu_count() if cpus is None else cpus) - num_workers)


def cached_features(
    items: Sequence[dict],
    config: dict,
    cache_dir: str | Path,
    *,
    backbone=None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: Callable[[dict], None] | None = None,
    view: str = "centre",
) -> Features:
    """Pooled frozen-backbone features of manifest items ({"path"[, "sha256"]}) from the cache; only the misses
    are computed (eval mode, torch.inference_mode, batches, reduced-size JPEG decode) and written to it. `view`:
    one of data.VIEWS (the centre crop that inference sees by default; each view has its own cache key).

    The backbone is config's starting backbone (create_backbone: pretrained_path / hub / bundled / none), or the
    given module (e.g. a trained model's backbone; then mean/std must be given). progress gets {"phase":
    "features", "done", "total", "hits", "misses", "eta_s"} while misses are computed."""
    from .data import resize_mode  # noqa: PLC0415
    from .model import backbone_stats, create_backbone  # noqa: PLC0415

    t0 = time.monotonic()
    size = int(config["image_size"])
    weights = None
    if backbone is None:
        backbone, weights = create_backbone(
            config["backbone"],
            image_size=size,
            pretrained=config.get("pretrained", False),
            pretrained_path=config.get("pretrained_path"),
        )
        _dim, mean, std = backbone_stats(backbone, size)
    elif mean is None or std is None:
        raise ValueError("cached_features: pass mean and std with a backbone module")
    backbone.eval()
    if view not in _views():
        raise ValueError(f"unknown view {view!r} (views: {', '.join(_views())})")
    key, desc = model_key(
        config["backbone"],
        weights_fingerprint(backbone),
        preprocessing_key(size, mean, std, view, resize_mode(config)),
    )
    root = Path(cache_dir) / key
    if not (root / "key.json").exists():
        _write_atomic(root / "key.json", lambda tmp: tmp.write_text(json.dumps(desc, indent=1)))

    shas, vecs = _cached_vectors(items, root)
    misses = [i for i in range(len(items)) if vecs[i] is None]
    hits = len(items) - len(misses)
    failed = 0
    if misses:
        failed = _compute_misses(items, misses, shas, vecs, root, config, backbone, mean, std, hits, progress, view)
    X, ok = _stack_vectors(vecs, root)
    stats = {
        "hits": hits,
        "misses": len(misses),
        "failed": failed,
        "seconds": round(time.monotonic() - t0, 3),
        "key": key,
    }
    log.info(
        "feature cache %s: %d hits, %d computed, %d unreadable (%.1fs)",
        key,
        hits,
        len(misses),
        failed,
        stats["seconds"],
    )
    return Features(X=X, ok=ok, stats=stats, weights=weights, mean=list(mean), std=list(std))


def _cached_vectors(items: Sequence[dict], root: Path) -> tuple[list[str | None], list[np.ndarray | None]]:
    """(sha256 per item, None for an unreadable file; the cached vector per item, None for a miss)."""
    n = len(items)
    shas: list[str | None] = []
    for it in items:
        try:
            shas.append(item_sha256(it))
        except OSError:
            shas.append(None)  # unreadable file: computed (and failed) below
    vecs: list[np.ndarray | None] = [None] * n
    dim = None
    for i, sha in enumerate(shas):
        if sha is None:
            continue
        vec = _load_npy(root / sha[:2] / f"{sha}.npy", dim)
        if vec is not None:
            vecs[i] = vec
            dim = vec.shape[0]
    return shas, vecs


def _views() -> dict:
    from .data import VIEWS  # noqa: PLC0415

    return VIEWS


def _compute_misses(
    items, misses, shas, vecs, root: Path, config: dict, backbone, mean, std, hits: int, progress, view="centre"
):
    """The backbone's pooled features of the items at indexes `misses` (eval mode, torch.inference_mode, batches,
    reduced-size decode) into vecs and the cache (items with a sha256). Returns how many files were unreadable."""
    import torch  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from .data import (  # noqa: PLC0415
        VIEWS,
        ManifestDataset,
        collate_skip,
        draft_size,
        normalize_batch,
        resize_mode,
        view_transform,
    )
    from .manifest import Item  # noqa: PLC0415
    from .runtime import resolve_device, resolve_num_workers  # noqa: PLC0415

    size = int(config["image_size"])
    failed = 0
    device = resolve_device(config.get("device", "auto"))
    workers = resolve_num_workers(config.get("num_workers", "auto"))
    prev_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(feature_threads(config.get("torch_threads", "auto"), workers))
    backbone.to(device)
    ds = ManifestDataset(
        [Item(id=i, path=items[i]["path"], targets=(0,)) for i in misses],
        view_transform(size, view, resize_mode(config)),
        draft_size(size, VIEWS[view][0]),
    )
    loader = DataLoader(
        ds,
        batch_size=max(32, 2 * int(config.get("batch_size", 32))),
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=device.type == "cuda",
    )
    done, t_miss = 0, time.monotonic()
    try:
        with torch.inference_mode():
            for x, _y, idx, bad in loader:
                for j, err in bad:
                    log.warning("feature cache: cannot read %s: %s", items[misses[j]]["path"], err)
                failed += len(bad)
                done += len(bad)
                if x is None:
                    continue
                x = normalize_batch(x.to(device, non_blocking=True), mean, std)
                feats = backbone(x)
                if feats.ndim > 2:  # as LoupeNet.forward
                    feats = feats.flatten(2).mean(-1)
                feats = feats.float().cpu().numpy()
                for row, j in zip(feats, idx, strict=True):
                    i = misses[j]
                    vec = np.ascontiguousarray(row, dtype=np.float32)
                    vecs[i] = vec
                    if shas[i] is not None:
                        _save_npy(root / shas[i][:2] / f"{shas[i]}.npy", vec)
                done += len(idx)
                if progress is not None:
                    rate = (time.monotonic() - t_miss) / max(1, done)
                    progress(
                        {
                            "phase": "features",
                            "done": done,
                            "total": len(misses),
                            "hits": hits,
                            "misses": len(misses),
                            "eta_s": rate * (len(misses) - done),
                        }
                    )
    finally:
        torch.set_num_threads(prev_threads)
    return failed


def _stack_vectors(vecs: list, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X (N, D) float32, zeros where missing; ok (N,) bool). ValueError when the vectors differ in size."""
    n = len(vecs)
    dims = {v.shape[0] for v in vecs if v is not None}
    if len(dims) > 1:
        raise ValueError(f"feature cache {root}: vectors of different sizes {sorted(dims)}; delete the folder")
    d = dims.pop() if dims else 0
    X = np.zeros((n, d), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    for i, v in enumerate(vecs):
        if v is not None:
            X[i] = v
            ok[i] = True
    return X, ok
