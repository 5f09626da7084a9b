"""train_model: the training loop (AdamW or SGD, torch LR schedulers, gradient accumulation, per-head masked
cross-entropy, optional backbone freezing, per-epoch validation, best-epoch selection and early stopping on the
validation split, resumable checkpoints, atomic artifact writing).

This module wires the parts: runtime (device, threads, AMP, seeding), optim (param groups, optimizer, schedulers),
losses, checkpoint (CheckpointSaver, TrainState, RNG states), epoch (train_one_epoch, evaluate, best-epoch
selection), progress (reports and ETA), phase1 (phase 1 on cached features) and results (the final report); with
several processes (torchrun, launch.py), distributed (DDP, sharded batches, rank 0 writes)."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from .atomic import write_atomic
from .checkpoint import CheckpointSaver, TrainState, checkpoint_fingerprint, rng_state, set_rng_state
from .config import resolve_config
from .data import ManifestDataset, collate_skip, draft_size, eval_transform, train_transform
from .distributed import (
    Dist,
    RankWorkerInit,
    ShardedBatches,
    ShardSampler,
    min_share,
    seed_process,
    sync_run_state,
)
from .epoch import (
    Trainer,
    _check_metric,
    _metric_value,
    arcface_margin_degrees,
    cpu_state,
    epoch_record,
    evaluate,
    no_readable_train_images,
    select_epoch,
    train_one_epoch,
)
from .losses import _head_loss_weights, class_weights
from .manifest import IGNORE_INDEX, ParsedManifest, parse_manifest
from .model import ARTIFACT_FORMAT, build_model, freezable_backbone_params
from .optim import _make_optimizer, _make_scheduler, _param_groups, scheduler_epoch_step
from .progress import Progress
from .results import _clean, _final_report, _fmt, _with_per_class, write_json_atomic
from .runtime import (
    Amp,
    amp_for,
    cpu_count,
    resolve_device,
    resolve_num_workers,
    seed_everything,
    to_device,
    torch_settings,
    worker_init,
)
from .sampling import build_train_sampler, manifest_train_sources

log = logging.getLogger("training.engine")


def train_model(
    manifest: dict,
    config: dict | None,
    out_dir,
    *,
    progress: Callable[[dict], None] | None = None,
    resume: bool = True,
    fresh: bool = False,
    cache_dir=None,
    dist: Dist | None = None,
) -> dict | None:
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
    freeze_backbone_epochs + 1 (metrics["phase1"] says so). Without it, phase 1 trains on the photos.

    dist (distributed.Dist): this process is one of several started by torchrun (launch.py, ddp_rank.py); the
    whole-network recipe only. Rank 0 returns the metrics and writes everything; the other ranks return None and
    write nothing."""
    t_start = time.monotonic()
    cfg = resolve_config(config)
    if cfg["tail_from_block"] is not None:  # the CPU recipe (presets set it to null on CUDA workers)
        if dist is not None:
            raise ValueError("the tail fine-tune (tail_from_block) runs in one process, not under torchrun")
        from .tail import train_tail  # noqa: PLC0415 - tail and its helpers only for this recipe

        return train_tail(manifest, config, out_dir, cache_dir=cache_dir, progress=progress, fresh=fresh)
    parsed = parse_manifest(manifest)
    out_dir = Path(out_dir)
    if dist is None or dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg["device"]) if dist is None else dist.device
    cpus = max(1, cpu_count() // (dist.world if dist is not None else 1))  # a process's share of the CPUs
    num_workers = resolve_num_workers(cfg["num_workers"], cpus)
    seed_everything(cfg["seed"])
    with torch_settings(device, cfg["torch_threads"], num_workers, cpus):
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
            dist=dist,
        )


