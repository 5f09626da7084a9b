"""One epoch: train_one_epoch (forward, masked loss, backward with gradient accumulation, optimizer and per-step
scheduler steps), evaluate on the validation loader, the epoch's history record, and best-epoch selection /
early-stopping bookkeeping."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .checkpoint import TrainState
from .data import normalize_batch
from .hierarchy import decide
from .losses import _heads_loss
from .manifest import IGNORE_INDEX
from .optim import _group_lrs, optimizer_step
from .runtime import Amp

log = logging.getLogger("training.engine")


def prepare_batch(x: torch.Tensor, device: torch.device, mean, std) -> torch.Tensor:
    """A uint8 image batch (B, 3, H, W) on the device, normalised (channels-last memory on CUDA)."""
    x = normalize_batch(x.to(device, non_blocking=True), mean, std)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class Trainer:
    """What a training step uses: the model, its optimizer and scheduler, mixed precision, the input normalisation
    and the loss settings."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    sched_when: str | None  # when scheduler.step() is called: "step", "epoch" or None (no scheduler)
    amp: Amp
    device: torch.device
    mean: list[float]
    std: list[float]
    steps_per_epoch: int  # train batches per epoch
    accum: int  # batches per optimizer step
    has_bn: bool  # a batch of one cannot train BatchNorm: such batches are skipped
    label_smoothing: float
    class_weights: list
    head_weights: list[float] | None
    # Several processes (distributed.py): the process group, and the DDP wrapper of LossModule(model) over the
    # parameters that require a gradient (wrap_ddp builds it again when that set changes).
    dist: object | None = None  # distributed.Dist
    ddp: torch.nn.Module | None = None
    find_unused: bool = False
    ddp_params: tuple = field(default=(), repr=False)
    grads_unsynced: bool = False  # a backward ran under DDP's no_sync since the last optimizer step

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The summed masked per-head loss of a prepared batch (the model's forward under autocast)."""
        with self.amp.autocast():
            logits, feats = model(x)
        return _heads_loss(
            logits,
            y,
            self.label_smoothing,
            self.class_weights,
            self.head_weights,
            model=model,
            embeddings=feats,
        )

    def wrap_ddp(self) -> None:
        """(Re)wrap the model in DDP when the parameters that require a gradient changed (backbone frozen or
        unfrozen): DDP reduces the gradients of the parameters that required one when it was built."""
        from .distributed import LossModule, wrap  # noqa: PLC0415

        params = tuple(p for p in self.model.parameters() if p.requires_grad)
        if self.ddp is not None and [id(p) for p in params] == [id(p) for p in self.ddp_params]:
            return
        self.ddp = None  # the old wrapper's reducer goes with it
        self.ddp = wrap(LossModule(self.model, self.loss), self.dist, find_unused=self.find_unused)
        self.ddp_params = params

    def forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, step: int, *, weight: float = 1.0, sync: bool = True
    ) -> float:
        """Loss of the batch at (1-based) `step`, its gradient accumulated; the gradient is divided by the number
        of batches of its accumulation group (the last group of an epoch may be shorter). Under DDP the gradient is
        also multiplied by `weight` (the process's share of the batch, Dist.step_plan) and averaged over the
        processes unless sync=False (inside an accumulation group)."""
        x = prepare_batch(x, self.device, self.mean, self.std)
        y = y.to(self.device, non_blocking=True)
        group_start = (step - 1) // self.accum * self.accum + 1
        group_len = min(self.accum, self.steps_per_epoch - group_start + 1)
        if self.ddp is None:
            loss = self.loss(self.model, x, y)
            scaled = loss / group_len if group_len > 1 else loss
            context = nullcontext()
        else:
            context = nullcontext() if sync else self.ddp.no_sync()
        with context:
            if self.ddp is not None:
                loss = self.ddp(x, y)
                scaled = loss * (weight / group_len)
            if self.amp.scaler is not None:
                self.amp.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if self.ddp is not None:
            self.grads_unsynced = not sync
        return float(loss.detach())

    def optimizer_step(self, pending: bool) -> None:
        """The end of an accumulation group: an optimizer step when it has gradients, else a no-op step that keeps
        the scheduler's step bookkeeping in order (no gradient: unreadable or size-1 batches); then the per-step
        scheduler step."""
        if self.ddp is not None and self.grads_unsynced:  # stopped inside an accumulation group
            self.dist.average_grads(self.ddp_params)
            self.grads_unsynced = False
        if pending:
            optimizer_step(self.optimizer, self.amp.scaler)
        else:
            self.optimizer.step()
        if self.sched_when == "step":
            self.scheduler.step()


