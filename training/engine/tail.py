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
heads at lr (AdamW, warm-up then cosine), best epoch and early stopping on val, max_train_seconds; with ema_decay
each epoch is evaluated (and kept) with a moving average of the weights (timm's ModelEmaV3). The tail's
BatchNorm layers keep their ImageNet statistics (eval mode): batches of 64 maps of one small dataset would skew
them. The artifact folder is train_model's (model.pt is a whole LoupeNet), so export, calibration, the index and
the Recognizer work unchanged. Works for timm's EfficientNet/MobileNet-style backbones (conv_stem, bn1, blocks,
conv_head, bn2); others raise ValueError. A killed run keeps the maps (complete files only) and retrains from
phase 2's start; the maps are deleted once the artifact is written."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import TrainState
from .config import resolve_config
from .data import ManifestDataset, collate_skip, draft_size, eval_transform, normalize_batch, train_transform
from .epoch import _check_metric, _metric_value, cpu_state, select_epoch
from .features import Features, feature_threads, weights_fingerprint
from .losses import _head_loss_weights, _heads_loss, class_weights
from .manifest import IGNORE_INDEX, parse_manifest
from .model import LoupeNet, arcface_spec, backbone_stats
from .optim import _group_lrs, _lr_lambda, _param_groups
from .progress import Progress
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


@dataclass
class _Maps:
    """The cached maps (the prefix's outputs, float16, memory-mapped) in out_dir/tail-maps."""

    dir: Path
    centre: np.ndarray  # the eval transform's view of train + val, in item order
    train_views: list[np.ndarray]  # the train rows of `centre`, then tail_views - 1 augmented views of train
    val: np.ndarray  # the val rows of `centre`
    total: int  # maps in all (computed or reused)
    seconds: float


@dataclass
class _TailRun:
    """What the phases share: the config and manifest, the split backbone, the run's clock and state; phase 1 fills
    in the features, targets and the LoupeNet, _build_maps the maps."""

    cfg: dict
    parsed: object
    out_dir: Path
    k: int  # tail_from_block
    backbone: nn.Module
    weights: dict  # where the backbone's weights came from
    prefix: nn.Module
    tail: nn.Module
    feature_dim: int
    mean: list[float]
    std: list[float]
    clock: Progress
    state: TrainState
    head_weights: list[float] | None
    mode: str  # "min" or "max": the direction of the selection metric
    items: list  # train + val
    feats: Features | None = None
    Y: np.ndarray | None = None  # (len(items), heads) int64 targets, IGNORE_INDEX = unknown
    tr_ok: np.ndarray | None = None  # readable train rows of `items`
    va_ok: np.ndarray | None = None  # readable val rows of `items`
    model: LoupeNet | None = None
    metrics_on: str = "train"
    maps: _Maps | None = None

    @property
    def n_train(self) -> int:
        return len(self.parsed.train)