@dataclass
class _Data:
    """The run's data: the train loader (shuffled, or drawn by the configured sampler, with its own seeded
    generator) and the evaluation loader (the val split, or the train split without val items)."""

    n_train: int
    batch_size: int
    generator: torch.Generator  # the train loader's: shuffle order and the workers' base seed
    loader_kw: dict
    sampler: object | None  # a sampler with set_epoch(), None for plain shuffling
    train_loader: DataLoader
    eval_items: list
    eval_loader: DataLoader  # under DDP: this process's share of the items
    metrics_on: str  # "val", or "train" (optimistic) without val items
    report_loader: DataLoader | None = None  # every eval item, for the final report (rank 0; None on the others)
    min_share: int = 0  # under DDP: the fewest photos of a batch a process trains on


def _data(
    parsed: ParsedManifest,
    cfg: dict,
    num_workers: int,
    is_cuda: bool,
    sources: list[str] | None,
    dist: Dist | None = None,
) -> _Data:
    n_train = len(parsed.train)
    bs = min(cfg["batch_size"], n_train)
    gen = torch.Generator()
    gen.manual_seed(cfg["seed"])
    init_fn = worker_init if dist is None else RankWorkerInit(dist.rank)
    loader_kw = dict(
        num_workers=num_workers,
        collate_fn=collate_skip,
        pin_memory=is_cuda,
        worker_init_fn=init_fn if num_workers else None,
        prefetch_factor=4 if num_workers else None,  # keep several batches decoded ahead of the model
    )
    train_ds = ManifestDataset(parsed.train, train_transform(cfg), min_side=draft_size(cfg["image_size"], 1.5))
    # Train workers are not persistent: each epoch's workers are seeded from `gen`, whose state is restored at each
    # epoch start (see checkpoint.rng_state), so their augmentations are reproducible after a resume too.
    sampler, sampler_kind = build_train_sampler(
        sources or ["real"] * n_train, [it.targets[0] for it in parsed.train], cfg, seed=cfg["seed"]
    )
    share = 0
    if dist is not None:  # the one-process run's batches, each process training on its share of every batch
        if sampler_kind == "pk":
            batches = sampler
        else:
            draw = sampler if sampler_kind == "weighted" else RandomSampler(train_ds, generator=gen)
            batches = BatchSampler(draw, bs, drop_last=n_train > bs)
        share = min_share(batches.batch_size, n_train, sampler_kind == "pk" or n_train > bs, dist.world)
        if share < 1:
            raise ValueError(
                f"a batch of {batches.batch_size if n_train >= batches.batch_size else n_train} photos cannot be "
                f"shared by {dist.world} processes: raise batch_size (config 'batch_size', or pk_p x pk_k) or "
                "lower 'devices'"
            )
        train_loader = DataLoader(
            train_ds, batch_sampler=ShardedBatches(batches, dist.rank, dist.world), generator=gen, **loader_kw
        )
    elif sampler_kind == "pk":
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
    eval_ds = ManifestDataset(
        eval_items, eval_transform(cfg["image_size"], cfg["resize"]), min_side=draft_size(cfg["image_size"])
    )
    eval_loader = DataLoader(
        eval_ds,
        batch_size=max(1, cfg["batch_size"] * 2),
        sampler=ShardSampler(len(eval_ds), dist.rank, dist.world) if dist is not None else None,
        shuffle=False,
        persistent_workers=num_workers > 0,
        **loader_kw,
    )
    report_loader = eval_loader
    if dist is not None:
        report_loader = (
            DataLoader(eval_ds, batch_size=max(1, cfg["batch_size"] * 2), shuffle=False, **loader_kw)
            if dist.is_main
            else None
        )
    if metrics_on == "train":
        log.warning("no val items: metrics are computed on the train split (optimistic)")
    return _Data(
        n_train, bs, gen, loader_kw, sampler, train_loader, eval_items, eval_loader, metrics_on, report_loader, share
    )


