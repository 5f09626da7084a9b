"""Quick retrain: only the heads train, on cached frozen-backbone features (features.py), in seconds once the cache
is warm. train_quick writes the same artifact folder as train_model (model.pt = LoupeNet whose backbone is the
starting pretrained one and whose heads are the trained ones, label_maps.json, config.json, metrics.json with
"quick": true and "cache": {hits, misses, seconds}, report.md ...), so ONNX export, calibration, the test report,
the index and the Recognizer work unchanged.

The heads are LoupeNet's own modules (a linear layer per softmax head; the ArcFace neck + class centres where
config head_type is "arcface"), built as LoupeNet(nn.Identity(), ...) so that forward(features) is exactly the
trained network after its backbone. Training: AdamW (lr, weight_decay), cosine decay to 1% over `quick_epochs`
epochs of shuffled mini-batches (max(64, batch_size)), the masked per-head loss of train_model (unknown labels
are IGNORE_INDEX and left out; class weighting, head loss weights, label smoothing), the ArcFace margin at
arcface_warmup_margin for the first fifth of the epochs, then arcface_margin; best epoch and early stopping on
val as train_model. Always on the CPU (small matrices; bit-for-bit reproducible with a seed)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_atomic
from .checkpoint import TrainState
from .config import resolve_config
from .epoch import _check_metric, _evaluation, _metric_value, select_epoch
from .features import cached_features
from .hierarchy import decide
from .losses import _head_loss_weights, _heads_loss, class_weights
from .manifest import IGNORE_INDEX, parse_manifest
from .model import ARTIFACT_FORMAT, LoupeNet, arcface_spec, create_backbone
from .optim import MIN_LR_RATIO
from .progress import epoch_progress, features_progress
from .results import _clean, _fmt, _with_per_class, write_head_reports, write_json_atomic, write_report
from .runtime import seed_everything

log = logging.getLogger("training.engine")

QUICK_MIN_BATCH = 64
PROGRESS_INTERVAL_S = 0.5


class NoPretrainedBackbone(ValueError):
    """A quick retrain on random-init features would be meaningless."""


def heads_module(config: dict, heads: list[dict], feature_dim: int) -> LoupeNet:
    """LoupeNet without a backbone (nn.Identity): forward((N, D) features) -> (logits per head, embedding)."""
    return LoupeNet(nn.Identity(), feature_dim, [len(h["classes"]) for h in heads], arcface=arcface_spec(config, heads))


@torch.inference_mode()
def heads_predict(model: LoupeNet, X: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(softmax probabilities per head [(N, K_h) float32], L2-normalised embeddings (N, E) float32) of features X."""
    model.eval()
    logits, emb = model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
    probs = [F.softmax(lg.float(), dim=1).numpy() for lg in logits]
    return probs, F.normalize(emb.float(), dim=1).numpy()


@torch.inference_mode()
def _evaluate(model: LoupeNet, X: torch.Tensor, Y: torch.Tensor, heads: list[dict]) -> dict:
    """epoch.evaluate on feature arrays: per head top-1/top-5, n_val and per-class counts; mean CE summed over heads."""
    model.eval()
    logits, _ = model(X)
    return evaluate_logits(logits, Y, heads)


def evaluate_logits(logits: list[torch.Tensor], Y: torch.Tensor, heads: list[dict]) -> dict:
    """Per head top-1/top-5, n_val and per-class counts of logits against targets Y (IGNORE_INDEX = unknown); mean CE
    summed over heads. Top-1 is the decision the Recognizer serves (hierarchy.decide: a child head decoded under
    its parent head), top-5 the order of the same hierarchy-consistent probabilities."""
    probs = [F.softmax(lg.float(), dim=1).numpy() for lg in logits]
    q, pred = decide(probs, heads)
    out, losses = {}, []
    for h, head in enumerate(heads):
        name, size = head["name"], len(head["classes"])
        yh = Y[:, h]
        mask = yh != IGNORE_INDEX
        n = int(mask.sum())
        entry = {"top1": None, "top5": None, "n_val": n, "per_class_counts": ([0] * size, [0] * size)}
        if n:
            yk = yh[mask]
            ranked = torch.from_numpy(q[h][mask.numpy()]).topk(min(5, size), dim=1).indices
            hit = torch.from_numpy(pred[h][mask.numpy()]) == yk
            entry.update(
                top1=float(hit.sum()) / n,
                top5=float((ranked == yk[:, None]).any(dim=1).sum()) / n,
                per_class_counts=(
                    torch.bincount(yk, minlength=size).tolist(),
                    torch.bincount(yk[hit], minlength=size).tolist(),
                ),
            )
            losses.append(float(F.cross_entropy(logits[h].float()[mask], yk, reduction="mean")))
        out[name] = entry
    return _evaluation(out, losses)


