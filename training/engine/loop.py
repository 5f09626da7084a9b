"""train_model: the training loop (AdamW + warm-up/cosine, per-head masked cross-entropy, per-epoch
validation, best-epoch selection, atomic artifact writing)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import resolve_config
from .data import ManifestDataset, collate_skip, draft_size, eval_transform, normalize_batch, train_transform
from .manifest import IGNORE_INDEX, parse_manifest
from .model import ARTIFACT_FORMAT, build_model

log = logging.getLogger("training.engine")

MIN_LR_RATIO = 0.01  # cosine decays to lr * MIN_LR_RATIO
PROGRESS_MIN_INTERVAL_S = 15.0


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


def _atomic_write_bytes_via(path: Path, writer: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data) -> None:
    text = json.dumps(_clean(data), indent=1, allow_nan=False)
    _atomic_write_bytes_via(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and norm weights
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    logits: list[torch.Tensor], y: torch.Tensor, label_smoothing: float, weights: list | None = None
) -> torch.Tensor:
    """Sum over heads of the (class-weighted) mean cross-entropy over the samples whose label is known."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    for h, lg in enumerate(logits):
        yh = y[:, h]
        known = yh != IGNORE_INDEX
        w = weights[h] if weights else None
        if w is None:
            n = known.sum().clamp_min(1)
        else:
            w = w.to(lg.device)
            n = w[yh[known]].sum().clamp_min(1e-6)
        ce = F.cross_entropy(
            lg.float(), yh, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
        )
        total = total + ce / n
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
    top1s = [m["top1"] for m in heads.values() if m["top1"] is not None]
    return {
        "heads": heads,
        "primary": sum(top1s) / len(top1s) if top1s else None,
        "loss": sum(losses) if losses else None,
    }


# ------------------------------------------------------------------------------------------------- train
def train_model(
    manifest: dict, config: dict | None, out_dir, *, progress: Callable[[dict], None] | None = None
) -> dict:
    """Train on the manifest's "train" items, select the best epoch on "val", write the artifacts into
    out_dir (model.pt, label_maps.json, metrics.json, config.json, each atomically) and return the metrics.

    Items of split "test" are never read. Unreadable image files are skipped (logged, counted in
    metrics["skipped_files"]). A bad manifest or config raises ValueError before any training. An exception
    raised by `progress` aborts training (use it to cancel) and propagates; nothing is written then."""
    t_start = time.monotonic()
    cfg = resolve_config(config)
    parsed = parse_manifest(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg["device"])
    num_workers = resolve_num_workers(cfg["num_workers"])
    seed_everything(cfg["seed"])

    prev_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(resolve_torch_threads(cfg["torch_threads"], num_workers))
    try:
        return _train(parsed, cfg, out_dir, device, num_workers, progress, t_start)
    finally:
        torch.set_num_threads(prev_threads)