def _trainer(
    cfg: dict,
    parsed: ParsedManifest,
    model,
    info: dict,
    amp: Amp,
    device,
    data: _Data,
    mode: str,
    head_weights,
    dist: Dist | None = None,
):
    """(Trainer, freezable backbone params, their norm layers): the optimizer over named param groups, the
    scheduler, the class and head loss weights."""
    steps_per_epoch = len(data.train_loader)
    accum = cfg["accumulate_steps"]
    freezable, frozen_norms = (
        freezable_backbone_params(model, cfg["freeze_fraction"]) if cfg["freeze_backbone_epochs"] > 0 else ([], [])
    )
    optimizer = _make_optimizer(
        cfg,
        _param_groups(model, cfg["weight_decay"], cfg["lr"], freezable, cfg["unfreeze_lr_mult"]),
        device.type == "cuda",
    )
    scheduler, sched_when = _make_scheduler(cfg, optimizer, math.ceil(steps_per_epoch / accum), mode)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sched_when=sched_when,
        amp=amp,
        device=device,
        mean=info["mean"],
        std=info["std"],
        steps_per_epoch=steps_per_epoch,
        accum=accum,
        has_bn=any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        label_smoothing=cfg["label_smoothing"],
        class_weights=class_weights(
            [it.targets for it in parsed.train], [len(h["classes"]) for h in parsed.heads], cfg["class_weighting"]
        ),
        head_weights=head_weights,
        dist=dist,
        # An ArcFace head without a known label in a batch, or a head of loss weight 0, gets no gradient.
        find_unused=cfg["head_type"] == "arcface" or any(w == 0 for w in head_weights or ()),
    )
    if dist is not None and trainer.has_bn and data.min_share < 2:
        raise ValueError(
            f"config 'devices': {dist.world} processes leave {data.min_share} photo(s) of a batch to a process, and "
            f"BatchNorm ({cfg['backbone']}) needs 2: raise batch_size or lower 'devices'"
        )
    return trainer, freezable, frozen_norms