def history_entry(
    epoch: int, train_loss, result: dict, *, lr: float, backbone_frozen: bool, seconds: float, steps: int, **extra
) -> dict:
    """One epoch of metrics["history"] for the trainers outside the loop (quick retrain, tail fine-tune)."""
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": result["loss"],
        "heads": {k: {a: b for a, b in m.items() if a != "per_class_counts"} for k, m in result["heads"].items()},
        "primary": result["primary"],
        "lr": lr,
        "backbone_frozen": backbone_frozen,
        **extra,
        "seconds": round(seconds, 4),
        "steps": steps,
    }


def train_heads(
    X_train: np.ndarray,
    Y_train: np.ndarray,
    X_val: np.ndarray,
    Y_val: np.ndarray,
    heads: list[dict],
    config: dict,
    *,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train the heads on features. X_*: (N, D) float32; Y_*: (N, H) int64 class indices, IGNORE_INDEX = unknown.
    With no val rows, selection uses the train rows (metrics_on "train"). Deterministic for a given config seed.

    Returns {"model" (best epoch's weights loaded), "state_dict", "best", "history", "metrics_on",
    "stopped_early"}."""
    cfg = resolve_config(config)
    head_names = [h["name"] for h in heads]
    head_sizes = [len(h["classes"]) for h in heads]
    head_weights = _head_loss_weights(cfg, head_names)
    es = cfg["early_stopping"]
    metric = es["metric"]
    _check_metric(metric, head_names)
    mode = "min" if metric == "val_loss" else "max"
    Xt, Yt, Xv, Yv, metrics_on = _feature_tensors(X_train, Y_train, X_val, Y_val)
    n = Xt.shape[0]
    if n == 0:
        raise ValueError("no train features to train the heads on")
    torch.manual_seed(cfg["seed"])
    model = heads_module(cfg, heads, Xt.shape[1])
    loss_weights = class_weights([tuple(r) for r in Yt.tolist()], head_sizes, cfg["class_weighting"])
    if all(w is None for w in loss_weights):
        loss_weights = None
    epochs = int(cfg["quick_epochs"])
    bs = min(n, max(QUICK_MIN_BATCH, int(cfg["batch_size"])))
    drop_last = n > bs
    steps_per_epoch = n // bs if drop_last else 1
    optimizer, scheduler = _heads_optimizer(model, cfg, max(1, epochs * steps_per_epoch))
    gen = torch.Generator()
    gen.manual_seed(cfg["seed"])
    arc = model.arcface_head is not None
    warm_epochs = max(1, epochs // 5) if arc else 0
    t0 = time.monotonic()
    state = TrainState(t_start=t0)  # history, best, best_state, bad_epochs, stopped_early
    history = state.history
    last_progress = 0.0
    for epoch in range(1, epochs + 1):
        t_epoch = time.monotonic()
        if arc:
            model.set_arcface_margin(cfg["arcface_warmup_margin"] if epoch <= warm_epochs else cfg["arcface_margin"])
        model.train()
        perm = torch.randperm(n, generator=gen)
        batches = [perm[s * bs : (s + 1) * bs] if drop_last else perm for s in range(steps_per_epoch)]
        train_loss = _heads_train_epoch(model, optimizer, scheduler, Xt, Yt, batches, cfg, loss_weights, head_weights)
        result = _evaluate(model, Xv, Yv, heads)
        value = _metric_value(result, metric)
        history.append(
            history_entry(
                epoch,
                train_loss,
                result,
                lr=optimizer.param_groups[0]["lr"],
                backbone_frozen=True,
                seconds=time.monotonic() - t_epoch,
                steps=steps_per_epoch,
                arcface_margin=round(math.degrees(model.arcface.margin), 4) if arc else None,
            )
        )
        select_epoch(state, epoch, value, result, model, mode, es["min_delta"])
        if es["patience"] is not None and state.bad_epochs >= es["patience"] and epoch < epochs:
            state.stopped_early = "early_stopping"
        stopped_early = state.stopped_early
        now = time.monotonic()
        if progress is not None and (stopped_early or epoch == epochs or now - last_progress >= PROGRESS_INTERVAL_S):
            progress(
                epoch_progress(
                    epoch=epoch,
                    epochs=epochs,
                    steps_per_epoch=steps_per_epoch,
                    train_loss=train_loss,
                    result=result,
                    metrics_on=metrics_on,
                    eta_s=0.0 if stopped_early else (now - t0) / epoch * (epochs - epoch),
                )
            )
            last_progress = now
        if stopped_early:
            break
    model.load_state_dict(state.best_state)
    model.eval()
    return {
        "model": model,
        "state_dict": state.best_state,
        "best": state.best,
        "history": history,
        "metrics_on": metrics_on,
        "stopped_early": state.stopped_early,
    }


def _feature_tensors(X_train, Y_train, X_val, Y_val):
    """(Xt, Yt, Xv, Yv, metrics_on) as contiguous float32 / int64 tensors; without val rows the train rows stand in
    (metrics_on "train")."""
    Xt = torch.from_numpy(np.ascontiguousarray(X_train, dtype=np.float32))
    Yt = torch.from_numpy(np.ascontiguousarray(Y_train, dtype=np.int64))
    if len(X_val):
        Xv = torch.from_numpy(np.ascontiguousarray(X_val, dtype=np.float32))
        Yv = torch.from_numpy(np.ascontiguousarray(Y_val, dtype=np.int64))
        return Xt, Yt, Xv, Yv, "val"
    return Xt, Yt, Xt, Yt, "train"


def _heads_optimizer(model, cfg: dict, total_steps: int):
    """(AdamW on all the heads' parameters, per-step cosine decay to MIN_LR_RATIO over total_steps, no warm-up)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps))),
    )
    return optimizer, scheduler


def _heads_train_epoch(model, optimizer, scheduler, Xt, Yt, batches, cfg: dict, loss_weights, head_weights):
    """One epoch of train_heads over `batches` (row indexes; batches of one row are skipped when the heads have
    BatchNorm). Returns the mean train loss (None without a trained batch)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loss_sum, loss_n = 0.0, 0
    for rows in batches:
        if has_bn and rows.numel() < 2:
            continue
        logits, emb = model(Xt[rows])
        loss = _heads_loss(
            logits, Yt[rows], cfg["label_smoothing"], loss_weights, head_weights, model=model, embeddings=emb
        )
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach())
        loss_n += 1
    return loss_sum / loss_n if loss_n else None


def write_artifact(out_dir: Path, cfg: dict, parsed, model, mean, std, best_epoch: int, metrics: dict, t_start: float):
    """train_model's artifact files for a model trained outside its loop (quick retrain, tail fine-tune): model.pt
    (the whole LoupeNet), label_maps.json, config.json and metrics.json (seconds filled in), each written whole.
    Returns the cleaned metrics."""
    artifact = {
        "format": ARTIFACT_FORMAT,
        "config": cfg,
        "heads": parsed.heads,
        "label_maps": parsed.label_maps,
        "state_dict": model.state_dict(),
        "embedding_dim": model.embedding_dim,
        "mean": mean,
        "std": std,
        "best_epoch": best_epoch,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    write_atomic(out_dir / "model.pt", lambda tmp: torch.save(artifact, tmp))
    write_json_atomic(out_dir / "label_maps.json", parsed.label_maps)
    write_json_atomic(out_dir / "config.json", cfg)
    metrics["seconds"] = round(time.monotonic() - t_start, 3)
    metrics = _clean(metrics)
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def resolve_pretrained_backbone(cfg: dict, what: str = "quick retrain", instead: str = "run a full fine-tune"):
    """(backbone, weights) of the config's starting weights; NoPretrainedBackbone when none resolve."""
    backbone, weights = create_backbone(
        cfg["backbone"],
        image_size=cfg["image_size"],
        pretrained=cfg["pretrained"],
        pretrained_path=cfg["pretrained_path"],
    )
    if weights["source"] == "none":
        raise NoPretrainedBackbone(
            f"{what} needs a pretrained backbone: it trains on the frozen backbone's features, which are "
            "meaningless from random init. Set pretrained: true (with weights that resolve offline: the hub "
            f"cache or the bundled tf_efficientnet_lite0/1/2) or pretrained_path, or {instead}. "
            f"({weights['detail']})"
        )
    return backbone, weights


def manifest_features(manifest: dict, parsed, cfg: dict, cache_dir, *, backbone, mean, std, progress=None):
    """Cached features of the parsed train + val items (manifest dicts keep their "sha256")."""
    items = _manifest_items(manifest, parsed.train + parsed.val)
    return cached_features(items, cfg, cache_dir, backbone=backbone, mean=mean, std=std, progress=progress)


def _manifest_items(manifest: dict, parsed_items) -> list[dict]:
    by_key = {(it.get("id"), it["path"]): it for it in manifest["items"]}
    return [by_key.get((it.id, it.path), {"path": it.path}) for it in parsed_items]


def view_features(manifest: dict, parsed, cfg: dict, cache_dir, *, backbone, mean, std, progress=None):
    """The train photos' cached features in each of cfg["quick_views"] (data.VIEWS): ([(X (n_train, D), ok)] per
    view, summed cache stats)."""
    items = _manifest_items(manifest, parsed.train)
    out, stats = [], {"hits": 0, "misses": 0, "failed": 0, "seconds": 0.0}
    for view in cfg["quick_views"]:
        f = cached_features(items, cfg, cache_dir, backbone=backbone, mean=mean, std=std, progress=progress, view=view)
        out.append((f.X, f.ok))
        for k in stats:
            stats[k] += f.stats[k]
    return out, stats


def train_quick(
    manifest: dict,
    config: dict | None,
    out_dir,
    *,
    cache_dir=None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Heads only, on cached frozen features of the train split, best epoch on val; writes the artifact folder of
    train_model into out_dir and returns the metrics. cache_dir defaults to out_dir/feature-cache (no sharing).
    NoPretrainedBackbone (a ValueError) when the config's pretrained weights do not resolve."""
    from .model import backbone_stats  # noqa: PLC0415

    t_start = time.monotonic()
    cfg = {**resolve_config(config), "quick": True}  # config.json says how the model was trained
    parsed = parse_manifest(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "feature-cache"
    head_names = parsed.head_names
    _head_loss_weights(cfg, head_names)  # ValueError before any work
    _check_metric(cfg["early_stopping"]["metric"], head_names)
    seed_everything(cfg["seed"])
    backbone, weights = resolve_pretrained_backbone(cfg)
    feature_dim, mean, std = backbone_stats(backbone, cfg["image_size"])
    epochs = int(cfg["quick_epochs"])

    feature_progress = features_progress(progress, epochs=epochs, weights=weights)

    feats = manifest_features(
        manifest, parsed, cfg, cache_dir, backbone=backbone, mean=mean, std=std, progress=feature_progress
    )
    n_train = len(parsed.train)
    items = parsed.train + parsed.val
    Y = np.array([it.targets for it in items], dtype=np.int64).reshape(len(items), len(head_names))
    is_train = np.arange(len(items)) < n_train
    skipped = sorted(it.path for it, ok in zip(items, feats.ok, strict=True) if not ok)
    tr, va = feats.ok & is_train, feats.ok & ~is_train
    if not tr.any():
        raise ValueError(
            f"none of the {n_train} train images could be read" + (f" (e.g. {skipped[0]})" if skipped else "")
        )

    def heads_progress(p: dict) -> None:
        if progress is not None:
            progress({**p, "pretrained": weights})

    views, view_stats = view_features(
        manifest, parsed, cfg, cache_dir, backbone=backbone, mean=mean, std=std, progress=feature_progress
    )
    X_train, Y_train = [feats.X[tr]], [Y[tr]]
    for Xv, okv in views:  # the train photos again, as each view saw them (rows of photos that could be read)
        keep = okv & feats.ok[:n_train]
        X_train.append(Xv[keep])
        Y_train.append(Y[:n_train][keep])
    fit = train_heads(
        np.concatenate(X_train), np.concatenate(Y_train), feats.X[va], Y[va], parsed.heads, cfg, progress=heads_progress
    )
    best = fit["best"]
    model = LoupeNet(
        backbone, feature_dim, [len(h["classes"]) for h in parsed.heads], arcface=arcface_spec(cfg, parsed.heads)
    )
    state = {f"backbone.{k}": v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    state.update({k: v for k, v in fit["state_dict"].items() if not k.startswith("backbone.")})
    model.load_state_dict(state, strict=True)  # the exact LoupeNet layout train_model writes
    n_known = [int((Y[tr][:, h] != IGNORE_INDEX).sum()) for h in range(len(head_names))]
    metrics = {
        "heads": {
            name: _with_per_class(best["result"]["heads"][name], parsed.heads[h]["classes"], n_known[h])
            for h, name in enumerate(head_names)
        },
        "primary": best["result"]["primary"],
        "best_epoch": best["epoch"],
        "selection_metric": cfg["early_stopping"]["metric"],
        "history": fit["history"],
        "n_train": n_train,
        "n_val": len(parsed.val),
        "n_test": parsed.n_test,
        "metrics_on": fit["metrics_on"],
        "skipped_files": len(skipped),
        "skipped_paths": skipped[:100],
        "device": "cpu",
        "backbone": cfg["backbone"],
        "pretrained_source": weights["source"],
        "pretrained_detail": weights["detail"],
        "embedding_dim": model.embedding_dim,
        "epochs_run": len(fit["history"]),
        "stopped_early": fit["stopped_early"],
        "quick": True,
        "cache": {
            **{k: feats.stats[k] + view_stats.get(k, 0) for k in ("hits", "misses", "failed", "seconds")},
            "key": feats.stats["key"],
        },
        "views": ["centre", *cfg["quick_views"]],
        "seconds": None,
    }
    if cfg["eval_report"]:
        try:
            _report(fit["model"], parsed, cfg, out_dir, metrics, feats.X, Y, tr, va)
        except Exception as exc:  # noqa: BLE001 - a failed report must not lose the trained model
            log.exception("evaluation report failed")
            metrics["report_error"] = f"{type(exc).__name__}: {exc}"[:1000]
    metrics = write_artifact(out_dir, cfg, parsed, model, mean, std, best["epoch"], metrics, t_start)
    log.info(
        "quick retrain: best epoch %d, %s %s, cache %d hits / %d computed, %.1fs, written to %s",
        best["epoch"],
        cfg["early_stopping"]["metric"],
        _fmt(best["value"]),
        feats.stats["hits"],
        feats.stats["misses"],
        metrics["seconds"],
        out_dir,
    )
    return metrics


def _report(heads_model, parsed, cfg, out_dir: Path, metrics: dict, X, Y, tr, va) -> None:
    """results._final_report from feature arrays: per-class report, confusion pictures, curves, retrieval, report.md."""
    from . import report  # noqa: PLC0415

    ev = va if va.any() else tr
    with torch.inference_mode():
        heads_model.eval()
        logits, emb = heads_model(torch.from_numpy(X[ev]))
    emb = F.normalize(emb.float(), dim=1).numpy()
    targets = Y[ev]
    images, head_reports = write_head_reports(
        metrics, parsed.heads, [lg.float().numpy() for lg in logits], targets, out_dir
    )
    retrieval = None
    if cfg["eval_retrieval"] and va.any():
        with torch.inference_mode():
            _, g_emb = heads_model(torch.from_numpy(X[tr]))
        g_emb = F.normalize(g_emb.float(), dim=1).numpy()
        retrieval = {
            head["name"]: report.retrieval_report(g_emb, Y[tr][:, h], emb, targets[:, h])
            for h, head in enumerate(parsed.heads)
        }
    write_report(out_dir, cfg, parsed.heads, metrics, head_reports, images, retrieval)
