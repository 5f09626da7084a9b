"""Optimisation: the optimizer's named param groups (backbone / backbone_rest / heads, decay / no decay), AdamW or
SGD, the LR schedulers (warm-up + cosine, cosine with restarts, plateau) and the optimizer / scheduler steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LambdaLR, ReduceLROnPlateau

MIN_LR_RATIO = 0.01  # cosine (and cosine_restarts) decay to lr * MIN_LR_RATIO; plateau never goes below it


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


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Apply the accumulated gradients (through the GradScaler when one is in use), then clear them."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def scheduler_epoch_step(scheduler, value: float | None, mode: str) -> None:
    """An epoch-wise (plateau) scheduler step on the selection metric's value; an epoch without one counts as the
    worst value."""
    scheduler.step(value if value is not None else (math.inf if mode == "min" else -math.inf))
