"""Out-of-fold predicted probabilities for every labeled image (confident learning needs out-of-sample
probabilities): group-aware K-fold cross-validation over every labeled item of the manifest, test split included.
The fold models are throwaway (only their held-out predictions are kept) and the frozen test split is a reviewer's
business too: a wrong test label skews every reported number until someone finds it.

Each fold trains a fresh model on the other folds (modes full and cheap: with k >= 3 one further fold is held out of
training for best-epoch selection; the predicted fold is never seen, not even for model selection) and predicts the
held-out fold.
Mode "full" uses the given config; mode "cheap" trains each fold for `cheap_epoch_fraction` of the epochs
(default 0.3, at least 1) — about 3x cheaper, with somewhat noisier probabilities. Mode "quick" trains only the
heads of each fold (quick.train_heads, on all k-1 other folds, without label smoothing: _quick_folds) on cached
features of the frozen pretrained backbone (features.py): the features are computed once (or read from the
cache), then K head fits take seconds; it needs pretrained weights that resolve (quick.NoPretrainedBackbone
otherwise).

Output in out_dir: oof_predictions.npz (ids, fold, probs_<head>, targets_<head>) and oof_meta.json."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import write_atomic, write_json_atomic
from .manifest import IGNORE_INDEX, parse_manifest

log = logging.getLogger("training.engine")

MODES = ("full", "cheap", "quick")


def group_folds(items: list[dict], k: int, *, seed: int = 0) -> list[int]:
    """A fold number per item: groups never split across folds; groups are dealt largest first to the fold
    with the fewest images (ties by a stable hash), which keeps the folds close in size."""
    if k < 2:
        raise ValueError(f"k must be at least 2 folds, got {k}")
    sizes: dict[str, int] = defaultdict(int)
    for it in items:
        sizes[str(it.get("group", it.get("id")))] += 1
    if len(sizes) < k:
        raise ValueError(f"{len(sizes)} group(s) cannot fill {k} folds: use k <= {len(sizes)} or label more groups")

    def tiebreak(g: str) -> str:
        return hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()

    load = [0] * k
    fold_of: dict[str, int] = {}
    for g in sorted(sizes, key=lambda g: (-sizes[g], tiebreak(g))):
        f = min(range(k), key=lambda i: (load[i], i))
        fold_of[g] = f
        load[f] += sizes[g]
    return [fold_of[str(it.get("group", it.get("id")))] for it in items]


def tta_flips(config: dict) -> list[tuple[int, ...]]:
    """The views a fold model predicts and averages: the photo, plus its mirror images along the flips its
    training augmentation used (dims of an NCHW batch: 3 = horizontal, 2 = vertical). A model trained to be
    flip-invariant gives two noisy estimates of one answer; their mean ranks label issues better (grocery bench:
    top-N precision 0.788 -> 0.807 on the same fold models). No flips when augmentation is off or flips are
    disabled (mirror-image parts that are different classes)."""
    if config.get("augment") == "none":
        return [()]
    flips = [()]
    if config.get("hflip"):
        flips.append((3,))
    if config.get("vflip"):
        flips.append((2,))
    return flips


def _predict(artifact_dir: Path, items: list[dict], batch_size: int) -> dict[str, np.ndarray]:
    """Softmax probabilities per head of a trained fold model on manifest items (eval transform), averaged over
    the flip views of tta_flips."""
    import torch  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from .data import ManifestDataset, collate_skip, draft_size, eval_transform, normalize_batch, resize_mode  # noqa: PLC0415
    from .manifest import Item  # noqa: PLC0415
    from .model import build_model  # noqa: PLC0415

    ckpt = torch.load(artifact_dir / "model.pt", map_location="cpu", weights_only=True)
    model, _ = build_model(ckpt["config"], ckpt["heads"], load_weights=False)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    size = ckpt["config"]["image_size"]
    flips = tta_flips(ckpt["config"])
    heads = [h["name"] for h in ckpt["heads"]]
    ds = ManifestDataset(
        [Item(id=i, path=it["path"], targets=(0,) * len(heads)) for i, it in enumerate(items)],
        eval_transform(size, resize_mode(ckpt["config"])),
        min_side=draft_size(size),
    )
    out = {h["name"]: np.full((len(items), len(h["classes"])), np.nan, dtype=np.float32) for h in ckpt["heads"]}
    with torch.inference_mode():
        for x, _y, idx, _bad in DataLoader(ds, batch_size=batch_size, collate_fn=collate_skip):
            if x is None:
                continue
            x = normalize_batch(x, ckpt["mean"], ckpt["std"])
            views = [model(torch.flip(x, dims) if dims else x)[0] for dims in flips]
            for j, name in enumerate(heads):
                p = torch.stack([torch.softmax(v[j].float(), dim=1) for v in views]).mean(0)
                out[name][np.asarray(idx)] = p.numpy()
    return out


def out_of_fold_predictions(
    manifest: dict,
    config: dict | None,
    out_dir: str | Path,
    *,
    k: int = 5,
    mode: str = "full",
    cheap_epoch_fraction: float = 0.3,
    progress: Callable[[dict], None] | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Train k fold models and return {"k", "mode", "n", "heads": {head: {"top1", "n"}}, "path"}; files in out_dir.

    Every item with a known label on some head is predicted once, whatever its split (train, val or test):
    the folds ignore the manifest's splits. Unreadable images get NaN rows. cache_dir: the feature cache of
    mode "quick" (default out_dir/feature-cache)."""
    from . import resolve_config, train_model  # noqa: PLC0415

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = resolve_config(config)
    # the fold models only predict their held-out fold: no evaluation report or retrieval pass per fold
    cfg["eval_report"], cfg["eval_retrieval"] = False, False
    if mode == "cheap":
        cfg["epochs"] = max(1, int(round(cfg["epochs"] * cheap_epoch_fraction)))
    # the folds are the splits here: every item is pooled (as "train", so that parse_manifest validates and
    # indexes the test items' labels too)
    pooled = [{**it, "split": "train"} for it in manifest["items"]]
    parsed = parse_manifest({**manifest, "items": pooled})  # validates; class indices per head
    heads = parsed.heads
    items = pooled
    targets = {(it.id, it.path): it.targets for it in parsed.train}
    items = [it for it in items if any(t != IGNORE_INDEX for t in targets[(it.get("id"), it["path"])])]
    folds = np.array(group_folds(items, k, seed=cfg["seed"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = {h["name"]: np.full((len(items), len(h["classes"])), np.nan, dtype=np.float32) for h in heads}
    t0 = time.monotonic()
    fold_metrics = []
    cache_stats = None
    if mode == "quick":
        Y = np.array([targets[(it.get("id"), it["path"])] for it in items], dtype=np.int64).reshape(len(items), -1)
        cache_stats = _quick_folds(
            items, Y, folds, heads, cfg, k, probs, fold_metrics, cache_dir or out_dir / "feature-cache", progress, t0
        )
    for f in range(k if mode != "quick" else 0):
        sel = (f + 1) % k if k >= 3 else -1  # held out of training, used only to pick the best epoch
        fold_manifest = {
            "heads": manifest["heads"],
            "items": [
                {**it, "split": "test" if folds[i] == f else ("val" if folds[i] == sel else "train")}
                for i, it in enumerate(items)
            ],
        }
        fold_dir = out_dir / f"fold-{f}"
        metrics = train_model(fold_manifest, cfg, fold_dir)
        held = np.flatnonzero(folds == f)
        pred = _predict(fold_dir, [items[i] for i in held], batch_size=max(1, cfg["batch_size"] * 2))
        for name in probs:
            probs[name][held] = pred[name]
        fold_metrics.append({"fold": f, "n_heldout": int(held.size), "val_primary": metrics.get("primary")})
        log.info("out-of-fold: fold %d/%d done (%d held out)", f + 1, k, held.size)
        if progress is not None:
            progress(
                {"phase": "oof", "fold": f + 1, "folds": k, "eta_s": (time.monotonic() - t0) / (f + 1) * (k - f - 1)}
            )

    target_arrays = {
        h["name"]: np.array([targets[(it.get("id"), it["path"])][j] for it in items], dtype=np.int64)
        for j, h in enumerate(heads)
    }
    summary_heads = {}
    for name, p in probs.items():
        y = target_arrays[name]
        ok = (y != IGNORE_INDEX) & ~np.isnan(p).any(axis=1)
        summary_heads[name] = {
            "top1": float((p[ok].argmax(axis=1) == y[ok]).mean()) if ok.any() else None,
            "n": int(ok.sum()),
        }
    arrays = {"ids": np.array([str(it.get("id")) for it in items]), "fold": folds}
    arrays.update({f"probs_{n}": p for n, p in probs.items()})
    arrays.update({f"targets_{n}": y for n, y in target_arrays.items()})

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez_compressed(f, **arrays)

    write_atomic(out_dir / "oof_predictions.npz", save)
    meta = {
        "k": k,
        "mode": mode,
        "epochs_per_fold": cfg["quick_epochs"] if mode == "quick" else cfg["epochs"],
        "fold_training": (
            {"folds": "the other k-1", "selection": "train rows", **QUICK_FOLD_OVERRIDES}
            if mode == "quick"
            else {"folds": "the other k-2 (k >= 3)", "selection": "one further fold"}
        ),
        **({"cache": cache_stats} if cache_stats else {}),
        "n": len(items),
        "heads": {h["name"]: {"classes": h["classes"], **summary_heads[h["name"]]} for h in heads},
        "folds": fold_metrics,
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_json_atomic(out_dir / "oof_meta.json", meta)
    return {"k": k, "mode": mode, "n": len(items), "heads": summary_heads, "path": str(out_dir / "oof_predictions.npz")}


# The quick fold heads' recipe, over the run's config: no label smoothing (it pulls every probability towards
# uniform, and confident learning reads the probabilities themselves: its per-class thresholds and the count of
# issues it flags). The heads are throwaway, only their held-out probabilities count. Grocery bench (10 % flipped,
# heads on the same features): top-N recall 0.75 -> 0.85 at precision 1.0 (bench/mislabel.py).
QUICK_FOLD_OVERRIDES = {"label_smoothing": 0.0}


def _quick_folds(items, Y, folds, heads, cfg, k, probs, fold_metrics, cache_dir, progress, t0) -> dict:
    """Mode "quick": one feature pass (cached), then per fold the heads train on all the other k-1 folds and
    predict the held-out fold. No fold is held out for epoch selection: heads on frozen features follow a fixed
    schedule (quick_epochs of cosine decay; train_heads picks the epoch on its train rows), and a selection fold
    would cost 1/(k-1) of the training photos (grocery bench at k=4: out-of-fold top-1 0.81 -> 0.84). Fills probs and
    fold_metrics; returns the cache stats."""
    from .features import cached_features  # noqa: PLC0415
    from .model import backbone_stats  # noqa: PLC0415
    from .quick import heads_predict, resolve_pretrained_backbone, train_heads  # noqa: PLC0415

    backbone, _weights = resolve_pretrained_backbone(cfg)
    _dim, mean, std = backbone_stats(backbone, cfg["image_size"])
    feats = cached_features(items, cfg, cache_dir, backbone=backbone, mean=mean, std=std)
    X, ok = feats.X, feats.ok
    head_cfg = {**cfg, **QUICK_FOLD_OVERRIDES}
    none = np.zeros(len(items), dtype=bool)
    for f in range(k):
        tr = ok & (folds != f)
        held = np.flatnonzero(ok & (folds == f))
        fit = train_heads(X[tr], Y[tr], X[none], Y[none], heads, head_cfg)
        if held.size:
            p, _emb = heads_predict(fit["model"], X[held])
            for j, h in enumerate(heads):
                probs[h["name"]][held] = p[j]
        fold_metrics.append(
            {
                "fold": f,
                "n_heldout": int((folds == f).sum()),
                "train_primary": fit["best"]["result"]["primary"],
                "epoch": fit["best"]["epoch"],
            }
        )
        if progress is not None:
            progress(
                {"phase": "oof", "fold": f + 1, "folds": k, "eta_s": (time.monotonic() - t0) / (f + 1) * (k - f - 1)}
            )
    return feats.stats