def train_one_epoch(
    tr: Trainer, loader, epoch: int, state: TrainState, *, on_bad: Callable[[list, str], None], clock
) -> dict:
    """One pass over the train loader (counts in `state`), stopped early when clock.time_up() (then
    state.stopped_early = "time_limit"). clock also gets each step's report (progress.Progress). Returns
    {"loss": mean train loss or None, "samples": images trained on, "steps": batches, "lrs": the group lrs of the
    epoch's last optimizer step}.

    Under DDP (tr.dist) the loader yields this process's share of each batch; whether a step trains and whether
    time is up are decided by all processes together, and the returned loss and samples are the whole batch's
    (the mid-epoch progress reports show this process's loss)."""
    optimizer = tr.optimizer
    dist = tr.dist
    loss_sum, loss_n, samples = 0.0, 0, 0
    loss_share = 0.0  # under DDP: sum over steps of this process's part of the global batch's mean loss
    step = 0
    pending = False  # gradients accumulated since the last optimizer step
    epoch_lrs = _group_lrs(optimizer)
    optimizer.zero_grad(set_to_none=True)
    clock.start_steps()
    for step, (x, y, _idx, bad) in enumerate(loader, 1):
        on_bad(bad, "train")
        state.global_step += 1
        usable = x is not None and not (tr.has_bn and x.shape[0] < 2)
        weight = 1.0
        if dist is not None:  # every process trains the step, or none does (DDP waits for all of them)
            usable, weight = dist.step_plan(x.shape[0] if usable else 0, usable)
        if usable:
            sync = step % tr.accum == 0 or step == tr.steps_per_epoch
            loss = tr.forward_backward(x, y, step, weight=weight, sync=sync)
            loss_sum += loss
            loss_share += loss * weight / (dist.world if dist is not None else 1)
            pending = True
            loss_n += 1
            samples += x.shape[0]
        time_up = clock.time_up(time.monotonic())
        if dist is not None and clock.max_s is not None:
            time_up = dist.any_true(time_up)
        if step % tr.accum == 0 or step == tr.steps_per_epoch or time_up:
            epoch_lrs = _group_lrs(optimizer)  # the lr of the epoch's last optimizer step is recorded
            tr.optimizer_step(pending)
            pending = False
            state.optimizer_steps += 1
        clock.train_step(
            epoch, step, time_up, loss=loss_sum / max(1, loss_n), lr=lambda: _group_lrs(optimizer).get("heads")
        )
        if time_up:
            state.stopped_early = "time_limit"
            log.warning("max_train_seconds=%s reached during epoch %d step %d: stopping", clock.max_s, epoch, step)
            break
    optimizer.zero_grad(set_to_none=True)
    if dist is not None:  # loss_n is the same on every process (steps are trained by all or none)
        loss_sum, samples = dist.sum_floats([loss_share, samples])
        samples = int(samples)
    return {"loss": loss_sum / loss_n if loss_n else None, "samples": samples, "steps": step, "lrs": epoch_lrs}