@dataclass
class _Run:
    """A training run as _train wires it."""

    cfg: dict
    parsed: ParsedManifest
    info: dict  # build_model's: mean/std, pretrained source, embedding_dim
    tr: Trainer
    data: _Data
    state: TrainState
    saver: CheckpointSaver
    clock: Progress
    on_bad: Callable[[list, str], None]
    freezable: list
    frozen_norms: list
    n_known: list[int]  # labelled train items per head
    mode: str  # "min" (val_loss) or "max" (accuracies)
    dist: Dist | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes (checkpoints, artifacts): always, unless it is a rank > 0 of a DDP run."""
        return self.dist is None or self.dist.is_main

    def sync(self) -> None:
        """DDP: rank 0's model, optimizer, scheduler and run state on every process (after rank 0 alone resumed a
        checkpoint or ran phase 1)."""
        if self.dist is not None:
            tr = self.tr
            sync_run_state(
                self.dist,
                self.state,
                model=tr.model,
                optimizer=tr.optimizer,
                scheduler=tr.scheduler,
                scaler=tr.amp.scaler,
            )

    def save_checkpoint(self, epoch: int, is_best: bool) -> None:
        if not self.is_main:
            return
        tr = self.tr
        self.saver.save(
            epoch,
            is_best,
            self.state,
            model=tr.model,
            optimizer=tr.optimizer,
            scheduler=tr.scheduler,
            scaler=tr.amp.scaler,
        )


def _skip_logger(skipped: dict[str, str], split_items: dict[str, list]) -> Callable[[list, str], None]:
    """The loaders' on_bad(bad, which): record (and log once) the unreadable images of a batch."""

    def on_bad(bad, which):
        for index, error in bad:
            path = split_items[which][index].path
            if path not in skipped:
                skipped[path] = error
                log.warning("skipping unreadable image %s (%s)", path, error)

    return on_bad


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
    dist: Dist | None = None,
) -> dict | None:
    """Build the model, data, optimizer and checkpoint saver, resume when a checkpoint fits, run phase 1 on cached
    features when it applies, then the epochs, and write the artifacts (train_model holds the torch settings).
    Under DDP rank 0 alone resumes and runs phase 1 (then sends its state to the others) and writes."""
    head_names = parsed.head_names
    head_weights = _head_loss_weights(cfg, head_names)  # ValueError before any work
    metric = cfg["early_stopping"]["metric"]
    _check_metric(metric, head_names)
    mode = "min" if metric == "val_loss" else "max"
    model, info = build_model(cfg, parsed.heads)  # may raise ValueError (pretrained_path)
    to_device(model, device)
    amp = amp_for(device, cfg["amp"])
    data = _data(parsed, cfg, num_workers, device.type == "cuda", sources, dist)
    tr, freezable, frozen_norms = _trainer(cfg, parsed, model, info, amp, device, data, mode, head_weights, dist)
    state = TrainState(t_start=t_start)
    on_bad = _skip_logger(state.skipped, {"train": parsed.train, "eval": data.eval_items})
    n_known = [sum(1 for it in parsed.train if it.targets[h] != IGNORE_INDEX) for h in range(len(head_names))]
    for name, n in zip(head_names, n_known, strict=True):
        if n == 0:
            log.warning("head %r has no labelled train item: it will not learn anything", name)
    if cfg["freeze_backbone_epochs"] >= cfg["epochs"]:
        log.warning(
            "freeze_backbone_epochs=%d >= epochs=%d: the backbone is never trained",
            cfg["freeze_backbone_epochs"],
            cfg["epochs"],
        )
    saver = CheckpointSaver(out_dir, checkpoint_fingerprint(parsed, cfg), cfg["checkpoint_every"])
    if dist is None or dist.is_main:
        saver.resume(
            state,
            model=model,
            optimizer=tr.optimizer,
            scheduler=tr.scheduler,
            scaler=amp.scaler,
            fresh=fresh,
            resume=resume,
            cfg=cfg,
        )
    # Every progress call says where the backbone's weights came from, so the run's row shows it from the start.
    weights = {"source": info["pretrained_source"], "detail": info["pretrained_detail"]}
    clock = Progress(
        progress,
        epochs=cfg["epochs"],
        steps_per_epoch=tr.steps_per_epoch,
        progress_every=cfg["progress_every"],
        max_s=cfg["max_train_seconds"],
        t_start=state.t_start,
        weights=weights,
    )
    run = _Run(cfg, parsed, info, tr, data, state, saver, clock, on_bad, freezable, frozen_norms, n_known, mode, dist)
    run.sync()
    _log_setup(run, num_workers)
    if (
        cache_dir is not None
        and cfg["freeze_backbone_epochs"] > 0
        and len(freezable) == sum(1 for _ in model.backbone.parameters())  # the whole backbone is frozen
        and info["pretrained_source"] != "none"
        and state.start_epoch == 1
        and not state.stopped_early
    ):
        if run.is_main:  # the others wait for its result (the feature cache is written once)
            _phase1_on_features(run, feature_items, cache_dir)
        run.sync()
    epoch_range = range(state.start_epoch, cfg["epochs"] + 1) if not state.stopped_early else range(0)
    for epoch in epoch_range:
        _run_epoch(run, epoch)
        if state.stopped_early:
            break
    if not run.is_main:
        return None
    return _finish(run, out_dir)


def _log_setup(run: _Run, num_workers: int) -> None:
    cfg, tr, es = run.cfg, run.tr, run.cfg["early_stopping"]
    freeze_epochs = cfg["freeze_backbone_epochs"]
    log.info(
        "training %s on %s: %d train / %d val items, %d heads, %d epochs x %d steps, workers=%d",
        cfg["backbone"],
        tr.device,
        run.data.n_train,
        len(run.parsed.val),
        len(run.parsed.head_names),
        cfg["epochs"],
        tr.steps_per_epoch,
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
        tr.accum,
        run.data.batch_size * tr.accum,
        freeze_epochs,
        f" (fraction {cfg['freeze_fraction']:g}, then lr x{cfg['unfreeze_lr_mult']:g})" if freeze_epochs else "",
        es["metric"],
        es["patience"],
        tr.amp.name,
        tr.device,
    )
    if run.dist is not None:
        log.info(
            "distributed: %d processes (%s), each trains on its share of every batch of %d (at least %d photos)",
            run.dist.world,
            run.dist.backend,
            run.data.batch_size,
            run.data.min_share,
        )


