"""Progress reports of a training run: the feature pass ("features"), mid-epoch ("train", at most every
progress_every steps or PROGRESS_MIN_INTERVAL_S seconds) and finished epochs ("epoch"), each with an ETA; and the
run's time budget (max_train_seconds). An exception raised by the callback propagates: it is how a run is
cancelled."""

from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_MIN_INTERVAL_S = 15.0


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


class Progress:
    """The run's clock and progress callback. ETA: the mean train step time so far times the steps left, plus the
    last evaluation's time per evaluation left, capped by what is left of max_s (max_train_seconds)."""

    def __init__(
        self,
        callback: Callable[[dict], None] | None,
        *,
        epochs: int,
        steps_per_epoch: int,
        progress_every: int,
        max_s: float | None,
        t_start: float,
        weights: dict,
    ):
        self.callback = callback
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.progress_every = progress_every
        self.max_s = max_s
        self.t_start = t_start
        self.weights = weights  # where the backbone's weights came from: in every report
        self.step_time = 0.0  # seconds spent in train steps (progress calls excluded)
        self.steps_done = 0
        self.eval_time = 0.0  # seconds of the last evaluation
        self.last_progress = time.monotonic()
        self.t_step = self.last_progress

    def eta(self, epoch: int, step: int) -> float:
        per_step = self.step_time / max(1, self.steps_done)
        remaining_steps = self.total_steps - ((epoch - 1) * self.steps_per_epoch + step)
        remaining_evals = self.epochs - epoch + (1 if step < self.steps_per_epoch else 0)
        value = per_step * remaining_steps + self.eval_time * remaining_evals
        if self.max_s is not None:
            value = min(value, max(0.0, self.max_s - (time.monotonic() - self.t_start)))
        return float(value)

    def time_up(self, now: float) -> bool:
        """Whether max_train_seconds have passed at monotonic time `now`."""
        return self.max_s is not None and now - self.t_start > self.max_s

    def start_steps(self) -> None:
        self.t_step = time.monotonic()

    def train_step(self, epoch: int, step: int, time_up: bool, *, loss: float, lr: Callable[[], float]) -> None:
        """Count a finished train step; report it (not the epoch's last step) every progress_every steps or
        PROGRESS_MIN_INTERVAL_S seconds."""
        now = time.monotonic()
        self.step_time += now - self.t_step
        self.t_step = now
        self.steps_done += 1
        if (
            self.callback is not None
            and step < self.steps_per_epoch
            and not time_up
            and (step % self.progress_every == 0 or now - self.last_progress >= PROGRESS_MIN_INTERVAL_S)
        ):
            self.callback(
                {
                    "phase": "train",
                    "epoch": epoch,
                    "epochs": self.epochs,
                    "step": step,
                    "steps_per_epoch": self.steps_per_epoch,
                    "loss": loss,
                    "metrics": {},
                    "eta_s": self.eta(epoch, step),
                    "lr": lr(),
                    "pretrained": self.weights,
                }
            )
            self.last_progress = time.monotonic()
            self.t_step = self.last_progress

    def epoch_done(self, epoch: int, train_loss, result: dict, metrics_on: str, eta_s: float) -> None:
        """Report a finished epoch (epoch_progress)."""
        if self.callback is None:
            return
        self.callback(
            {
                **epoch_progress(
                    epoch=epoch,
                    epochs=self.epochs,
                    steps_per_epoch=self.steps_per_epoch,
                    train_loss=train_loss,
                    result=result,
                    metrics_on=metrics_on,
                    eta_s=eta_s,
                ),
                "pretrained": self.weights,
            }
        )
        self.last_progress = time.monotonic()

    def features(self) -> Callable[[dict], None]:
        """The feature pass's progress callback (features_progress)."""
        return features_progress(self.callback, epochs=self.epochs, weights=self.weights)