def epoch_record(
    epoch: int,
    train_loss,
    result: dict,
    lrs: dict[str, float],
    *,
    backbone_frozen: bool,
    arcface_margin,
    seconds: float,
    steps: int,
    **extra,
) -> dict:
    """One epoch of metrics["history"]: losses, per-head metrics (without the raw per-class counts), the lrs."""
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": result["loss"],
        "heads": {n: {k: v for k, v in m.items() if k != "per_class_counts"} for n, m in result["heads"].items()},
        "primary": result["primary"],
        "lr": lrs.get("heads"),
        "lrs": lrs,
        "backbone_frozen": backbone_frozen,
        "arcface_margin": arcface_margin,
        "seconds": seconds,
        "steps": steps,
        **extra,
    }


def arcface_margin_degrees(model) -> float | None:
    """The ArcFace head's current margin in degrees; None without an ArcFace head."""
    if getattr(model, "arcface_head", None) is None:
        return None
    return round(math.degrees(model.arcface.margin), 4)


def cpu_state(model) -> dict:
    """A CPU copy of the model's state dict (the best epoch's weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def select_epoch(state: TrainState, epoch: int, value, result: dict, model, mode: str, min_delta: float) -> bool:
    """Judge the epoch against the best so far (_judge): count it for early stopping and make it the best epoch
    (state.best / best_state) when selected. Returns whether it was."""
    improved, selected = _judge(value, result["loss"], state.best, mode, min_delta)
    if improved:
        state.bad_epochs = 0
    elif value is not None:
        state.bad_epochs += 1
    if selected:
        state.best = {"epoch": epoch, "value": value, "loss": result["loss"], "result": result}
        state.best_state = cpu_state(model)
    return selected


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


@torch.inference_mode()
def evaluate(
    model,
    loader,
    heads: list[dict],
    device,
    autocast_ctx,
    on_bad: Callable[[list, str], None],
    mean,
    std,
    *,
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> dict:
    """Per head top-1/top-5 accuracy and mean CE over known labels; loss = sum over heads of the mean CE. Top-1 is
    the decision the Recognizer serves (hierarchy.decide: a child head decoded under its parent head, `heads` being
    the manifest's), top-5 the order of the same hierarchy-consistent probabilities. reduce (DDP:
    Dist.sum_tensors): the loader holds this process's share of the items; the counts are summed over the
    processes before the metrics are computed, so every process gets the same result."""
    model.eval()
    head_names = [h["name"] for h in heads]
    head_sizes = [len(h["classes"]) for h in heads]
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
        x = prepare_batch(x, device, mean, std)
        with autocast_ctx():
            logits, _ = model(x)
        logits = [lg.float().cpu() for lg in logits]
        q, pred = decide([F.softmax(lg, dim=1).numpy() for lg in logits], heads)
        for h, lg in enumerate(logits):
            yh = y[:, h]
            mask = yh != IGNORE_INDEX
            if not mask.any():
                continue
            lg, yh = lg[mask], yh[mask]
            k = min(5, head_sizes[h])
            topk = torch.from_numpy(q[h][mask.numpy()]).topk(k, dim=1).indices
            hit = torch.from_numpy(pred[h][mask.numpy()]) == yh
            correct1[h] += hit.sum()
            class_n[h] += torch.bincount(yh, minlength=head_sizes[h])
            class_ok[h] += torch.bincount(yh[hit], minlength=head_sizes[h])
            correct5[h] += (topk == yh[:, None]).any(dim=1).sum()
            counts[h] += yh.numel()
            ce_sum[h] += F.cross_entropy(lg, yh, reduction="sum").double()
    if reduce is not None:
        correct1, correct5, counts, ce_sum, *per_class = reduce(
            [correct1, correct5, counts, ce_sum, *class_n, *class_ok]
        )
        class_n, class_ok = per_class[: len(head_sizes)], per_class[len(head_sizes) :]
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


def no_readable_train_images(n_train: int, skipped: dict[str, str]) -> ValueError:
    """The error of a run none of whose train images could be read (with one of the reasons)."""
    first = next(iter(skipped.items()), None)
    return ValueError(
        f"none of the {n_train} train images could be read" + (f" (e.g. {first[0]}: {first[1]})" if first else "")
    )