def _phase1_on_features(run: _Run, feature_items: list[dict], cache_dir) -> None:
    """Phase 1 as the heads trained on cached features (phase1.py), recorded as epoch freeze_backbone_epochs;
    training goes on with phase 2 at the next epoch, the lr schedule moved past phase 1's steps."""
    from .phase1 import heads_on_cached_features  # noqa: PLC0415 - the feature cache only when it is used

    cfg, state, tr, clock = run.cfg, run.state, run.tr, run.clock
    freeze_epochs = cfg["freeze_backbone_epochs"]
    fit, state.phase1, trained = heads_on_cached_features(
        tr.model, run.parsed, cfg, feature_items, cache_dir, state.skipped, clock.features()
    )
    state.trained_samples_total += trained
    result = fit["best"]["result"]
    value = _metric_value(result, cfg["early_stopping"]["metric"])
    best_fit = fit["history"][fit["best"]["epoch"] - 1]
    state.history.append(
        epoch_record(
            freeze_epochs,
            best_fit["train_loss"],
            result,
            {"heads": cfg["lr"]},
            backbone_frozen=True,
            arcface_margin=best_fit["arcface_margin"],
            seconds=state.phase1["seconds"],
            steps=sum(h["steps"] for h in fit["history"]),
            phase1="feature-cache",
        )
    )
    state.best = {"epoch": freeze_epochs, "value": value, "loss": result["loss"], "result": result}
    state.best_state = cpu_state(tr.model)
    # Phase 2 starts where it would after phase 1 on the photos: the lr schedule moves past phase 1's steps.
    if tr.sched_when == "step":
        skipped_steps = freeze_epochs * math.ceil(tr.steps_per_epoch / tr.accum)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step was due
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(skipped_steps):
                tr.scheduler.step()
        state.optimizer_steps += skipped_steps
    elif tr.sched_when == "epoch":
        scheduler_epoch_step(tr.scheduler, value, run.mode)
    if clock.time_up(time.monotonic()):
        state.stopped_early = "time_limit"
        log.warning("max_train_seconds=%s reached during phase 1: stopping", clock.max_s)
    state.rng = rng_state(run.data.generator)
    run.save_checkpoint(freeze_epochs, True)  # a resumed run starts with phase 2
    state.start_epoch = freeze_epochs + 1
    log.info(
        "phase 1 on cached features: heads trained %d epochs (best %d, %s %s) in %.1fs, cache %d hits / %d "
        "computed; continuing at epoch %d with the whole network",
        state.phase1["epochs"],
        state.phase1["best_epoch"],
        cfg["early_stopping"]["metric"],
        _fmt(value),
        state.phase1["seconds"],
        state.phase1["cache"]["hits"],
        state.phase1["cache"]["misses"],
        state.start_epoch,
    )
    eta_s = 0.0 if state.stopped_early else clock.eta(state.start_epoch, 0)
    clock.epoch_done(freeze_epochs, best_fit["train_loss"], result, run.data.metrics_on, eta_s)


