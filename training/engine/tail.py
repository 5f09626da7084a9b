"""Tail fine-tune: the last stages of a pretrained backbone and the heads, fine-tuned on cached intermediate maps.

Why: on this project's 2-core CPU a fine-tune of the whole network (train_model) gets through about 4 epochs of
grocery-store's 2,640 photos in 20 minutes, and the early stages are most of that cost (they run at 112, 56 and
28 px). They are also the generic part of an ImageNet backbone (edges, textures). Frozen, and in eval mode, their
output for one input never changes, so it is computed once per photo and view and kept on disk (float16, in the
run folder); each epoch then runs only the last stages (from block `tail_from_block` on, plus conv_head/bn2).

Views: the eval transform (centre crop) plus `tail_views - 1` draws of the run's training augmentation (seeded
per view), so the tail still sees augmented photos; in training, half of each batch's maps are mirrored when the
config's hflip allows mirrored photos. Validation uses the centre view, as the Recognizer does.

Recipe (the seeds' two phases): phase 1 trains the heads on the frozen backbone's pooled features (the quick
retrain's train_heads on the shared feature cache); phase 2 trains the tail at lr x unfreeze_lr_mult and the
heads at lr (AdamW, warm-up then cosine), best epoch and early stopping on val, max_train_seconds. The tail's
BatchNorm layers keep their ImageNet statistics (eval mode): batches of 64 maps of one small dataset would skew
them. The artifact folder is train_model's (model.pt is a whole LoupeNet), so export, calibration, the index and
the Recognizer work unchanged. Works for timm's EfficientNet/MobileNet-style backbones (conv_stem, bn1, blocks,
conv_head, bn2); others raise ValueError. A killed run keeps the maps (complete files only) and retrains from
phase 2's start; the maps are deleted once the artifact is written."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import resolve_config
from .data import ManifestDataset, collate_skip, draft_size, eval_transform, normalize_batch, train_transform
from .epoch import _check_metric, _judge, _metric_value
from .features import feature_threads, weights_fingerprint
from .losses import _head_loss_weights, _heads_loss, class_weights
from .manifest import IGNORE_INDEX, parse_manifest
from .model import LoupeNet, arcface_spec, backbone_stats
from .optim import MIN_LR_RATIO
from .progress import epoch_progress, features_progress
from .quick import (
    _report,
    evaluate_logits,
    heads_module,
    history_entry,
    manifest_features,
    resolve_pretrained_backbone,
    train_heads,
    write_artifact,
)
from .results import _with_per_class
from .runtime import resolve_num_workers, resolve_torch_threads, seed_everything

log = logging.getLogger("training.engine")

MAPS_DIR = "tail-maps"


class _Tail(nn.Module):
    """The backbone after block `k`: blocks[k:], conv_head, bn2, global average pool -> (N, D)."""

    def __init__(self, backbone: nn.Module, k: int):
        super().__init__()
        self.blocks = nn.Sequential(*list(backbone.blocks)[k:])
        self.conv_head, self.bn2 = backbone.conv_head, backbone.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(self.blocks(x))).mean((2, 3))


def split_backbone(backbone: nn.Module, k: int) -> tuple[nn.Module, nn.Module]:
    """(prefix, tail) sharing the backbone's modules: tail(prefix(x)) == backbone(x) (pooled features).
    ValueError when the backbone is not EfficientNet/MobileNet-shaped or k is out of range."""
    parts = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    if not all(hasattr(backbone, p) for p in parts) or not isinstance(backbone.blocks, nn.Sequential):
        raise ValueError(
            f"tail_from_block needs an EfficientNet/MobileNet-style timm backbone ({', '.join(parts)}); "
            f"{type(backbone).__name__} is not one: set tail_from_block to null for a whole-network fine-tune."
        )
    n = len(backbone.blocks)
    if not 1 <= k < n:
        raise ValueError(f"tail_from_block must be between 1 and {n - 1} for this backbone ({n} blocks), got {k}")
    prefix = nn.Sequential(backbone.conv_stem, backbone.bn1, *list(backbone.blocks)[:k])
    return prefix, _Tail(backbone, k)


def _maps_key(cfg: dict, fingerprint: str, k: int, items) -> str:
    desc = {
        "backbone": cfg["backbone"],
        "weights": fingerprint,
        "from_block": k,
        "views": cfg["tail_views"],
        "image_size": cfg["image_size"],
        "train_transform": repr(train_transform(cfg)),
        "seed": cfg["seed"],
        "items": [it.path for it in items],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def _compute_maps(prefix, items, transform, seed: int, path: Path, norm, min_side: int, workers: int, report):
    """prefix(photo) for every item into a float16 .npy at `path` (written whole: temp name, then rename), opened
    memory-mapped; NaN rows for unreadable files. An existing file (a resumed run) is reused."""
    if path.is_file():
        return np.load(path, mmap_mode="r")
    mean, std = norm
    ds = ManifestDataset(items, transform, min_side)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=64, shuffle=False, num_workers=workers, collate_fn=collate_skip, generator=gen)
    out = None
    tmp = path.with_suffix(".tmp.npy")
    done = 0
    for x, _y, idx, bad in loader:
        for j, err in bad:
            log.warning("tail maps: cannot read %s: %s", items[j].path, err)
        if x is not None:
            m = prefix(normalize_batch(x, mean, std)).to(torch.float16).numpy()
            if out is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(items), *m.shape[1:]))
                out[:] = np.nan
            out[idx] = m
        done += len(idx) + len(bad)
        report(done)
    if out is None:
        raise ValueError(f"none of the {len(items)} images could be read")
    out.flush()
    del out
    tmp.replace(path)
    return np.load(path, mmap_mode="r")


def train_tail(
    manifest: dict,
    config: dict | None,
    out_dir,
    *,
    cache_dir=None,
    progress: Callable[[dict], None] | None = None,
    fresh: bool = False,
) -> dict:
    """Phase 1 (heads on cached pooled features), then phase 2 (tail + heads on cached maps); writes train_model's
    artifact folder into out_dir and returns the metrics. NoPretrainedBackbone (a ValueError) when the config's
    pretrained weights do not resolve; ValueError when the backbone has no tail to split."""
    t_start = time.monotonic()
    cfg = resolve_config(config)
    k = int(cfg["tail_from_block"])
    parsed = parse_manifest(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head_names = parsed.head_names
    head_sizes = [len(h["classes"]) for h in parsed.heads]
    head_weights = _head_loss_weights(cfg, head_names)
    es = cfg["early_stopping"]
    metric = es["metric"]
    _check_metric(metric, head_names)
    mode = "min" if metric == "val_loss" else "max"
    seed_everything(cfg["seed"])
    workers = resolve_num_workers(cfg["num_workers"])
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(resolve_torch_threads(cfg["torch_threads"], workers))
    try:
        backbone, weights = resolve_pretrained_backbone(
            cfg, "the tail fine-tune (tail_from_block)", "set tail_from_block: null (a whole-network fine-tune)"
        )
        prefix, tail = split_backbone(backbone, k)
        backbone.eval()
        feature_dim, mean, std = backbone_stats(backbone, cfg["image_size"])
        epochs = int(cfg["epochs"])
        max_s = cfg["max_train_seconds"]

        # Phase 1: the heads on the frozen backbone's pooled features (shared cache; the quick retrain's heads).
        cache = Path(cache_dir) if cache_dir is not None else out_dir / "feature-cache"
        feats = manifest_features(
            manifest,
            parsed,
            cfg,
            cache,
            backbone=backbone,
            mean=mean,
            std=std,
            progress=features_progress(progress, epochs=epochs, weights=weights),
        )
        items = parsed.train + parsed.val
        Y = np.array([it.targets for it in items], dtype=np.int64).reshape(len(items), len(head_names))
        n_train = len(parsed.train)
        is_train = np.arange(len(items)) < n_train
        tr_ok, va_ok = feats.ok & is_train, feats.ok & ~is_train
        if not tr_ok.any():
            raise ValueError(f"none of the {n_train} train images could be read")
        t1 = time.monotonic()
        fit1 = train_heads(feats.X[tr_ok], Y[tr_ok], feats.X[va_ok], Y[va_ok], parsed.heads, cfg)
        phase1 = {
            "on": "feature-cache",
            "epochs": len(fit1["history"]),
            "best_epoch": fit1["best"]["epoch"],
            "value": fit1["best"]["value"],
            "seconds": round(time.monotonic() - t1, 3),
            "cache": {k_: feats.stats[k_] for k_ in ("hits", "misses", "failed", "seconds")},
        }
        model = LoupeNet(backbone, feature_dim, head_sizes, arcface=arcface_spec(cfg, parsed.heads))
        missing, unexpected = model.load_state_dict(fit1["state_dict"], strict=False)
        if unexpected or any(not m.startswith("backbone.") for m in missing):
            raise RuntimeError(f"phase-1 heads do not fit the model: missing {missing}, unexpected {unexpected}")

        # The maps: the centre view of train + val, and tail_views - 1 augmented views of train.
        key = _maps_key(cfg, weights_fingerprint(backbone), k, items)
        maps_dir = out_dir / MAPS_DIR
        if fresh:
            shutil.rmtree(maps_dir, ignore_errors=True)
        if maps_dir.is_dir():
            for old in maps_dir.iterdir():
                if not old.name.startswith(key):
                    old.unlink()
        views = int(cfg["tail_views"])
        total = len(items) + (views - 1) * n_train
        t_maps, done_before = time.monotonic(), 0

        maps_progress = features_progress(progress, epochs=epochs, weights=weights)

        def report(done: int) -> None:  # shown as the run's epoch-0 pass, like the feature pass
            now = done_before + done
            rate = (time.monotonic() - t_maps) / max(1, now)
            maps_progress({"done": now, "total": total, "eta_s": rate * (total - now)})

        size = cfg["image_size"]
        centre = _compute_maps(
            prefix,
            items,
            eval_transform(size),
            0,
            maps_dir / f"{key}-c.npy",
            (mean, std),
            draft_size(size),
            workers,
            report,
        )
        done_before = len(items)
        train_views = [centre[:n_train]]
        for v in range(1, views):
            aug = _compute_maps(
                prefix,
                parsed.train,
                train_transform(cfg),
                cfg["seed"] + v,
                maps_dir / f"{key}-v{v}.npy",
                (mean, std),
                draft_size(size, 1.5),
                workers,
                report,
            )
            train_views.append(aug)
            done_before += n_train
        maps_s = round(time.monotonic() - t_maps, 1)
        val_maps = centre[n_train:]

        # Phase 2: the tail + heads.
        for p in prefix.parameters():
            p.requires_grad_(False)
        tail_params = [p for p in tail.parameters() if p.requires_grad]
        tail_ids = {id(p) for p in tail_params} | {id(p) for p in prefix.parameters()}
        head_params = [p for p in model.parameters() if id(p) not in tail_ids]

        def groups(params, lr):
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            return [
                {"params": decay, "lr": lr, "weight_decay": cfg["weight_decay"]},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            ]

        base = [cfg["lr"] * cfg["unfreeze_lr_mult"]] * 2 + [cfg["lr"]] * 2
        optimizer = torch.optim.AdamW(groups(tail_params, base[0]) + groups(head_params, base[2]))
        Yt = torch.from_numpy(Y[:n_train])
        Yv = torch.from_numpy(Y[n_train:])
        bs = min(n_train, max(2, int(cfg["batch_size"])))
        steps_per_epoch = max(1, n_train // bs)
        total_steps = max(1, epochs * steps_per_epoch)
        warm = int(cfg["warmup_epochs"] * steps_per_epoch)

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total_steps - warm))
            return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
        loss_weights = class_weights([tuple(r) for r in Y[:n_train].tolist()], head_sizes, cfg["class_weighting"])
        if all(w is None for w in loss_weights):
            loss_weights = None
        arc = model.arcface_head is not None
        gen = torch.Generator().manual_seed(cfg["seed"])
        metrics_on = "val" if parsed.val and va_ok.any() else "train"

        @torch.inference_mode()
        def pooled(maps: np.ndarray) -> np.ndarray:
            tail.eval()
            out = np.zeros((len(maps), feature_dim), dtype=np.float32)
            for i in range(0, len(maps), 128):
                out[i : i + 128] = tail(
                    torch.from_numpy(np.nan_to_num(np.asarray(maps[i : i + 128], dtype=np.float32)))
                ).numpy()
            return out

        def evaluate() -> tuple[dict, np.ndarray]:
            if metrics_on == "val":
                X, Yk, ok = pooled(val_maps), Yv, va_ok[n_train:]
            else:
                X, Yk, ok = pooled(centre[:n_train]), Yt, tr_ok[:n_train]
            model.eval()
            with torch.inference_mode():
                logits, _ = model.heads_forward(torch.from_numpy(X[ok]))
            return evaluate_logits(logits, Yk[torch.from_numpy(ok)], head_names, head_sizes), X

        history, best, best_state, bad_epochs, stopped = [], None, None, 0, None
        result, _ = evaluate()
        best = {"epoch": 0, "value": _metric_value(result, metric), "loss": result["loss"], "result": result}
        best_state = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
        # No data loader in phase 2 (the maps are in memory): every core computes, as in the feature pass.
        torch.set_num_threads(feature_threads(cfg["torch_threads"], 0))
        t2 = time.monotonic()
        for epoch in range(1, epochs + 1):
            t_epoch = time.monotonic()
            if arc:
                model.set_arcface_margin(cfg["arcface_margin"])
            model.train()
            for m in tail.modules():  # ImageNet BatchNorm statistics are kept
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            view_of = torch.randint(0, views, (n_train,), generator=gen).numpy()
            perm = torch.randperm(n_train, generator=gen).numpy()
            loss_sum, loss_n = 0.0, 0
            for s in range(steps_per_epoch):
                rows = perm[s * bs : (s + 1) * bs]
                x = np.stack([train_views[view_of[r]][r] for r in rows]).astype(np.float32)
                keep = ~np.isnan(x[:, 0, 0, 0])
                if keep.sum() < 2:
                    continue
                xb = torch.from_numpy(x[keep])
                if cfg["hflip"]:
                    flip = torch.rand(len(xb), generator=gen) < 0.5
                    xb[flip] = xb[flip].flip(3)
                logits, emb = model.heads_forward(tail(xb))
                loss = _heads_loss(
                    logits,
                    Yt[torch.from_numpy(rows[keep])],
                    cfg["label_smoothing"],
                    loss_weights,
                    head_weights,
                    model=model,
                    embeddings=emb,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach())
                loss_n += 1
            result, _ = evaluate()
            value = _metric_value(result, metric)
            train_loss = loss_sum / loss_n if loss_n else None
            history.append(
                history_entry(
                    epoch,
                    train_loss,
                    result,
                    lr=optimizer.param_groups[2]["lr"],  # the heads' lr
                    backbone_frozen=False,
                    seconds=time.monotonic() - t_epoch,
                    steps=steps_per_epoch,
                )
            )
            improved, selected = _judge(value, result["loss"], best, mode, es["min_delta"])
            bad_epochs = 0 if improved else bad_epochs + (value is not None)
            if selected:
                best = {"epoch": epoch, "value": value, "loss": result["loss"], "result": result}
                best_state = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
            if es["patience"] is not None and bad_epochs >= es["patience"] and epoch < epochs:
                stopped = "early_stopping"
            elif max_s is not None and epoch < epochs and time.monotonic() - t_start + history[-1]["seconds"] > max_s:
                stopped = "time_limit"  # the next epoch would end past max_train_seconds
            if progress is not None:
                el = time.monotonic() - t2
                progress(
                    {
                        **epoch_progress(
                            epoch=epoch,
                            epochs=epochs,
                            steps_per_epoch=steps_per_epoch,
                            train_loss=train_loss,
                            result=result,
                            metrics_on=metrics_on,
                            eta_s=0.0 if stopped else el / epoch * (epochs - epoch),
                        ),
                        "pretrained": weights,
                    }
                )
            if stopped:
                break
        model.load_state_dict(best_state)
        model.eval()
        if arc:
            model.set_arcface_margin(cfg["arcface_margin"])

        n_known = [int((Y[tr_ok][:, h] != IGNORE_INDEX).sum()) for h in range(len(head_names))]
        skipped = sorted(it.path for it, ok in zip(items, feats.ok, strict=True) if not ok)
        metrics = {
            "heads": {
                name: _with_per_class(best["result"]["heads"][name], parsed.heads[h]["classes"], n_known[h])
                for h, name in enumerate(head_names)
            },
            "primary": best["result"]["primary"],
            "best_epoch": best["epoch"],
            "selection_metric": metric,
            "history": history,
            "n_train": n_train,
            "n_val": len(parsed.val),
            "n_test": parsed.n_test,
            "metrics_on": metrics_on,
            "skipped_files": len(skipped),
            "skipped_paths": skipped[:100],
            "device": "cpu",
            "backbone": cfg["backbone"],
            "pretrained_source": weights["source"],
            "pretrained_detail": weights["detail"],
            "embedding_dim": model.embedding_dim,
            "epochs_run": len(history),
            "stopped_early": stopped,
            "phase1": phase1,
            "tail": {"from_block": k, "views": views, "maps_seconds": maps_s, "maps": total},
            "seconds": None,
        }
        if cfg["eval_report"]:
            try:
                heads_only = heads_module(cfg, parsed.heads, feature_dim)
                heads_only.load_state_dict(
                    {k_: v for k_, v in model.state_dict().items() if not k_.startswith("backbone.")}, strict=True
                )
                X = np.zeros((len(items), feature_dim), dtype=np.float32)
                X[:n_train] = pooled(centre[:n_train])
                X[n_train:] = pooled(val_maps)
                _report(heads_only, parsed, cfg, out_dir, metrics, X, Y, tr_ok, va_ok)
            except Exception as exc:  # noqa: BLE001 - a failed report must not lose the trained model
                log.exception("evaluation report failed")
                metrics["report_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        metrics = write_artifact(out_dir, cfg, parsed, model, mean, std, best["epoch"], metrics, t_start)
        shutil.rmtree(maps_dir, ignore_errors=True)
        log.info(
            "tail fine-tune from block %d: best epoch %d of %d, %s %s, maps %.0fs, %.1fs, written to %s",
            k,
            best["epoch"],
            len(history),
            metric,
            best["value"],
            maps_s,
            metrics["seconds"],
            out_dir,
        )
        return metrics
    finally:
        torch.set_num_threads(prev_threads)
