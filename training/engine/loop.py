"""train_model: the training loop (AdamW or SGD, torch LR schedulers, gradient accumulation, per-head masked
cross-entropy, optional backbone freezing, per-epoch validation, best-epoch selection and early stopping on the
validation split, resumable checkpoints, atomic artifact writing)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, ReduceLROnPlateau
from torch.utils.data import DataLoader

from . import atomic
from .atomic import write_atomic
from .config import RUNTIME_KEYS, resolve_config
from .data import ManifestDataset, collate_skip, draft_size, eval_transform, normalize_batch, train_transform
from .hierarchy import leaf_head
from .manifest import IGNORE_INDEX, ParsedManifest, parse_manifest
from .model import ARTIFACT_FORMAT, build_model, freezable_backbone_params
from .sampling import build_train_sampler, manifest_train_sources

log = logging.getLogger("training.engine")

MIN_LR_RATIO = 0.01  # cosine (and cosine_restarts) decay to lr * MIN_LR_RATIO; plateau never goes below it
PROGRESS_MIN_INTERVAL_S = 15.0
CHECKPOINT_FORMAT = "loupe-ckpt-v1"
CHECKPOINT_DIR = "checkpoints"


# ----------------------------------------------------------------------------------------------- helpers
# ----------------------------------------------------------------------------------------------- helpers
def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_num_workers(value, cpus: int | None = None) -> int:
    """ "auto": min(4, cpus - 1), and 0 on machines with <= 2 CPUs (measured: on 2 cores a worker process
    only competes with the training threads)."""
    if value != "auto":
        return int(value)
    cpus = cpu_count() if cpus is None else cpus
    return 0 if cpus <= 2 else min(4, cpus - 1)


def resolve_torch_threads(value, num_workers: int, cpus: int | None = None) -> int:
    """ "auto": leave one core for the data-loading main thread/OS/web server and one per loader worker.
    Measured on 2 cores (mobilenetv3_small_100, batch 32, 128 px): 2 threads 145 ms/step on an idle machine
    but 2-3 s/step while another process was busy (OpenMP threads spin-waiting); 1 thread 143 ms/step busy."""
    if value != "auto":
        return int(value)
    cpus = cpu_count() if cpus is None else cpus
    return max(1, cpus - num_workers - 1)


def resolve_device(value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(value)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config 'device': {value!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("config 'device': 'mps' requested but MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _worker_init(_worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _finite(obj)


_atomic_write_bytes_via = write_atomic  # the engine's name for atomic.write_atomic


def features_progress(progress: Callable[[dict], None] | None, *, epochs: int, weights: dict | None):
    """cached_features' progress callback that reports the feature pass as the run's "features" phase (epoch 0)."""

    def report(p: dict) -> None:
        if progress is not None:
            progress(
                {
                    "phase": "features",
                    "epoch": 0,
                    "epochs": epochs,
                    "step": p["done"],
                    "steps_per_epoch": p["total"],
                    "loss": None,
                    "eta_s": p["eta_s"],
                    "pretrained": weights,
                }
            )

    return report


def epoch_progress(
    *, epoch: int, epochs: int, steps_per_epoch: int, train_loss, result: dict, metrics_on: str, eta_s: float
) -> dict:
    """The progress record of a finished epoch (what the TrainingRun row and the UI show), shared by the full loop
    and the quick retrain."""
    return {
        "phase": "epoch",
        "epoch": epoch,
        "epochs": epochs,
        "step": steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "loss": train_loss if train_loss is not None else 0.0,
        "val_loss": result["loss"],
        "metrics": {n: {"top1": m["top1"], "top5": m["top5"], "n_val": m["n_val"]} for n, m in result["heads"].items()},
        "primary": result["primary"],
        "metrics_on": metrics_on,
        "eta_s": eta_s,
    }


def write_head_reports(
    metrics: dict, heads: list[dict], logits: list[np.ndarray], targets: np.ndarray, out_dir: Path
) -> tuple[dict[str, str], dict[str, dict]]:
    """Per head (logits[h]: (N, K_h) on the evaluated split, targets: (N, H) with IGNORE_INDEX for unknown): the
    classification report into metrics["heads"][name] (per class, macro, most confused), confusion_<head>.png and
    .json; then curves.png. Returns ({caption: picture file}, {head: classification report}) for report.md.
    Shared by the full training loop and the quick (heads-only) retrain."""
    from . import report  # noqa: PLC0415 - matplotlib only when a report is written

    images: dict[str, str] = {}
    head_reports: dict[str, dict] = {}
    for h, head in enumerate(heads):
        name = head["name"]
        rep = report.classification_report(logits[h], targets[:, h], head["classes"])
        head_reports[name] = rep
        m = metrics["heads"][name]
        m["per_class"] = {
            c: {k: v[k] for k in ("n", "correct", "accuracy", "precision", "recall", "f1")}
            for c, v in rep["per_class"].items()
            if v["n"]
        }
        m["macro"] = rep.get("macro")
        m["most_confused"] = rep["most_confused"]
        png = f"confusion_{name}.png"
        report.plot_confusion(rep["confusion"], head["classes"], out_dir / png, title=name)
        images[f"{name} confusion"] = png
        write_json_atomic(out_dir / f"confusion_{name}.json", {"classes": head["classes"], "matrix": rep["confusion"]})
    report.plot_curves(
        metrics["history"],
        out_dir / "curves.png",
        evaluated_on="train (optimistic)" if metrics.get("metrics_on") == "train" else "val",
    )
    images["curves"] = "curves.png"
    return images, head_reports


def write_json_atomic(path: Path, data) -> None:
    """JSON of data with NaN/inf as null (_clean), written whole."""
    atomic.write_json_atomic(path, _clean(data))


# ------------------------------------------------------------------------------------------ optimisation
def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor at optimizer step `step` (0-based): linear warm-up, then cosine down to MIN_LR_RATIO."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _param_groups(model, weight_decay: float, lr: float, freezable: list, freezable_lr_mult: float) -> list[dict]:
    """Optimizer param groups named "backbone" (the freezable part, lr x freezable_lr_mult), "backbone_rest" (the
    part never frozen) and "heads", each split into decay / no decay (no decay on biases and norm weights).
    Empty groups are left out; the layout depends only on the model and config, so a checkpoint fits."""
    freezable_ids = {id(p) for p in freezable}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    buckets: dict[str, tuple[list, list]] = {"backbone": ([], []), "backbone_rest": ([], []), "heads": ([], [])}
    for p in model.parameters():
        if id(p) in freezable_ids:
            name = "backbone"
        elif id(p) in backbone_ids:
            name = "backbone_rest" if freezable_ids else "backbone"
        else:
            name = "heads"
        buckets[name][1 if p.ndim <= 1 else 0].append(p)
    groups = []
    for name, (decay, no_decay) in buckets.items():
        group_lr = lr * (freezable_lr_mult if name == "backbone" and freezable_ids else 1.0)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "lr": group_lr, "name": name})
    return groups


def _make_optimizer(cfg: dict, groups: list[dict], is_cuda: bool) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        momentum = cfg["momentum"]
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999), fused=is_cuda or None)


def _make_scheduler(cfg: dict, optimizer, steps_per_epoch: int, mode: str):
    """(scheduler or None, "step" | "epoch" | None): when to call scheduler.step(). steps_per_epoch counts
    optimizer steps (after gradient accumulation)."""
    kind = cfg["scheduler"]
    epochs = cfg["epochs"]
    if kind == "cosine":
        total = epochs * steps_per_epoch
        warmup = min(int(round(cfg["warmup_epochs"] * steps_per_epoch)), max(0, total - 1))
        return LambdaLR(optimizer, _lr_lambda(total, warmup)), "step"
    if kind == "cosine_restarts":
        eta_min = min(g["lr"] for g in optimizer.param_groups) * MIN_LR_RATIO
        return (
            CosineAnnealingWarmRestarts(
                optimizer, T_0=cfg["restart_epochs"] * steps_per_epoch, T_mult=cfg["restart_mult"], eta_min=eta_min
            ),
            "step",
        )
    if kind == "plateau":
        return (
            ReduceLROnPlateau(
                optimizer,
                mode=mode,
                factor=cfg["plateau_factor"],
                patience=cfg["plateau_patience"],
                threshold=cfg["early_stopping"]["min_delta"],
                threshold_mode="abs",
                min_lr=[g["lr"] * MIN_LR_RATIO for g in optimizer.param_groups],
            ),
            "epoch",
        )
    return None, None


def _group_lrs(optimizer) -> dict[str, float]:
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def _head_loss_weights(cfg: dict, head_names: list[str]) -> list[float] | None:
    weights = cfg["head_loss_weights"]
    if weights is None:
        return None
    unknown = sorted(set(weights) - set(head_names))
    if unknown:
        raise ValueError(
            f"config 'head_loss_weights': unknown head(s) {', '.join(map(repr, unknown))}; "
            f"the heads of this manifest are {', '.join(map(repr, head_names))}"
        )
    out = [float(weights.get(name, 1.0)) for name in head_names]
    if not any(w > 0 for w in out):
        raise ValueError("config 'head_loss_weights': every head has weight 0, nothing would be trained")
    return out


def _check_metric(metric: str, head_names: list[str]) -> None:
    if metric.startswith("top1:") and metric[5:] not in head_names:
        raise ValueError(
            f"config 'early_stopping.metric': {metric!r} names no head of this manifest; "
            f"use 'primary', 'val_loss' or one of {', '.join(repr('top1:' + n) for n in head_names)}"
        )


def _metric_value(result: dict, metric: str) -> float | None:
    if metric == "val_loss":
        return result["loss"]
    if metric == "primary":
        return result["primary"]
    return result["heads"][metric[5:]]["top1"]


def _judge(value, loss, best: dict | None, mode: str, min_delta: float) -> tuple[bool, bool]:
    """(improved, selected) for an epoch with metric `value` and val `loss` against the best epoch so far.

    improved (resets the early-stopping counter): better than the best value by more than min_delta.
    selected (becomes the best epoch): any improvement; for accuracies also an equal value with a lower loss.
    An epoch without a value (no labelled val item) is only selected when the best has none either."""
    if best is None:
        return value is not None, True
    best_value, best_loss = best["value"], best["loss"]
    if value is None:
        return False, best_value is None
    if best_value is None:
        return True, True
    if mode == "min":
        return value < best_value - min_delta, value < best_value
    tie_better = value >= best_value and loss is not None and (best_loss is None or loss < best_loss)
    return value > best_value + min_delta, value > best_value or tie_better


# ----------------------------------------------------------------------------------- checkpoints & RNG
def _rng_state(generator: torch.Generator) -> dict:
    """Python/numpy/torch (CPU, CUDA) RNG states and the train DataLoader generator's state (which gives the
    shuffle order and the workers' base seed). Taken after each epoch's evaluation and restored at the start of
    the next epoch (from the checkpoint when resuming), so an epoch's data order and augmentations are the same
    whether or not the run was interrupted, and whatever progress() did with the RNGs in between."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [str(np_state[0]), np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    generator.set_state(state["loader"])