def _begin_epoch(run: _Run, epoch: int) -> bool:
    """Restore the RNG states saved after the previous epoch, set the sampler's epoch, freeze or unfreeze the
    backbone and set the ArcFace margin of the epoch's phase. Returns whether the backbone is frozen."""
    cfg, model = run.cfg, run.tr.model
    freeze_epochs = cfg["freeze_backbone_epochs"]
    if run.state.rng is not None:
        set_rng_state(run.state.rng, run.data.generator)
    if run.dist is not None:  # same batches (the loader's generator), each process its own augmentation draws
        seed_process(cfg["seed"], epoch, run.dist.rank)
    if run.data.sampler is not None:
        run.data.sampler.set_epoch(epoch)  # the epoch's draw is a pure function of (seed, epoch): exact resume
    frozen = epoch <= freeze_epochs
    for p in run.freezable:
        p.requires_grad_(not frozen)
    if getattr(model, "arcface_head", None) is not None:  # the seed's two phases: margin 0, then the target
        model.set_arcface_margin(cfg["arcface_warmup_margin"] if frozen else cfg["arcface_margin"])
    if run.dist is not None:
        run.tr.wrap_ddp()
    model.train()
    if frozen:
        for m in run.frozen_norms:
            m.eval()
    elif freeze_epochs and epoch == freeze_epochs + 1:
        log.info("epoch %d: backbone unfrozen (lr x%g)", epoch, cfg["unfreeze_lr_mult"])
    return frozen


def _run_epoch(run: _Run, epoch: int) -> None:
    """Train one epoch, evaluate it, record it in the history, select the best epoch, step an epoch-wise
    scheduler, decide on early stopping, save the checkpoints, then report progress."""
    cfg, state, tr, es = run.cfg, run.state, run.tr, run.cfg["early_stopping"]
    epochs = cfg["epochs"]
    frozen = _begin_epoch(run, epoch)
    t_epoch = time.monotonic()
    out = train_one_epoch(tr, run.data.train_loader, epoch, state, on_bad=run.on_bad, clock=run.clock)
    state.trained_samples_total += out["samples"]
    if epoch == 1 and state.trained_samples_total == 0 and state.stopped_early is None:
        raise no_readable_train_images(run.data.n_train, state.skipped)
    t_eval = time.monotonic()
    loader = run.data.eval_loader
    dist = run.dist
    if dist is not None:  # evaluate (and keep as the best epoch) rank 0's model: its BatchNorm statistics
        dist.broadcast_buffers(tr.model)
    result = evaluate(
        tr.model,
        loader,
        run.parsed.heads,
        tr.device,
        tr.amp.autocast,
        run.on_bad,
        tr.mean,
        tr.std,
        reduce=dist.sum_tensors if dist is not None else None,
    )
    if dist is not None:
        dist.gather_skipped(state.skipped)
    run.clock.eval_time = time.monotonic() - t_eval
    state.rng = rng_state(run.data.generator)
    value = _metric_value(result, es["metric"])
    record = epoch_record(
        epoch,
        out["loss"],
        result,
        out["lrs"],
        backbone_frozen=bool(frozen and run.freezable),
        arcface_margin=arcface_margin_degrees(tr.model),
        seconds=round(time.monotonic() - t_epoch, 3),
        steps=out["steps"],
    )
    state.history.append(record)
    selected = select_epoch(state, epoch, value, result, tr.model, run.mode, es["min_delta"])
    if tr.sched_when == "epoch":
        scheduler_epoch_step(tr.scheduler, value, run.mode)
    if es["patience"] is not None and state.bad_epochs >= es["patience"] and not state.stopped_early and epoch < epochs:
        state.stopped_early = "early_stopping"
        log.info(
            "early stopping after epoch %d: %s has not improved for %d epochs (best %s at epoch %d)",
            epoch,
            es["metric"],
            state.bad_epochs,
            _fmt(state.best["value"]),
            state.best["epoch"],
        )
    run.save_checkpoint(epoch, selected)  # before progress(): a cancelled run can resume from here
    log.info(
        "epoch %d/%d: train loss %s, %s loss %s, mean top1 %s (%.1fs)",
        epoch,
        epochs,
        _fmt(out["loss"]),
        run.data.metrics_on,
        _fmt(result["loss"]),
        _fmt(result["primary"]),
        record["seconds"],
    )
    eta_s = 0.0 if state.stopped_early else run.clock.eta(epoch, tr.steps_per_epoch)
    run.clock.epoch_done(epoch, out["loss"], result, run.data.metrics_on, eta_s)