def _train(parsed, cfg, out_dir: Path, device: torch.device, num_workers: int, progress, t_start: float) -> dict:
    head_names = parsed.head_names
    head_sizes = [len(h["classes"]) for h in parsed.heads]
    model, info = build_model(cfg, parsed.heads)  # may raise ValueError (pretrained_path)
    mean, std = info["mean"], info["std"]
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

    # ---- data
    n_train = len(parsed.train)
    bs = min(cfg["batch_size"], n_train)
    gen = torch.Generator()
    gen.manual_seed(cfg["seed"])
    loader_kw = dict(
        num_workers=num_workers,
        collate_fn=collate_skip,
        pin_memory=is_cuda,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers else None,
    )
    train_ds = ManifestDataset(parsed.train, train_transform(cfg), min_side=draft_size(cfg["image_size"], 1.5))
    train_loader = DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=n_train > bs, generator=gen, **loader_kw)
    metrics_on = "val" if parsed.val else "train"
    eval_items = parsed.val if parsed.val else parsed.train
    eval_ds = ManifestDataset(eval_items, eval_transform(cfg["image_size"]), min_side=draft_size(cfg["image_size"]))
    eval_loader = DataLoader(eval_ds, batch_size=max(1, cfg["batch_size"] * 2), shuffle=False, **loader_kw)
    if metrics_on == "train":
        log.warning("no val items: metrics are computed on the train split (optimistic)")

    # ---- optimisation
    epochs = cfg["epochs"]
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(int(round(cfg["warmup_epochs"] * steps_per_epoch)), max(0, total_steps - 1))
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg["weight_decay"]), lr=cfg["lr"], betas=(0.9, 0.999), fused=is_cuda or None
    )
    lr_at = _lr_lambda(total_steps, warmup_steps)  # per-step factor, applied by hand (no LR-scheduler state)
    global_step = 0
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

    history: list[dict] = []
    best = None  # (key, epoch, state_dict, eval result)
    stopped_early = None
    step_time = 0.0
    steps_done = 0
    eval_time = 0.0
    last_progress = time.monotonic()
    max_s = cfg["max_train_seconds"]
    trained_samples_total = 0

    def eta(epoch: int, step: int) -> float:
        per_step = step_time / max(1, steps_done)
        remaining_steps = total_steps - ((epoch - 1) * steps_per_epoch + step)
        remaining_evals = epochs - epoch + (1 if step < steps_per_epoch else 0)
        value = per_step * remaining_steps + eval_time * remaining_evals
        if max_s is not None:
            value = min(value, max(0.0, max_s - (time.monotonic() - t_start)))
        return float(value)

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
    for epoch in range(1, epochs + 1):
        model.train()
        t_epoch = time.monotonic()
        loss_sum, loss_n, samples_epoch = 0.0, 0, 0
        step = 0
        t_step = time.monotonic()
        for step, (x, y, _idx, bad) in enumerate(train_loader, 1):
            on_bad(bad, "train")
            for group in optimizer.param_groups:
                group["lr"] = cfg["lr"] * lr_at(global_step)
            global_step += 1
            if x is not None and not (has_bn and x.shape[0] < 2):
                x = normalize_batch(x.to(device, non_blocking=True), mean, std)
                y = y.to(device, non_blocking=True)
                if is_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast_ctx():
                    logits, _ = model(x)
                loss = _heads_loss(logits, y, cfg["label_smoothing"], loss_weights)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None and scaler.is_enabled():
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                loss_sum += float(loss.detach())
                loss_n += 1
                samples_epoch += x.shape[0]
            now = time.monotonic()
            step_time += now - t_step
            t_step = now
            steps_done += 1
            time_up = max_s is not None and now - t_start > max_s
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
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                )
                last_progress = time.monotonic()
                t_step = last_progress
            if time_up:
                stopped_early = "time_limit"
                log.warning("max_train_seconds=%s reached during epoch %d step %d: stopping", max_s, epoch, step)
                break
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
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": result["loss"],
            "heads": {n: {k: v for k, v in m.items() if k != "per_class_counts"} for n, m in result["heads"].items()},
            "primary": result["primary"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.monotonic() - t_epoch, 3),
            "steps": step,
        }
        history.append(record)
        key = (
            result["primary"] if result["primary"] is not None else -1.0,
            -result["loss"] if result["loss"] is not None else -math.inf,
            epoch,
        )
        if best is None or key > best[0]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = (key, epoch, state, result)
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
                    "phase": "epoch",
                    "epoch": epoch,
                    "epochs": epochs,
                    "step": steps_per_epoch,
                    "steps_per_epoch": steps_per_epoch,
                    "loss": train_loss if train_loss is not None else 0.0,
                    "val_loss": result["loss"],
                    "metrics": {
                        n: {"top1": m["top1"], "top5": m["top5"], "n_val": m["n_val"]}
                        for n, m in result["heads"].items()
                    },
                    "primary": result["primary"],
                    "metrics_on": metrics_on,
                    "eta_s": 0.0 if stopped_early else eta(epoch, steps_per_epoch),
                }
            )
            last_progress = time.monotonic()
        if stopped_early:
            break

    _, best_epoch, best_state, best_result = best
    label_maps = parsed.label_maps
    metrics = {
        "heads": {
            name: _with_per_class(best_result["heads"][name], parsed.heads[h]["classes"], n_known[h])
            for h, name in enumerate(head_names)
        },
        "primary": best_result["primary"],
        "best_epoch": best_epoch,
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
        "embedding_dim": info["embedding_dim"],
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "seconds": None,
    }
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
    log.info("best epoch %d, mean top1 %s, written to %s", best_epoch, _fmt(metrics["primary"]), out_dir)
    return metrics


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