def checkpoint_fingerprint(parsed: ParsedManifest, cfg: dict) -> str:
    """sha256 of the train/val items, the heads and the config without RUNTIME_KEYS: a checkpoint is only
    resumed by a run that would compute the same thing."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "heads": parsed.heads,
        "train": [[it.id, it.path, list(it.targets)] for it in parsed.train],
        "val": [[it.id, it.path, list(it.targets)] for it in parsed.val],
        "config": {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS},
    }
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _clear_checkpoints(ckpt_dir: Path) -> None:
    if not ckpt_dir.is_dir():
        return
    for path in ckpt_dir.iterdir():
        name = path.name
        if path.is_file() and (
            name in ("latest.pt", "best.pt") or (name.startswith("epoch-") and name.endswith(".pt")) or ".tmp-" in name
        ):
            path.unlink()


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint at `path` if it exists, is readable and has `fingerprint`; None otherwise (logged)."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file must not block a new run
        log.warning("cannot read checkpoint %s (%s: %s): starting fresh", path, type(exc).__name__, exc)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s is not a Loupe checkpoint (%s): starting fresh", path, CHECKPOINT_FORMAT)
        return None
    if ckpt.get("fingerprint") != fingerprint:
        log.warning(
            "checkpoint %s was written for other data or another config (fingerprint mismatch): not resuming it; "
            "starting fresh and replacing the old checkpoints",
            path,
        )
        return None
    return ckpt


def _fits(ckpt: dict, model, optimizer) -> str | None:
    """Why the checkpoint's tensors do not fit the freshly built model/optimizer, or None."""
    own = model.state_dict()
    theirs = ckpt["model"]
    if set(own) != set(theirs):
        return "model parameter names differ"
    bad = [k for k, v in own.items() if tuple(v.shape) != tuple(theirs[k].shape)]
    if bad:
        return f"model shapes differ ({bad[0]})"
    groups = ckpt["optimizer"].get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return "optimizer parameter groups differ"
    return None