def _final_metrics(run: _Run) -> dict:
    """metrics.json of the run (its "seconds" filled in when written): the best epoch's metrics, the history."""
    state, parsed, cfg, info = run.state, run.parsed, run.cfg, run.info
    best_result = state.best["result"]
    metrics = {
        "heads": {
            name: _with_per_class(best_result["heads"][name], parsed.heads[h]["classes"], run.n_known[h])
            for h, name in enumerate(parsed.head_names)
        },
        "primary": best_result["primary"],
        "best_epoch": state.best["epoch"],
        "selection_metric": cfg["early_stopping"]["metric"],
        "history": state.history,
        "n_train": run.data.n_train,
        "n_val": len(parsed.val),
        "n_test": parsed.n_test,
        "metrics_on": run.data.metrics_on,
        "skipped_files": len(state.skipped),
        "skipped_paths": sorted(state.skipped)[:100],
        "device": str(run.tr.device),
        "amp": run.tr.amp.name,
        "backbone": cfg["backbone"],
        "pretrained_source": info["pretrained_source"],
        "pretrained_detail": info["pretrained_detail"],
        "embedding_dim": info["embedding_dim"],
        "epochs_run": len(state.history),
        "stopped_early": state.stopped_early,
        "seconds": None,
    }
    if state.resumed_from is not None:
        metrics["resumed_from_epoch"] = state.resumed_from
    if state.phase1 is not None:
        metrics["phase1"] = state.phase1
    if run.dist is not None:
        metrics["distributed"] = {
            "processes": run.dist.world,
            "backend": run.dist.backend,
            "batch_size": run.data.batch_size,
            "min_photos_per_process": run.data.min_share,
        }
    return metrics


def _finish(run: _Run, out_dir: Path) -> dict:
    """The best epoch's evaluation report (when configured) and the artifact files: model.pt (the best epoch's
    weights), label_maps.json, config.json, metrics.json. Returns the metrics."""
    state, parsed, cfg, info, tr = run.state, run.parsed, run.cfg, run.info, run.tr
    metrics = _final_metrics(run)
    if cfg["eval_report"]:
        try:
            tr.model.load_state_dict(state.best_state)
            _final_report(
                tr.model,
                parsed,
                cfg,
                out_dir,
                metrics,
                run.data.report_loader,
                run.data.eval_items,
                tr.device,
                tr.amp.autocast,
                tr.mean,
                tr.std,
                run.data.loader_kw,
            )
        except Exception as exc:  # noqa: BLE001 - a failed report must not lose the trained model
            log.exception("evaluation report failed")
            metrics["report_error"] = f"{type(exc).__name__}: {exc}"[:1000]
    artifact = {
        "format": ARTIFACT_FORMAT,
        "config": cfg,
        "heads": parsed.heads,
        "label_maps": parsed.label_maps,
        "state_dict": state.best_state,
        "embedding_dim": info["embedding_dim"],
        "mean": tr.mean,
        "std": tr.std,
        "best_epoch": state.best["epoch"],
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    write_atomic(out_dir / "model.pt", lambda tmp: torch.save(artifact, tmp))
    write_json_atomic(out_dir / "label_maps.json", parsed.label_maps)
    write_json_atomic(out_dir / "config.json", cfg)
    metrics["seconds"] = round(time.monotonic() - state.t_start, 3)
    metrics = _clean(metrics)
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info(
        "best epoch %d, %s %s, written to %s",
        state.best["epoch"],
        cfg["early_stopping"]["metric"],
        _fmt(state.best["value"]),
        out_dir,
    )
    return metrics
