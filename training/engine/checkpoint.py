"""Checkpoints and exact resume: the run state a checkpoint carries (TrainState), the fingerprint that decides
whether a checkpoint may be resumed, the RNG states saved after each epoch, and CheckpointSaver, which writes
out_dir/checkpoints/ (latest.pt every epoch, best.pt, epoch-NNN.pt every `checkpoint_every` epochs; each file
written whole) and resumes from latest.pt."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic
from .config import RUNTIME_KEYS
from .manifest import ParsedManifest

log = logging.getLogger("training.engine")

CHECKPOINT_FORMAT = "loupe-ckpt-v1"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainState:
    """A run's progress besides the model/optimizer/scheduler/scaler tensors: what a checkpoint holds and a resumed
    run continues from."""

    t_start: float  # time.monotonic() at the start; a resumed run moves it back by the time already spent
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"epoch", "value", "loss", "result"}
    best_state: dict | None = None  # the best epoch's model state dict (CPU copies)
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    stopped_early: str | None = None  # None, "early_stopping" or "time_limit"
    global_step: int = 0  # train batches
    optimizer_steps: int = 0
    trained_samples_total: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable image path -> error
    rng: dict | None = None  # RNG states to restore at the next epoch's start (rng_state)
    phase1: dict | None = None  # {"on": "feature-cache", ...} when phase 1 trained the heads on cached features
    start_epoch: int = 1
    resumed_from: int | None = None  # the checkpoint's epoch when resumed


def rng_state(generator: torch.Generator) -> dict:
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


def set_rng_state(state: dict, generator: torch.Generator) -> None:
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


class CheckpointSaver:
    """out_dir/checkpoints/ of a run with this fingerprint: latest.pt after every epoch (before progress() is told,
    so a cancelled run resumes from there), best.pt when the epoch is the best so far, epoch-NNN.pt every `every`
    epochs (0: never); each written to a temp name, then os.replace()d."""

    def __init__(self, out_dir: Path, fingerprint: str, every: int):
        self.dir = Path(out_dir) / CHECKPOINT_DIR
        self.latest = self.dir / "latest.pt"
        self.fingerprint = fingerprint
        self.every = every

    def clear(self) -> None:
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            name = path.name
            if path.is_file() and (
                name in ("latest.pt", "best.pt")
                or (name.startswith("epoch-") and name.endswith(".pt"))
                or ".tmp-" in name  # older releases' temp names
                or (name.startswith(".") and name.endswith(".tmp"))  # atomic.write_atomic's, left by a hard kill
            ):
                path.unlink()

    def find_latest(self) -> dict | None:
        """latest.pt if it exists, is readable and has this fingerprint; None otherwise (logged)."""
        path = self.latest
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
        if ckpt.get("fingerprint") != self.fingerprint:
            log.warning(
                "checkpoint %s was written for other data or another config (fingerprint mismatch): not resuming "
                "it; starting fresh and replacing the old checkpoints",
                path,
            )
            return None
        return ckpt

    def resume(
        self, state: TrainState, *, model, optimizer, scheduler, scaler, fresh: bool, resume: bool, cfg: dict
    ) -> None:
        """fresh: delete the checkpoints. resume: load latest.pt into the model, optimizer, scheduler, scaler and
        state when it has this fingerprint and fits; otherwise (logged) delete the checkpoints and start fresh.
        The checkpoint folder exists afterwards."""
        ckpt = None
        if fresh:
            self.clear()
        elif resume:
            ckpt = self.find_latest()
            why = _fits(ckpt, model, optimizer) if ckpt is not None else None
            if why:
                log.warning("checkpoint %s does not fit this model (%s): starting fresh", self.latest, why)
                ckpt = None
            if ckpt is None:
                self.clear()
        if ckpt is not None:
            self._restore(ckpt, state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, cfg=cfg)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _restore(self, ckpt: dict, state: TrainState, *, model, optimizer, scheduler, scaler, cfg: dict) -> None:
        model.load_state_dict(ckpt["model"])
        # The checkpoint may come from another device: keep this run's "fused" setting (it also decides where
        # load_state_dict puts AdamW's step counters).
        fused = optimizer.param_groups[0].get("fused")
        opt_state = dict(ckpt["optimizer"])
        opt_state["param_groups"] = [{**g, "fused": fused} if "fused" in g else g for g in opt_state["param_groups"]]
        optimizer.load_state_dict(opt_state)
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        state.history = list(ckpt["history"])
        state.best = ckpt["best"]
        state.best_state = ckpt["model"] if ckpt["best_model"] is None else ckpt["best_model"]
        state.bad_epochs = ckpt["bad_epochs"]
        state.stopped_early = ckpt["stopped_early"]
        state.global_step = ckpt["global_step"]
        state.optimizer_steps = ckpt["optimizer_steps"]
        state.trained_samples_total = ckpt["trained_samples_total"]
        state.skipped.update(ckpt["skipped"])
        state.t_start -= ckpt["elapsed_s"]
        state.rng = ckpt["rng"]
        state.phase1 = ckpt.get("phase1")
        state.resumed_from = ckpt["epoch"]
        state.start_epoch = state.resumed_from + 1
        if state.stopped_early == "time_limit" and (
            cfg["max_train_seconds"] is None or ckpt["elapsed_s"] < cfg["max_train_seconds"]
        ):
            state.stopped_early = None  # more time now: go on
        if state.start_epoch > cfg["epochs"] or state.stopped_early:
            log.info("checkpoint %s: training had finished at epoch %d", self.latest, state.resumed_from)
        else:
            log.info(
                "resuming from checkpoint %s: epoch %d done, continuing at epoch %d",
                self.dir,
                state.resumed_from,
                state.start_epoch,
            )

    def save(self, epoch: int, is_best: bool, state: TrainState, *, model, optimizer, scheduler, scaler) -> None:
        """latest.pt for the finished epoch, copied to best.pt / epoch-NNN.pt where due."""
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "global_step": state.global_step,
            "optimizer_steps": state.optimizer_steps,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best": state.best,
            "best_model": None if state.best["epoch"] == epoch else state.best_state,
            "history": state.history,
            "bad_epochs": state.bad_epochs,
            "stopped_early": state.stopped_early,
            "trained_samples_total": state.trained_samples_total,
            "skipped": dict(state.skipped),
            "elapsed_s": time.monotonic() - state.t_start,
            "rng": state.rng,
            "phase1": state.phase1,
        }
        latest = self.latest
        write_atomic(latest, lambda tmp: torch.save(ckpt, tmp))
        copies = []
        if is_best:
            copies.append(self.dir / "best.pt")
        if self.every and epoch % self.every == 0:
            copies.append(self.dir / f"epoch-{epoch:03d}.pt")
        for path in copies:
            write_atomic(path, lambda tmp: shutil.copyfile(latest, tmp))