def class_weights(targets: list[tuple[int, ...]], head_sizes: list[int], mode: str) -> list[torch.Tensor | None]:
    """Per-head loss weights from the train counts: "inverse" gives N / (K * n_c) (a balanced loss), "sqrt_inverse"
    the square root of that (milder); classes absent from train get weight 0. None for mode "none"."""
    if mode == "none":
        return [None] * len(head_sizes)
    out = []
    for h, k in enumerate(head_sizes):
        counts = torch.zeros(k, dtype=torch.float64)
        for t in targets:
            if t[h] != IGNORE_INDEX:
                counts[t[h]] += 1
        present = counts > 0
        w = torch.zeros(k, dtype=torch.float64)
        if present.any():
            w[present] = counts.sum() / (present.sum() * counts[present])
            if mode == "sqrt_inverse":
                w[present] = w[present].sqrt()
        out.append(w.float())
    return out


def _heads_loss(
    logits: list[torch.Tensor],
    y: torch.Tensor,
    label_smoothing: float,
    weights: list | None = None,
    head_weights: list[float] | None = None,
    *,
    model=None,
    embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over heads of the (class-weighted) mean cross-entropy over the samples whose label is known, each
    head's term multiplied by its head_weights entry (default 1). The ArcFace head of `model` (if any) uses the
    ArcFace loss on `embeddings` instead (float32, margin as currently set on the model)."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    arc = getattr(model, "arcface_head", None)
    for h, lg in enumerate(logits):
        hw = 1.0 if head_weights is None else head_weights[h]
        if hw == 0:
            continue
        yh = y[:, h]
        known = yh != IGNORE_INDEX
        if h == arc:
            if known.any():
                total = total + model.arcface(embeddings[known].float(), yh[known]) * hw
            continue
        w = weights[h] if weights else None
        if w is None:
            n = known.sum().clamp_min(1)
        else:
            w = w.to(lg.device)
            n = w[yh[known]].sum().clamp_min(1e-6)
        ce = F.cross_entropy(
            lg.float(), yh, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
        )
        total = total + ce / n * hw
    return total


# -------------------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate(
    model,
    loader,
    head_names: list[str],
    head_sizes: list[int],
    device,
    autocast_ctx,
    on_bad: Callable[[list, str], None],
    mean,
    std,
) -> dict:
    """Per head top-1/top-5 accuracy and mean CE over known labels; loss = sum over heads of the mean CE."""
    model.eval()
    n_heads = len(head_names)
    correct1 = torch.zeros(n_heads, dtype=torch.long)
    correct5 = torch.zeros(n_heads, dtype=torch.long)
    counts = torch.zeros(n_heads, dtype=torch.long)
    ce_sum = torch.zeros(n_heads, dtype=torch.float64)
    class_n = [torch.zeros(k, dtype=torch.long) for k in head_sizes]
    class_ok = [torch.zeros(k, dtype=torch.long) for k in head_sizes]
    for x, y, _idx, bad in loader:
        on_bad(bad, "eval")
        if x is None:
            continue
        x = normalize_batch(x.to(device, non_blocking=True), mean, std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx():
            logits, _ = model(x)
        for h, lg in enumerate(logits):
            lg = lg.float().cpu()
            yh = y[:, h]
            mask = yh != IGNORE_INDEX
            if not mask.any():
                continue
            lg, yh = lg[mask], yh[mask]
            k = min(5, head_sizes[h])
            topk = lg.topk(k, dim=1).indices
            hit = topk[:, 0] == yh
            correct1[h] += hit.sum()
            class_n[h] += torch.bincount(yh, minlength=head_sizes[h])
            class_ok[h] += torch.bincount(yh[hit], minlength=head_sizes[h])
            correct5[h] += (topk == yh[:, None]).any(dim=1).sum()
            counts[h] += yh.numel()
            ce_sum[h] += F.cross_entropy(lg, yh, reduction="sum").double()
    heads = {}
    losses = []
    for h, name in enumerate(head_names):
        n = int(counts[h])
        heads[name] = {
            "top1": float(correct1[h]) / n if n else None,
            "top5": float(correct5[h]) / n if n else None,
            "n_val": n,
            "per_class_counts": (class_n[h].tolist(), class_ok[h].tolist()),
        }
        if n:
            losses.append(float(ce_sum[h]) / n)
    return _evaluation(heads, losses)


def _evaluation(heads: dict, losses: list[float]) -> dict:
    """An evaluation result: per-head metrics, primary = mean top-1 over heads with one, loss = summed head losses."""
    top1s = [m["top1"] for m in heads.values() if m["top1"] is not None]
    return {
        "heads": heads,
        "primary": sum(top1s) / len(top1s) if top1s else None,
        "loss": sum(losses) if losses else None,
    }


# ------------------------------------------------------------------------------------------------- train
def train_model(
    manifest: dict,
    config: dict | None,
    out_dir,
    *,
    progress: Callable[[dict], None] | None = None,
    resume: bool = True,
    fresh: bool = False,
    cache_dir=None,
) -> dict:
    """Train on the manifest's "train" items, select the best epoch on "val", write the artifacts into
    out_dir (model.pt, label_maps.json, metrics.json, config.json, each atomically) and return the metrics.

    Items of split "test" are never read. Unreadable image files are skipped (logged, counted in
    metrics["skipped_files"]). A bad manifest or config raises ValueError before any training. An exception
    raised by `progress` aborts training (use it to cancel) and propagates; no artifact is written then, but
    the checkpoints of the finished epochs are on disk (out_dir/checkpoints/).

    resume (default): continue from out_dir/checkpoints/latest.pt when it was written for the same manifest
    and config (runtime-only keys such as num_workers or device may differ); a mismatching checkpoint is
    ignored with a warning. The resumed run ends in the same state as an uninterrupted one. fresh=True deletes
    existing checkpoints and starts from scratch; resume=False starts from scratch without reading them.

    cache_dir (a feature cache folder, features.py): when phase 1 freezes the whole pretrained backbone
    (freeze_backbone_epochs > 0, freeze_fraction 1.0, weights not "none"), phase 1 is the quick retrain's
    train_heads on cached features of the train split (best epoch on val) instead of freeze_backbone_epochs
    epochs of backbone passes over augmented photos; training then goes on with phase 2 at epoch
    freeze_backbone_epochs + 1 (metrics["phase1"] says so). Without it, phase 1 trains on the photos."""
    t_start = time.monotonic()
    cfg = resolve_config(config)
    if cfg["tail_from_block"] is not None:  # the CPU recipe (presets set it to null on CUDA workers)
        from .tail import train_tail  # noqa: PLC0415 - tail imports this module

        return train_tail(manifest, config, out_dir, cache_dir=cache_dir, progress=progress, fresh=fresh)
    parsed = parse_manifest(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg["device"])
    num_workers = resolve_num_workers(cfg["num_workers"])
    seed_everything(cfg["seed"])

    prev_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(resolve_torch_threads(cfg["torch_threads"], num_workers))
    prev_cuda_flags = None
    if device.type == "cuda":  # TF32 matmuls/convolutions and cuDNN autotuning: free speed on Ampere+
        prev_cuda_flags = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    try:
        sources = manifest_train_sources(manifest)
        feature_items = None
        if cache_dir is not None:  # manifest dicts keep their "sha256" (the cache key without re-hashing the file)
            by_key = {(it.get("id"), it["path"]): it for it in manifest["items"]}
            feature_items = [by_key.get((it.id, it.path), {"path": it.path}) for it in parsed.train + parsed.val]
        return _train(
            parsed,
            cfg,
            out_dir,
            device,
            num_workers,
            progress,
            t_start,
            resume=resume,
            fresh=fresh,
            sources=sources,
            cache_dir=cache_dir,
            feature_items=feature_items,
        )
    finally:
        torch.set_num_threads(prev_threads)
        if prev_cuda_flags is not None:
            (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark,
            ) = prev_cuda_flags


def _train(
    parsed,
    cfg,
    out_dir: Path,
    device: torch.device,
    num_workers: int,
    progress,
    t_start: float,
    *,
    resume,
    fresh,
    sources: list[str] | None = None,
    cache_dir=None,
    feature_items: list[dict] | None = None,
) -> dict:
    head_names = parsed.head_names
    head_sizes = [len(h["classes"]) for h in parsed.heads]
    head_weights = _head_loss_weights(cfg, head_names)  # ValueError before any work
    es = cfg["early_stopping"]
    metric = es["metric"]
    _check_metric(metric, head_names)
    mode = "min" if metric == "val_loss" else "max"
    model, info = build_model(cfg, parsed.heads)  # may raise ValueError (pretrained_path)
    mean, std = info["mean"], info["std"]
    # Every progress call says where the backbone's weights came from, so the run's row shows it from the start.
    weights = {"source": info["pretrained_source"], "detail": info["pretrained_detail"]}
    is_cuda = device.type == "cuda"
    model.to(device)
    if is_cuda:
        model.to(memory_format=torch.channels_last)
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

        def autocast_ctx():
            return torch.autocast(device_type="cuda", dtype=amp_dtype)
    else:
        amp_dtype = None
        scaler = None

        def autocast_ctx():
            return nullcontext()

    use_scaler = scaler is not None and scaler.is_enabled()

    # ---- data
    n_train = len(parsed.train)
    bs = min(cfg["batch_size"], n_train)
    gen = torch.Generator()
    gen.manual_seed(cfg["seed"])
    loader_kw = dict(
        num_workers=num_workers,
        collate_fn=collate_skip,
        pin_memory=is_cuda,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,  # keep several batches decoded ahead of the model
    )
    train_ds = ManifestDataset(parsed.train, train_transform(cfg), min_side=draft_size(cfg["image_size"], 1.5))
    # Train workers are not persistent: each epoch's workers are seeded from `gen`, whose state is restored at each
    # epoch start (see _rng_state), so their augmentations are reproducible after a resume too.
    sampler, sampler_kind = build_train_sampler(
        sources or ["real"] * n_train, [it.targets[0] for it in parsed.train], cfg, seed=cfg["seed"]
    )
    if sampler_kind == "pk":
        train_loader = DataLoader(train_ds, batch_sampler=sampler, generator=gen, **loader_kw)
    elif sampler_kind == "weighted":
        train_loader = DataLoader(
            train_ds, sampler=sampler, batch_size=bs, drop_last=n_train > bs, generator=gen, **loader_kw
        )
    else:
        train_loader = DataLoader(
            train_ds, batch_size=bs, shuffle=True, drop_last=n_train > bs, generator=gen, **loader_kw
        )
    metrics_on = "val" if parsed.val else "train"
    eval_items = parsed.val if parsed.val else parsed.train
    eval_ds = ManifestDataset(eval_items, eval_transform(cfg["image_size"]), min_side=draft_size(cfg["image_size"]))
    eval_loader = DataLoader(
        eval_ds,
        batch_size=max(1, cfg["batch_size"] * 2),
        shuffle=False,
        persistent_workers=num_workers > 0,
        **loader_kw,
    )
    if metrics_on == "train":
        log.warning("no val items: metrics are computed on the train split (optimistic)")

    # ---- optimisation
    epochs = cfg["epochs"]
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    accum = cfg["accumulate_steps"]
    opt_steps_per_epoch = math.ceil(steps_per_epoch / accum)
    freeze_epochs = cfg["freeze_backbone_epochs"]
    freezable, frozen_norms = (
        freezable_backbone_params(model, cfg["freeze_fraction"]) if freeze_epochs > 0 else ([], [])
    )
    optimizer = _make_optimizer(
        cfg, _param_groups(model, cfg["weight_decay"], cfg["lr"], freezable, cfg["unfreeze_lr_mult"]), is_cuda
    )
    scheduler, sched_when = _make_scheduler(cfg, optimizer, opt_steps_per_epoch, mode)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    skipped: dict[str, str] = {}
    split_items = {"train": parsed.train, "eval": eval_items}

    def on_bad(bad, which):
        for index, error in bad:
            path = split_items[which][index].path
            if path not in skipped:
                skipped[path] = error
                log.warning("skipping unreadable image %s (%s)", path, error)

    n_known = [sum(1 for it in parsed.train if it.targets[h] != IGNORE_INDEX) for h in range(len(head_names))]
    loss_weights = class_weights([it.targets for it in parsed.train], head_sizes, cfg["class_weighting"])
    for name, n in zip(head_names, n_known, strict=True):
        if n == 0:
            log.warning("head %r has no labelled train item: it will not learn anything", name)
    if freeze_epochs >= epochs:
        log.warning("freeze_backbone_epochs=%d >= epochs=%d: the backbone is never trained", freeze_epochs, epochs)

    # ---- state (fresh or from a checkpoint)
    history: list[dict] = []
    best: dict | None = None  # {"epoch", "value", "loss", "result"}
    best_state: dict | None = None
    bad_epochs = 0
    stopped_early = None
    global_step = 0  # train batches
    optimizer_steps = 0
    trained_samples_total = 0
    start_epoch = 1
    resumed_from = None
    phase1 = None  # {"on": "feature-cache", ...} when phase 1 trained the heads on cached features
    rng_snapshot = None  # RNG states to restore at the next epoch's start
    ckpt_dir = out_dir / CHECKPOINT_DIR
    fingerprint = checkpoint_fingerprint(parsed, cfg)
    ckpt = None
    if fresh:
        _clear_checkpoints(ckpt_dir)
    elif resume:
        ckpt = _load_checkpoint(ckpt_dir / "latest.pt", fingerprint)
        why = _fits(ckpt, model, optimizer) if ckpt is not None else None
        if why:
            log.warning("checkpoint %s does not fit this model (%s): starting fresh", ckpt_dir / "latest.pt", why)
            ckpt = None
        if ckpt is None:
            _clear_checkpoints(ckpt_dir)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        # The checkpoint may come from another device: keep this run's "fused" setting (it also decides where
        # load_state_dict puts AdamW's step counters).
        fused = optimizer.param_groups[0].get("fused")
        opt_state = dict(ckpt["optimizer"])
        opt_state["param_groups"] = [{**g, "fused": fused} if "fused" in g else g for g in opt_state["param_groups"]]
        optimizer.load_state_dict(opt_state)
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if use_scaler and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        history = list(ckpt["history"])
        best = ckpt["best"]
        best_state = ckpt["model"] if ckpt["best_model"] is None else ckpt["best_model"]
        bad_epochs = ckpt["bad_epochs"]
        stopped_early = ckpt["stopped_early"]
        global_step = ckpt["global_step"]
        optimizer_steps = ckpt["optimizer_steps"]
        trained_samples_total = ckpt["trained_samples_total"]
        skipped.update(ckpt["skipped"])
        t_start -= ckpt["elapsed_s"]
        rng_snapshot = ckpt["rng"]
        phase1 = ckpt.get("phase1")
        resumed_from = ckpt["epoch"]
        start_epoch = resumed_from + 1
        if stopped_early == "time_limit" and (
            cfg["max_train_seconds"] is None or ckpt["elapsed_s"] < cfg["max_train_seconds"]
        ):
            stopped_early = None  # more time now: go on
        if start_epoch > epochs or stopped_early:
            log.info("checkpoint %s: training had finished at epoch %d", ckpt_dir / "latest.pt", resumed_from)
        else:
            log.info(
                "resuming from checkpoint %s: epoch %d done, continuing at epoch %d",
                ckpt_dir,
                resumed_from,
                start_epoch,
            )
        del ckpt
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    step_time = 0.0
    steps_done = 0
    eval_time = 0.0
    last_progress = time.monotonic()
    max_s = cfg["max_train_seconds"]

    def eta(epoch: int, step: int) -> float:
        per_step = step_time / max(1, steps_done)
        remaining_steps = total_steps - ((epoch - 1) * steps_per_epoch + step)
        remaining_evals = epochs - epoch + (1 if step < steps_per_epoch else 0)
        value = per_step * remaining_steps + eval_time * remaining_evals
        if max_s is not None:
            value = min(value, max(0.0, max_s - (time.monotonic() - t_start)))
        return float(value)

    def optimizer_step() -> None:
        if use_scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def save_checkpoints(epoch: int, is_best: bool) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "epoch": epoch,
            "global_step": global_step,
            "optimizer_steps": optimizer_steps,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if use_scaler else None,
            "best": best,
            "best_model": None if best["epoch"] == epoch else best_state,
            "history": history,
            "bad_epochs": bad_epochs,
            "stopped_early": stopped_early,
            "trained_samples_total": trained_samples_total,
            "skipped": dict(skipped),
            "elapsed_s": time.monotonic() - t_start,
            "rng": rng_snapshot,
            "phase1": phase1,
        }
        latest = ckpt_dir / "latest.pt"
        _atomic_write_bytes_via(latest, lambda tmp: torch.save(state, tmp))
        copies = []
        if is_best:
            copies.append(ckpt_dir / "best.pt")
        every = cfg["checkpoint_every"]
        if every and epoch % every == 0:
            copies.append(ckpt_dir / f"epoch-{epoch:03d}.pt")
        for path in copies:
            _atomic_write_bytes_via(path, lambda tmp: shutil.copyfile(latest, tmp))

    amp_name = "off" if amp_dtype is None else ("bf16" if amp_dtype == torch.bfloat16 else "fp16 + GradScaler")
    log.info(
        "training %s on %s: %d train / %d val items, %d heads, %d epochs x %d steps, workers=%d",
        cfg["backbone"],
        device,
        n_train,
        len(parsed.val),
        len(head_names),
        epochs,
        steps_per_epoch,
        num_workers,
    )
    log.info(
        "optimizer=%s lr=%g weight_decay=%g, scheduler=%s, accumulate_steps=%d (effective batch %d), "
        "freeze_backbone_epochs=%d%s, early_stopping=%s (patience %s), amp=%s, device=%s",
        cfg["optimizer"]
        + (
            f" (momentum {cfg['momentum']:g}{', nesterov' if cfg['momentum'] > 0 else ''})"
            if cfg["optimizer"] == "sgd"
            else ""
        ),
        cfg["lr"],
        cfg["weight_decay"],
        cfg["scheduler"],
        accum,
        bs * accum,
        freeze_epochs,
        f" (fraction {cfg['freeze_fraction']:g}, then lr x{cfg['unfreeze_lr_mult']:g})" if freeze_epochs else "",
        metric,
        es["patience"],
        amp_name,
        device,
    )
    whole_backbone = len(freezable) == sum(1 for _ in model.backbone.parameters())
    if (
        cache_dir is not None
        and freeze_epochs > 0
        and whole_backbone
        and info["pretrained_source"] != "none"
        and start_epoch == 1
        and not stopped_early
    ):
        # Phase 1 on cached features: the frozen backbone's features do not change during phase 1, so the heads
        # train on them (seconds once the cache is warm) instead of freeze_epochs epochs of backbone passes.
        from .features import cached_features  # noqa: PLC0415 - quick/features import this module
        from .quick import train_heads  # noqa: PLC0415

        t_p1 = time.monotonic()

        feature_progress = features_progress(progress, epochs=epochs, weights=weights)

        feats = cached_features(feature_items, cfg, cache_dir, progress=feature_progress)
        p1_items = parsed.train + parsed.val
        Y = np.array([it.targets for it in p1_items], dtype=np.int64).reshape(len(p1_items), len(head_names))
        is_train = np.arange(len(p1_items)) < n_train
        tr, va = feats.ok & is_train, feats.ok & ~is_train
        for it, ok in zip(p1_items, feats.ok, strict=True):
            if not ok and it.path not in skipped:
                skipped[it.path] = "cannot be read (feature cache)"
                log.warning("skipping unreadable image %s", it.path)
        if not tr.any():
            first = next(iter(skipped.items()), None)
            raise ValueError(
                f"none of the {n_train} train images could be read"
                + (f" (e.g. {first[0]}: {first[1]})" if first else "")
            )
        # The ArcFace margin stays at its warm-up value for all of phase 1, as on the photos.
        fit = train_heads(
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
        trained_samples_total += int(tr.sum()) * len(fit["history"])
        result = fit["best"]["result"]
        value = _metric_value(result, metric)
        phase1 = {
            "on": "feature-cache",
            "seconds": round(time.monotonic() - t_p1, 3),
            "epochs": len(fit["history"]),
            "best_epoch": fit["best"]["epoch"],
            "replaces_epochs": freeze_epochs,
            "cache": {k: feats.stats[k] for k in ("hits", "misses", "failed", "seconds")},
        }
        best_fit = fit["history"][fit["best"]["epoch"] - 1]
        history.append(
            {
                "epoch": freeze_epochs,
                "train_loss": best_fit["train_loss"],
                "val_loss": result["loss"],
                "heads": {
                    n: {k: v for k, v in m.items() if k != "per_class_counts"} for n, m in result["heads"].items()
                },
                "primary": result["primary"],
                "lr": cfg["lr"],
                "lrs": {"heads": cfg["lr"]},
                "backbone_frozen": True,
                "arcface_margin": best_fit["arcface_margin"],
                "seconds": phase1["seconds"],
                "steps": sum(h["steps"] for h in fit["history"]),
                "phase1": "feature-cache",
            }
        )
        best = {"epoch": freeze_epochs, "value": value, "loss": result["loss"], "result": result}
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        # Phase 2 starts where it would after phase 1 on the photos: the lr schedule moves past phase 1's steps.
        if sched_when == "step":
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step was due
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(freeze_epochs * opt_steps_per_epoch):
                    scheduler.step()
            optimizer_steps += freeze_epochs * opt_steps_per_epoch
        elif sched_when == "epoch":
            scheduler.step(value if value is not None else (math.inf if mode == "min" else -math.inf))
        if max_s is not None and time.monotonic() - t_start > max_s:
            stopped_early = "time_limit"
            log.warning("max_train_seconds=%s reached during phase 1: stopping", max_s)
        rng_snapshot = _rng_state(gen)
        save_checkpoints(freeze_epochs, True)  # a resumed run starts with phase 2
        start_epoch = freeze_epochs + 1
        log.info(
            "phase 1 on cached features: heads trained %d epochs (best %d, %s %s) in %.1fs, cache %d hits / %d "
            "computed; continuing at epoch %d with the whole network",
            phase1["epochs"],
            phase1["best_epoch"],
            metric,
            _fmt(value),
            phase1["seconds"],
            feats.stats["hits"],
            feats.stats["misses"],
            start_epoch,
        )
        if progress is not None:
            progress(
                {
                    **epoch_progress(
                        epoch=freeze_epochs,
                        epochs=epochs,
                        steps_per_epoch=steps_per_epoch,
                        train_loss=best_fit["train_loss"],
                        result=result,
                        metrics_on=metrics_on,
                        eta_s=0.0 if stopped_early else eta(start_epoch, 0),
                    ),
                    "pretrained": weights,
                }
            )
            last_progress = time.monotonic()
    epoch_range = range(start_epoch, epochs + 1) if not stopped_early else range(0)
    for epoch in epoch_range:
        if rng_snapshot is not None:
            _set_rng_state(rng_snapshot, gen)
        if sampler is not None:
            sampler.set_epoch(epoch)  # the epoch's draw is a pure function of (seed, epoch): exact resume
        frozen = epoch <= freeze_epochs
        for p in freezable:
            p.requires_grad_(not frozen)
        if getattr(model, "arcface_head", None) is not None:  # the seed's two phases: margin 0, then the target
            model.set_arcface_margin(cfg["arcface_warmup_margin"] if frozen else cfg["arcface_margin"])
        model.train()
        if frozen:
            for m in frozen_norms:
                m.eval()
        elif freeze_epochs and epoch == freeze_epochs + 1:
            log.info("epoch %d: backbone unfrozen (lr x%g)", epoch, cfg["unfreeze_lr_mult"])
        t_epoch = time.monotonic()
        loss_sum, loss_n, samples_epoch = 0.0, 0, 0
        step = 0
        pending = False  # gradients accumulated since the last optimizer step
        epoch_lrs = _group_lrs(optimizer)
        optimizer.zero_grad(set_to_none=True)
        t_step = time.monotonic()
        for step, (x, y, _idx, bad) in enumerate(train_loader, 1):
            on_bad(bad, "train")
            global_step += 1
            if x is not None and not (has_bn and x.shape[0] < 2):
                x = normalize_batch(x.to(device, non_blocking=True), mean, std)
                y = y.to(device, non_blocking=True)
                if is_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_ctx():
                    logits, feats = model(x)
                loss = _heads_loss(
                    logits, y, cfg["label_smoothing"], loss_weights, head_weights, model=model, embeddings=feats
                )
                group_start = (step - 1) // accum * accum + 1
                group_len = min(accum, steps_per_epoch - group_start + 1)
                scaled = loss / group_len if group_len > 1 else loss
                if use_scaler:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
                pending = True
                loss_sum += float(loss.detach())
                loss_n += 1
                samples_epoch += x.shape[0]
            now = time.monotonic()
            time_up = max_s is not None and now - t_start > max_s
            if step % accum == 0 or step == steps_per_epoch or time_up:
                epoch_lrs = _group_lrs(optimizer)  # the lr of the epoch's last optimizer step is recorded
                if pending:
                    optimizer_step()
                    pending = False
                else:  # no gradient in this group (unreadable or size-1 batches): a no-op that keeps the
                    optimizer.step()  # scheduler's step bookkeeping in order
                optimizer_steps += 1
                if sched_when == "step":
                    scheduler.step()
            now = time.monotonic()
            step_time += now - t_step
            t_step = now
            steps_done += 1
            if (
                progress is not None
                and step < steps_per_epoch
                and not time_up
                and (step % cfg["progress_every"] == 0 or now - last_progress >= PROGRESS_MIN_INTERVAL_S)
            ):
                progress(
                    {
                        "phase": "train",
                        "epoch": epoch,
                        "epochs": epochs,
                        "step": step,
                        "steps_per_epoch": steps_per_epoch,
                        "loss": loss_sum / max(1, loss_n),
                        "metrics": {},
                        "eta_s": eta(epoch, step),
                        "lr": _group_lrs(optimizer).get("heads"),
                        "pretrained": weights,
                    }
                )
                last_progress = time.monotonic()
                t_step = last_progress
            if time_up:
                stopped_early = "time_limit"
                log.warning("max_train_seconds=%s reached during epoch %d step %d: stopping", max_s, epoch, step)
                break
        optimizer.zero_grad(set_to_none=True)
        trained_samples_total += samples_epoch
        if epoch == 1 and trained_samples_total == 0 and stopped_early is None:
            first = next(iter(skipped.items()), None)
            raise ValueError(
                f"none of the {n_train} train images could be read"
                + (f" (e.g. {first[0]}: {first[1]})" if first else "")
            )
        t_eval = time.monotonic()
        result = evaluate(model, eval_loader, head_names, head_sizes, device, autocast_ctx, on_bad, mean, std)
        eval_time = time.monotonic() - t_eval
        train_loss = loss_sum / loss_n if loss_n else None
        rng_snapshot = _rng_state(gen)
        value = _metric_value(result, metric)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": result["loss"],
            "heads": {n: {k: v for k, v in m.items() if k != "per_class_counts"} for n, m in result["heads"].items()},
            "primary": result["primary"],
            "lr": epoch_lrs.get("heads"),
            "lrs": epoch_lrs,
            "backbone_frozen": bool(frozen and freezable),
            "arcface_margin": (
                round(math.degrees(model.arcface.margin), 4)
                if getattr(model, "arcface_head", None) is not None
                else None
            ),
            "seconds": round(time.monotonic() - t_epoch, 3),
            "steps": step,
        }
        history.append(record)
        improved, selected = _judge(value, result["loss"], best, mode, es["min_delta"])
        if improved:
            bad_epochs = 0
        elif value is not None:
            bad_epochs += 1
        if selected:
            best = {"epoch": epoch, "value": value, "loss": result["loss"], "result": result}
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if sched_when == "epoch":
            scheduler.step(value if value is not None else (math.inf if mode == "min" else -math.inf))
        if es["patience"] is not None and bad_epochs >= es["patience"] and not stopped_early and epoch < epochs:
            stopped_early = "early_stopping"
            log.info(
                "early stopping after epoch %d: %s has not improved for %d epochs (best %s at epoch %d)",
                epoch,
                metric,
                bad_epochs,
                _fmt(best["value"]),
                best["epoch"],
            )
        save_checkpoints(epoch, selected)  # before progress(): a cancelled run can resume from here
        log.info(
            "epoch %d/%d: train loss %s, %s loss %s, mean top1 %s (%.1fs)",
            epoch,
            epochs,
            _fmt(train_loss),
            metrics_on,
            _fmt(result["loss"]),
            _fmt(result["primary"]),
            record["seconds"],
        )
        if progress is not None:
            progress(
                {
                    **epoch_progress(
                        epoch=epoch,
                        epochs=epochs,
                        steps_per_epoch=steps_per_epoch,
                        train_loss=train_loss,
                        result=result,
                        metrics_on=metrics_on,
                        eta_s=0.0 if stopped_early else eta(epoch, steps_per_epoch),
                    ),
                    "pretrained": weights,
                }
            )
            last_progress = time.monotonic()
        if stopped_early:
            break

    best_epoch, best_result = best["epoch"], best["result"]
    label_maps = parsed.label_maps
    metrics = {
        "heads": {
            name: _with_per_class(best_result["heads"][name], parsed.heads[h]["classes"], n_known[h])
            for h, name in enumerate(head_names)
        },
        "primary": best_result["primary"],
        "best_epoch": best_epoch,
        "selection_metric": metric,
        "history": history,
        "n_train": n_train,
        "n_val": len(parsed.val),
        "n_test": parsed.n_test,
        "metrics_on": metrics_on,
        "skipped_files": len(skipped),
        "skipped_paths": sorted(skipped)[:100],
        "device": str(device),
        "backbone": cfg["backbone"],
        "pretrained_source": info["pretrained_source"],
        "pretrained_detail": info["pretrained_detail"],
        "embedding_dim": info["embedding_dim"],
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "seconds": None,
    }
    if resumed_from is not None:
        metrics["resumed_from_epoch"] = resumed_from
    if phase1 is not None:
        metrics["phase1"] = phase1
    if cfg["eval_report"]:
        try:
            model.load_state_dict(best_state)
            _final_report(
                model,
                parsed,
                cfg,
                out_dir,
                metrics,
                eval_loader,
                eval_items,
                device,
                autocast_ctx,
                mean,
                std,
                loader_kw,
            )
        except Exception as exc:  # noqa: BLE001 - a failed report must not lose the trained model
            log.exception("evaluation report failed")
            metrics["report_error"] = f"{type(exc).__name__}: {exc}"[:1000]
    artifact = {
        "format": ARTIFACT_FORMAT,
        "config": cfg,
        "heads": parsed.heads,
        "label_maps": label_maps,
        "state_dict": best_state,
        "embedding_dim": info["embedding_dim"],
        "mean": mean,
        "std": std,
        "best_epoch": best_epoch,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    _atomic_write_bytes_via(out_dir / "model.pt", lambda tmp: torch.save(artifact, tmp))
    write_json_atomic(out_dir / "label_maps.json", label_maps)
    write_json_atomic(out_dir / "config.json", cfg)
    metrics["seconds"] = round(time.monotonic() - t_start, 3)
    metrics = _clean(metrics)
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("best epoch %d, %s %s, written to %s", best_epoch, metric, _fmt(best["value"]), out_dir)
    return metrics


@torch.inference_mode()
def _predict_all(model, loader, device, autocast_ctx, mean, std, n: int, heads: list[dict]):
    """Logits per head (n, K) float32, targets (n, H) int64 and L2-normalised embeddings (n, D) of a loader in
    order; rows of unreadable files stay NaN (logits/embeddings) and IGNORE_INDEX (targets)."""
    model.eval()
    logits_out = [np.full((n, len(h["classes"])), np.nan, dtype=np.float32) for h in heads]
    targets = np.full((n, len(heads)), IGNORE_INDEX, dtype=np.int64)
    emb = None
    for x, y, idx, _bad in loader:
        if x is None:
            continue
        x = normalize_batch(x.to(device, non_blocking=True), mean, std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx():
            logits, feats = model(x)
        rows = np.asarray(idx)
        for h, lg in enumerate(logits):
            logits_out[h][rows] = lg.float().cpu().numpy()
        targets[rows] = y.numpy()
        e = F.normalize(feats.float(), dim=1).cpu().numpy()
        if emb is None:
            emb = np.full((n, e.shape[1]), np.nan, dtype=np.float32)
        emb[rows] = e
    return logits_out, targets, emb


def _final_report(model, parsed, cfg, out_dir, metrics, eval_loader, eval_items, device, autocast_ctx, mean, std, kw):
    """The best epoch's evaluation artifacts: per-class precision/recall and confusion per head (metrics.json +
    confusion_<head>.png), most-confused pairs, curves.png, retrieval Recall@1/5 + mAP against a Faiss gallery of
    the train split (metrics["retrieval"]) and report.md."""
    from . import report  # noqa: PLC0415

    heads = parsed.heads
    logits, targets, emb = _predict_all(model, eval_loader, device, autocast_ctx, mean, std, len(eval_items), heads)
    images, head_reports = write_head_reports(metrics, heads, logits, targets, out_dir)
    retrieval = None
    if cfg["eval_retrieval"] and parsed.val and emb is not None:
        gallery_ds = ManifestDataset(parsed.train, eval_transform(cfg["image_size"]), draft_size(cfg["image_size"]))
        gallery_loader = DataLoader(gallery_ds, batch_size=max(1, cfg["batch_size"] * 2), shuffle=False, **kw)
        _g_logits, g_targets, g_emb = _predict_all(
            model, gallery_loader, device, autocast_ctx, mean, std, len(parsed.train), heads
        )
        retrieval = {}
        ok_q = ~np.isnan(emb).any(axis=1)
        ok_g = ~np.isnan(g_emb).any(axis=1) if g_emb is not None else None
        for h, head in enumerate(heads):
            if ok_g is None or not ok_g.any():
                break
            retrieval[head["name"]] = report.retrieval_report(
                g_emb[ok_g], g_targets[ok_g, h], emb[ok_q], targets[ok_q, h]
            )
        metrics["retrieval"] = retrieval
    metrics["report_images"] = images
    leaf = leaf_head(heads)  # model, part, sku
    report.write_report_md(
        out_dir / "report.md",
        metrics=metrics,
        heads=head_reports,
        retrieval=(retrieval or {}).get(leaf),
        images=images,
        config=cfg,
    )


def _with_per_class(head_metrics: dict, classes: list[str], n_train: int) -> dict:
    """Replace the raw per-class counts by {class: {n, correct, accuracy}} for classes seen in validation."""
    out = {k: v for k, v in head_metrics.items() if k != "per_class_counts"}
    ns, oks = head_metrics.get("per_class_counts", ([], []))
    out["per_class"] = {
        c: {"n": n, "correct": ok, "accuracy": ok / n} for c, n, ok in zip(classes, ns, oks, strict=False) if n
    }
    out["n_train"] = n_train
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
