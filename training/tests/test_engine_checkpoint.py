"""Tests of CheckpointSaver and the RNG states of exact resume (the end-to-end resume tests are in
test_engine_loop.py)."""

import logging
import random

import numpy as np
import torch

from training.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointSaver, TrainState, rng_state, set_rng_state


def parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_save_writes_latest_best_and_every_nth(tmp_path):
    model, opt = parts()
    saver = CheckpointSaver(tmp_path, "fp", every=2)
    state = TrainState(t_start=0.0, best={"epoch": 1, "value": 0.5, "loss": 1.0, "result": {}})
    state.best_state = {k: v.clone() for k, v in model.state_dict().items()}
    saver.resume(state, model=model, optimizer=opt, scheduler=None, scaler=None, fresh=False, resume=True, cfg={})
    saver.save(1, True, state, model=model, optimizer=opt, scheduler=None, scaler=None)
    saver.save(2, False, state, model=model, optimizer=opt, scheduler=None, scaler=None)
    names = sorted(p.name for p in saver.dir.iterdir())
    assert names == ["best.pt", "epoch-002.pt", "latest.pt"]
    latest = torch.load(saver.latest, weights_only=True)
    assert latest["format"] == CHECKPOINT_FORMAT and latest["epoch"] == 2 and latest["fingerprint"] == "fp"
    assert latest["best_model"].keys() == state.best_state.keys()  # epoch 2 is not the best: its weights travel along
    assert torch.load(saver.dir / "best.pt", weights_only=True)["epoch"] == 1


def test_resume_restores_state_and_refuses_other_fingerprints(tmp_path, caplog):
    model, opt = parts()
    cfg = {"epochs": 5, "max_train_seconds": None}
    saver = CheckpointSaver(tmp_path, "fp", every=0)
    saver.dir.mkdir(parents=True)
    state = TrainState(t_start=0.0, best={"epoch": 3, "value": 0.5, "loss": 1.0, "result": {}}, history=[{"epoch": 3}])
    state.skipped["/x.jpg"] = "unreadable"
    saver.save(3, True, state, model=model, optimizer=opt, scheduler=None, scaler=None)
    new_model, new_opt = parts()
    with torch.no_grad():
        new_model.weight.zero_()
    resumed = TrainState(t_start=100.0)
    saver.resume(
        resumed, model=new_model, optimizer=new_opt, scheduler=None, scaler=None, fresh=False, resume=True, cfg=cfg
    )
    assert resumed.start_epoch == 4 and resumed.resumed_from == 3 and resumed.history == [{"epoch": 3}]
    assert resumed.skipped == {"/x.jpg": "unreadable"} and resumed.t_start < 100.0
    assert torch.equal(new_model.weight, model.weight)

    other = CheckpointSaver(tmp_path, "another", every=0)
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        assert other.find_latest() is None
    assert "fingerprint mismatch" in caplog.text
    fresh_state = TrainState(t_start=0.0)
    other.resume(
        fresh_state, model=new_model, optimizer=new_opt, scheduler=None, scaler=None, fresh=False, resume=True, cfg=cfg
    )
    assert fresh_state.start_epoch == 1 and not other.latest.exists()  # mismatching checkpoints are replaced


def test_unreadable_checkpoint_and_clear(tmp_path):
    saver = CheckpointSaver(tmp_path, "fp", every=0)
    saver.dir.mkdir(parents=True)
    saver.latest.write_bytes(b"not a torch file")
    (saver.dir / "notes.txt").write_text("kept")
    (saver.dir / ".latest.pt.k3j9x.tmp").write_bytes(b"half")  # atomic.write_atomic's temp, left by a hard kill
    assert saver.find_latest() is None
    saver.clear()
    assert [p.name for p in saver.dir.iterdir()] == ["notes.txt"]


def test_rng_state_round_trip():
    gen = torch.Generator()
    gen.manual_seed(7)
    snap = rng_state(gen)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)), torch.randperm(10, generator=gen).tolist())
    set_rng_state(snap, gen)
    again = (random.random(), float(np.random.rand()), float(torch.rand(1)), torch.randperm(10, generator=gen).tolist())
    assert first == again
