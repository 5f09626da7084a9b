"""Tests of the training run's progress reports and ETA (progress.Progress)."""

import time

from training.engine.progress import Progress


def test_train_step_reports_every_n_steps_and_eta():
    calls = []
    clock = Progress(
        calls.append, epochs=2, steps_per_epoch=4, progress_every=2, max_s=None, t_start=time.monotonic(), weights={}
    )
    clock.start_steps()
    for step in range(1, 5):
        clock.train_step(1, step, False, loss=0.5, lr=lambda: 0.1)
    assert [c["step"] for c in calls] == [2]  # not the epoch's last step: the epoch report follows
    assert calls[0]["phase"] == "train" and calls[0]["lr"] == 0.1 and calls[0]["eta_s"] >= 0
    assert clock.steps_done == 4
    clock.eval_time = 10.0
    assert clock.eta(2, 4) == 0.0 and clock.eta(1, 4) >= 10.0  # one evaluation left after epoch 1


def test_time_budget_caps_eta():
    t0 = time.monotonic()
    clock = Progress(None, epochs=10, steps_per_epoch=100, progress_every=20, max_s=5.0, t_start=t0, weights={})
    clock.eval_time = 100.0
    assert clock.eta(1, 0) <= 5.0
    assert not clock.time_up(t0 + 4.0) and clock.time_up(t0 + 6.0)