def _batching(cfg: dict, n_train: int) -> tuple[int, int]:
    """(batch size, steps per epoch) of phase 2: whole batches of shuffled train rows."""
    bs = min(n_train, max(2, int(cfg["batch_size"])))
    return bs, max(1, n_train // max(1, bs))


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
    parsed = parse_manifest(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head_weights = _head_loss_weights(cfg, parsed.head_names)
    _check_metric(cfg["early_stopping"]["metric"], parsed.head_names)
    seed_everything(cfg["seed"])
    workers = resolve_num_workers(cfg["num_workers"])
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(resolve_torch_threads(cfg["torch_threads"], workers))
    try:
        run = _start(cfg, parsed, out_dir, progress, t_start, head_weights)
        _phase1(run, manifest, Path(cache_dir) if cache_dir is not None else out_dir / "feature-cache")
        run.maps = _build_maps(run, workers, fresh)
        _phase2(run)
        metrics = _final_metrics(run)
        if cfg["eval_report"]:
            _eval_report(run, metrics)
        best = run.state.best
        metrics = write_artifact(out_dir, cfg, parsed, run.model, run.mean, run.std, best["epoch"], metrics, t_start)
        shutil.rmtree(run.maps.dir, ignore_errors=True)
        log.info(
            "tail fine-tune from block %d: best epoch %d of %d, %s %s, maps %.0fs, %.1fs, written to %s",
            run.k,
            best["epoch"],
            len(run.state.history),
            cfg["early_stopping"]["metric"],
            best["value"],
            run.maps.seconds,
            metrics["seconds"],
            out_dir,
        )
        return metrics
    finally:
        torch.set_num_threads(prev_threads)


def _start(cfg: dict, parsed, out_dir: Path, progress, t_start: float, head_weights) -> _TailRun:
    """The config's pretrained backbone split at tail_from_block (split_backbone), its feature size and
    normalisation, the run's clock (progress.Progress) and state."""
    k = int(cfg["tail_from_block"])
    backbone, weights = resolve_pretrained_backbone(
        cfg, "the tail fine-tune (tail_from_block)", "set tail_from_block: null (a whole-network fine-tune)"
    )
    prefix, tail = split_backbone(backbone, k)
    backbone.eval()
    feature_dim, mean, std = backbone_stats(backbone, cfg["image_size"])
    clock = Progress(
        progress,
        epochs=int(cfg["epochs"]),
        steps_per_epoch=_batching(cfg, len(parsed.train))[1],
        progress_every=cfg["progress_every"],
        max_s=cfg["max_train_seconds"],
        t_start=t_start,
        weights=weights,
    )
    return _TailRun(
        cfg=cfg,
        parsed=parsed,
        out_dir=out_dir,
        k=k,
        backbone=backbone,
        weights=weights,
        prefix=prefix,
        tail=tail,
        feature_dim=feature_dim,
        mean=mean,
        std=std,
        clock=clock,
        state=TrainState(t_start=t_start),
        head_weights=head_weights,
        mode="min" if cfg["early_stopping"]["metric"] == "val_loss" else "max",
        items=parsed.train + parsed.val,
    )


def _phase1(run: _TailRun, manifest: dict, cache: Path) -> None:
    """Phase 1: the heads on the frozen backbone's pooled features (the shared feature cache; the quick retrain's
    train_heads). Sets run.feats, Y, tr_ok, va_ok, metrics_on, state.phase1 and run.model (a LoupeNet with the
    backbone and those heads)."""
    cfg, parsed, items, n_train = run.cfg, run.parsed, run.items, run.n_train
    feats = manifest_features(
        manifest,
        parsed,
        cfg,
        cache,
        backbone=run.backbone,
        mean=run.mean,
        std=run.std,
        progress=run.clock.features(),
    )
    Y = np.array([it.targets for it in items], dtype=np.int64).reshape(len(items), len(parsed.head_names))
    is_train = np.arange(len(items)) < n_train
    tr_ok, va_ok = feats.ok & is_train, feats.ok & ~is_train
    if not tr_ok.any():
        raise ValueError(f"none of the {n_train} train images could be read")
    t1 = time.monotonic()
    fit1 = train_heads(feats.X[tr_ok], Y[tr_ok], feats.X[va_ok], Y[va_ok], parsed.heads, cfg)
    run.state.phase1 = {
        "on": "feature-cache",
        "epochs": len(fit1["history"]),
        "best_epoch": fit1["best"]["epoch"],
        "value": fit1["best"]["value"],
        "seconds": round(time.monotonic() - t1, 3),
        "cache": {k: feats.stats[k] for k in ("hits", "misses", "failed", "seconds")},
    }
    head_sizes = [len(h["classes"]) for h in parsed.heads]
    model = LoupeNet(run.backbone, run.feature_dim, head_sizes, arcface=arcface_spec(cfg, parsed.heads))
    missing, unexpected = model.load_state_dict(fit1["state_dict"], strict=False)
    if unexpected or any(not m.startswith("backbone.") for m in missing):
        raise RuntimeError(f"phase-1 heads do not fit the model: missing {missing}, unexpected {unexpected}")
    run.feats, run.Y, run.tr_ok, run.va_ok, run.model = feats, Y, tr_ok, va_ok, model
    run.metrics_on = "val" if parsed.val and va_ok.any() else "train"


def _build_maps(run: _TailRun, workers: int, fresh: bool) -> _Maps:
    """The maps: the centre view of train + val, and tail_views - 1 augmented views of train, one file each named by
    _maps_key (files of another key are deleted; fresh: all). Reported as the run's epoch-0 pass, like the feature
    pass."""
    cfg, items, n_train = run.cfg, run.items, run.n_train
    key = _maps_key(cfg, weights_fingerprint(run.backbone), run.k, items)
    maps_dir = run.out_dir / MAPS_DIR
    if fresh:
        shutil.rmtree(maps_dir, ignore_errors=True)
    if maps_dir.is_dir():
        for old in maps_dir.iterdir():
            if not old.name.startswith(key):
                old.unlink()
    views = int(cfg["tail_views"])
    total = len(items) + (views - 1) * n_train
    t_maps, done_before = time.monotonic(), 0
    maps_progress = run.clock.features()

    def report(done: int) -> None:
        now = done_before + done
        rate = (time.monotonic() - t_maps) / max(1, now)
        maps_progress({"done": now, "total": total, "eta_s": rate * (total - now)})

    size, norm = cfg["image_size"], (run.mean, run.std)
    centre = _compute_maps(
        run.prefix,
        items,
        eval_transform(size, cfg["resize"]),
        0,
        maps_dir / f"{key}-c.npy",
        norm,
        draft_size(size),
        workers,
        report,
    )
    done_before = len(items)
    train_views = [centre[:n_train]]
    for v in range(1, views):
        # max_train_seconds: a view whose maps would end past it is not computed (nor the ones after it)
        view_s = (time.monotonic() - t_maps) / max(1, done_before) * n_train
        if not (maps_dir / f"{key}-v{v}.npy").is_file() and run.clock.time_up(time.monotonic() + view_s):
            log.warning(
                "max_train_seconds=%s: the tail fine-tune trains on %d of %d views (the next would end past it)",
                run.clock.max_s,
                v,
                views,
            )
            total = done_before
            break
        aug = _compute_maps(
            run.prefix,
            run.parsed.train,
            train_transform(cfg),
            cfg["seed"] + v,
            maps_dir / f"{key}-v{v}.npy",
            norm,
            draft_size(size, 1.5),
            workers,
            report,
        )
        train_views.append(aug)
        done_before += n_train
    seconds = round(time.monotonic() - t_maps, 1)
    return _Maps(
        dir=maps_dir, centre=centre, train_views=train_views, val=centre[n_train:], total=total, seconds=seconds
    )


def _phase2(run: _TailRun) -> None:
    """Phase 2: the tail and the heads on the maps, epoch 0 being phase 1's heads; the best epoch's weights are
    loaded at the end (run.state: history, best, stopped_early)."""
    cfg, model, state = run.cfg, run.model, run.state
    optimizer, scheduler = _phase2_optimizer(run)
    n_train = run.n_train
    loss_weights = class_weights([tuple(r) for r in run.Y[:n_train].tolist()], _head_sizes(run), cfg["class_weighting"])
    if all(w is None for w in loss_weights):
        loss_weights = None
    gen = torch.Generator().manual_seed(cfg["seed"])
    result = _evaluate(run)
    value = _metric_value(result, cfg["early_stopping"]["metric"])
    state.best = {"epoch": 0, "value": value, "loss": result["loss"], "result": result}
    state.best_state = cpu_state(model)
    ema = _weight_average(cfg, model)
    # No data loader in phase 2 (the maps are in memory): every core computes, as in the feature pass.
    torch.set_num_threads(feature_threads(cfg["torch_threads"], 0))
    t2 = time.monotonic()
    for epoch in range(1, int(cfg["epochs"]) + 1):
        t_epoch = time.monotonic()
        train_loss = _train_epoch(run, optimizer, scheduler, gen, loss_weights, ema)
        live = None
        if ema is not None:  # evaluated (and kept when best) with the averaged weights; training goes on live
            live = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(ema.module.state_dict())
        result = _evaluate(run)
        lr = _group_lrs(optimizer)["heads"]
        _end_epoch(run, epoch, train_loss, result, lr=lr, seconds=time.monotonic() - t_epoch, t2=t2)
        if live is not None:
            model.load_state_dict(live)
        if state.stopped_early:
            break
    model.load_state_dict(state.best_state)
    model.eval()
    if model.arcface_head is not None:
        model.set_arcface_margin(cfg["arcface_margin"])


def _weight_average(cfg: dict, model: nn.Module):
    """timm's ModelEmaV3 of the model (decay warm-up on: the average follows closely in the first steps) when the
    config's ema_decay is set, else None."""
    if cfg["ema_decay"] is None:
        return None
    from timm.utils import ModelEmaV3  # noqa: PLC0415

    return ModelEmaV3(model, decay=float(cfg["ema_decay"]), use_warmup=True)


def _head_sizes(run: _TailRun) -> list[int]:
    return [len(h["classes"]) for h in run.parsed.heads]


def _phase2_optimizer(run: _TailRun):
    """(AdamW, per-step LambdaLR): the prefix frozen; optim._param_groups with the tail as the trained part of the
    backbone (lr x unfreeze_lr_mult) and the heads (lr), decay / no decay; warm-up, then cosine down to
    MIN_LR_RATIO (optim._lr_lambda) over phase 2's steps."""
    cfg = run.cfg
    for p in run.prefix.parameters():
        p.requires_grad_(False)
    tail_params = [p for p in run.tail.parameters() if p.requires_grad]
    # The prefix's (frozen) parameters land in "backbone_rest": they never get a gradient, so AdamW skips them.
    groups = _param_groups(run.model, cfg["weight_decay"], cfg["lr"], tail_params, cfg["unfreeze_lr_mult"])
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = run.clock.steps_per_epoch
    total_steps = max(1, int(cfg["epochs"]) * steps_per_epoch)
    warm = int(cfg["warmup_epochs"] * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warm))


@torch.inference_mode()
def _pooled(tail: nn.Module, maps: np.ndarray, feature_dim: int) -> np.ndarray:
    """tail(maps) -> (N, feature_dim) float32 pooled features, 128 maps at a time (NaN rows of unreadable files
    as zeros)."""
    tail.eval()
    out = np.zeros((len(maps), feature_dim), dtype=np.float32)
    for i in range(0, len(maps), 128):
        out[i : i + 128] = tail(
            torch.from_numpy(np.nan_to_num(np.asarray(maps[i : i + 128], dtype=np.float32)))
        ).numpy()
    return out


def _evaluate(run: _TailRun) -> dict:
    """quick.evaluate_logits of the model on the centre maps of the readable val rows (metrics_on "val") or, with
    none, of the train rows."""
    n_train, Y = run.n_train, run.Y
    if run.metrics_on == "val":
        X, Yk, ok = _pooled(run.tail, run.maps.val, run.feature_dim), Y[n_train:], run.va_ok[n_train:]
    else:
        X, Yk, ok = _pooled(run.tail, run.maps.centre[:n_train], run.feature_dim), Y[:n_train], run.tr_ok[:n_train]
    run.model.eval()
    with torch.inference_mode():
        logits, _ = run.model.heads_forward(torch.from_numpy(X[ok]))
    targets = torch.from_numpy(Yk)[torch.from_numpy(ok)]
    return evaluate_logits(logits, targets, run.parsed.heads)


def _train_epoch(run: _TailRun, optimizer, scheduler, gen: torch.Generator, loss_weights, ema=None) -> float | None:
    """One epoch of phase 2: shuffled whole batches of train rows, each row from a random view, half of each batch
    mirrored when hflip is on; the tail's BatchNorm layers keep their ImageNet statistics (eval mode). Batches
    with fewer than two readable rows are skipped; `ema` (a ModelEmaV3) follows every step. Returns the mean train
    loss (None without a trained batch)."""
    cfg, model, n_train = run.cfg, run.model, run.n_train
    views = run.maps.train_views
    bs, steps_per_epoch = _batching(cfg, n_train)
    Yt = torch.from_numpy(run.Y[:n_train])
    if model.arcface_head is not None:
        model.set_arcface_margin(cfg["arcface_margin"])
    model.train()
    for m in run.tail.modules():  # ImageNet BatchNorm statistics are kept
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    view_of = torch.randint(0, len(views), (n_train,), generator=gen).numpy()
    perm = torch.randperm(n_train, generator=gen).numpy()
    loss_sum, loss_n = 0.0, 0
    for s in range(steps_per_epoch):
        rows = perm[s * bs : (s + 1) * bs]
        x = np.stack([views[view_of[r]][r] for r in rows]).astype(np.float32)
        keep = ~np.isnan(x[:, 0, 0, 0])
        if keep.sum() < 2:
            continue
        xb = torch.from_numpy(x[keep])
        if cfg["hflip"]:
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(3)
        logits, emb = model.heads_forward(run.tail(xb))
        y = Yt[torch.from_numpy(rows[keep])]
        loss = _heads_loss(
            logits, y, cfg["label_smoothing"], loss_weights, run.head_weights, model=model, embeddings=emb
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, step=scheduler.last_epoch)
        loss_sum += float(loss.detach())
        loss_n += 1
        if run.clock.time_up(time.monotonic()):  # as train_model: the epoch ends here, then is evaluated
            run.state.stopped_early = "time_limit"
            log.warning("max_train_seconds=%s reached during a tail epoch (step %d): stopping", run.clock.max_s, s + 1)
            break
    return loss_sum / loss_n if loss_n else None


def _end_epoch(run: _TailRun, epoch: int, train_loss, result: dict, *, lr: float, seconds: float, t2: float) -> None:
    """Record the epoch in the history, select the best epoch (epoch.select_epoch), stop early (patience) or on the
    time budget (when the next epoch would end past max_train_seconds), then report the epoch."""
    cfg, state, es = run.cfg, run.state, run.cfg["early_stopping"]
    epochs = int(cfg["epochs"])
    steps = run.clock.steps_per_epoch
    state.history.append(
        history_entry(epoch, train_loss, result, lr=lr, backbone_frozen=False, seconds=seconds, steps=steps)
    )
    value = _metric_value(result, es["metric"])
    select_epoch(state, epoch, value, result, run.model, run.mode, es["min_delta"])
    if state.stopped_early:  # the time limit, during the epoch (_train_epoch)
        pass
    elif es["patience"] is not None and state.bad_epochs >= es["patience"] and epoch < epochs:
        state.stopped_early = "early_stopping"
    elif epoch < epochs and run.clock.time_up(time.monotonic() + state.history[-1]["seconds"]):
        state.stopped_early = "time_limit"  # the next epoch would end past max_train_seconds
    eta_s = 0.0 if state.stopped_early else (time.monotonic() - t2) / epoch * (epochs - epoch)
    run.clock.epoch_done(epoch, train_loss, result, run.metrics_on, eta_s)


def _final_metrics(run: _TailRun) -> dict:
    """metrics.json of the run ("seconds" filled in by write_artifact): the best epoch's metrics, the history,
    phase 1's summary and the maps'."""
    cfg, parsed, state, best = run.cfg, run.parsed, run.state, run.state.best
    n_known = [int((run.Y[run.tr_ok][:, h] != IGNORE_INDEX).sum()) for h in range(len(parsed.head_names))]
    skipped = sorted(it.path for it, ok in zip(run.items, run.feats.ok, strict=True) if not ok)
    return {
        "heads": {
            name: _with_per_class(best["result"]["heads"][name], parsed.heads[h]["classes"], n_known[h])
            for h, name in enumerate(parsed.head_names)
        },
        "primary": best["result"]["primary"],
        "best_epoch": best["epoch"],
        "selection_metric": cfg["early_stopping"]["metric"],
        "history": state.history,
        "n_train": run.n_train,
        "n_val": len(parsed.val),
        "n_test": parsed.n_test,
        "metrics_on": run.metrics_on,
        "skipped_files": len(skipped),
        "skipped_paths": skipped[:100],
        "device": "cpu",
        "backbone": cfg["backbone"],
        "pretrained_source": run.weights["source"],
        "pretrained_detail": run.weights["detail"],
        "embedding_dim": run.model.embedding_dim,
        "epochs_run": len(state.history),
        "stopped_early": state.stopped_early,
        "phase1": state.phase1,
        "tail": {
            "from_block": run.k,
            "views": len(run.maps.train_views),
            "maps_seconds": run.maps.seconds,
            "maps": run.maps.total,
        },
        "seconds": None,
    }


def _eval_report(run: _TailRun, metrics: dict) -> None:
    """quick._report on the heads with the tail's pooled centre-view features; a failure is logged and recorded in
    metrics["report_error"], never raised (it must not lose the trained model)."""
    try:
        heads_only = heads_module(run.cfg, run.parsed.heads, run.feature_dim)
        heads_only.load_state_dict(
            {k: v for k, v in run.model.state_dict().items() if not k.startswith("backbone.")}, strict=True
        )
        X = np.zeros((len(run.items), run.feature_dim), dtype=np.float32)
        X[: run.n_train] = _pooled(run.tail, run.maps.centre[: run.n_train], run.feature_dim)
        X[run.n_train :] = _pooled(run.tail, run.maps.val, run.feature_dim)
        _report(heads_only, run.parsed, run.cfg, run.out_dir, metrics, X, run.Y, run.tr_ok, run.va_ok)
    except Exception as exc:  # noqa: BLE001 - a failed report must not lose the trained model
        log.exception("evaluation report failed")
        metrics["report_error"] = f"{type(exc).__name__}: {exc}"[:1000]
