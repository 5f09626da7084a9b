"""Tests of the training loop's options: optimizers, LR schedules, gradient accumulation, per-head loss weights,
backbone freezing, early stopping / best-epoch selection, checkpoints and resume (CPU only, tiny images)."""

import copy
import logging
import math
import random

import pytest
import torch
from PIL import Image

from training.engine import parse_manifest, resolve_config, train_model
from training.engine.losses import _heads_loss
from training.engine.model import build_model, freezable_backbone_params
from training.engine.optim import MIN_LR_RATIO, _lr_lambda
from training.engine.runtime import seed_everything
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset


def tiny(**over):
    return {**TINY_TEST_CONFIG, **over}


class Killed(Exception):
    pass


def kill_after(epoch):
    def progress(p):
        if p["phase"] == "epoch" and p["epoch"] == epoch:
            raise Killed(f"killed after epoch {epoch}")

    return progress


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    m = make_shapes_dataset(root / "img", n=32, size=32, shapes=("square", "circle"))
    for i, it in enumerate(m["items"]):
        it["source"] = "synthetic" if i % 3 == 0 else "real"
    for i in range(2):  # never opened: training must not touch the test split
        m["items"].append(
            {"id": 900 + i, "path": str(root / "missing" / f"t{i}.png"), "labels": {"color": "red"}, "split": "test"}
        )
    return m


def train(manifest, out, **kw):
    progress = kw.pop("progress", None)
    flags = {k: kw.pop(k) for k in ("resume", "fresh") if k in kw}
    return train_model(copy.deepcopy(manifest), tiny(**kw), out, progress=progress, **flags)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def without_time(metrics):
    out = {k: v for k, v in metrics.items() if k not in ("seconds", "resumed_from_epoch")}
    out["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]
    return out


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def initial_model(manifest, **kw):
    """The model train_model starts from (same seed, same construction order)."""
    cfg = resolve_config(tiny(**kw))
    seed_everything(cfg["seed"])
    model, _ = build_model(cfg, parse_manifest(copy.deepcopy(manifest)).heads)
    return model


# ------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "options",
    [
        {},  # AdamW + warm-up cosine, default augmentations
        {
            "optimizer": "sgd",
            "lr": 0.02,
            "scheduler": "plateau",
            "plateau_patience": 0,
            "accumulate_steps": 2,
            "freeze_backbone_epochs": 1,
            "early_stopping": {"metric": "val_loss"},
        },
        {  # P x K batches and the strong augmentation preset (blur + noise)
            "sampler": "pk",
            "pk_p": 2,
            "pk_k": 4,
            "augment": "strong",
        },
        {  # a source curriculum: the weighted sampler's draw changes per epoch
            "sampler": "weighted",
            "source_curriculum": [
                {"until_epoch": 2, "weights": {"synthetic": 0.8, "real": 0.2}},
                {"weights": {"real": 0.7, "synthetic": 0.3}},
            ],
        },
    ],
    ids=["adamw-cosine", "sgd-plateau-accum-freeze", "pk-strong-aug", "curriculum"],
)
def test_resume_after_kill_equals_uninterrupted(manifest, tmp_path, options):
    def noisy_progress(p):  # a callback that uses the global RNGs must not change the training
        random.random()
        torch.rand(3)

    full = train(manifest, tmp_path / "full", epochs=4, progress=noisy_progress, **options)
    assert "resumed_from_epoch" not in full and full["skipped_files"] == 0

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(manifest, out, epochs=4, progress=kill_after(2), **options)
    assert not (out / "model.pt").exists()  # an aborted run writes no artifact ...
    assert load(out / "checkpoints" / "latest.pt")["epoch"] == 2  # ... but its checkpoints are on disk
    resumed = train(manifest, out, epochs=4, **options)

    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 4
    assert without_time(resumed) == without_time(full)
    assert_same_tensors(load(out / "model.pt")["state_dict"], load(tmp_path / "full" / "model.pt")["state_dict"])
    a, b = load(out / "checkpoints" / "latest.pt"), load(tmp_path / "full" / "checkpoints" / "latest.pt")
    assert a["epoch"] == b["epoch"] == 4
    assert_same_tensors(a["model"], b["model"])  # the last epoch, not only the best one
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]


def test_checkpoint_contents_and_finished_run(manifest, tmp_path):
    out = tmp_path / "run"
    m = train(manifest, out, epochs=3, checkpoint_every=2)
    ckpt_dir = out / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "epoch-002.pt", "latest.pt"]
    ckpt = load(ckpt_dir / "latest.pt")
    for key in ("model", "optimizer", "scheduler", "epoch", "global_step", "best", "history", "bad_epochs", "rng"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 3 and len(ckpt["history"]) == 3 and ckpt["best"]["epoch"] == m["best_epoch"]
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "loader"}
    assert ckpt["scheduler"]["last_epoch"] == ckpt["optimizer_steps"]
    assert load(ckpt_dir / "epoch-002.pt")["epoch"] == 2
    best = load(ckpt_dir / "best.pt")
    assert best["epoch"] == m["best_epoch"]
    assert_same_tensors(best["model"], load(out / "model.pt")["state_dict"])
    # Calling again on a finished run trains nothing and gives the same result.
    again = train(manifest, out, epochs=3, checkpoint_every=2)
    assert again["resumed_from_epoch"] == 3
    assert without_time(again) == without_time(m)


def test_mismatched_checkpoint_is_not_resumed(manifest, tmp_path, caplog):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(manifest, out, epochs=3, progress=kill_after(1))
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        m = train(manifest, out, epochs=3, lr=1e-3)  # another config: must start over
    assert any("fingerprint mismatch" in r.getMessage() and "starting fresh" in r.getMessage() for r in caplog.records)
    assert "resumed_from_epoch" not in m and [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert load(out / "checkpoints" / "latest.pt")["epoch"] == 3

    other = copy.deepcopy(manifest)  # other data, same config
    other["items"] = [it for it in other["items"] if it["id"] != 1]
    with caplog.at_level(logging.WARNING, logger="training.engine"):
        m2 = train(other, out, epochs=3, lr=1e-3)
    assert "resumed_from_epoch" not in m2 and m2["n_train"] == m["n_train"] - 1


def test_runtime_keys_do_not_block_resume(manifest, tmp_path, caplog):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(manifest, out, epochs=2, progress=kill_after(1))
    with caplog.at_level(logging.INFO, logger="training.engine"):
        m = train(manifest, out, epochs=2, progress_every=1, torch_threads=1, max_train_seconds=600)
    assert m["resumed_from_epoch"] == 1
    assert any("resuming" in r.getMessage() and "epoch 2" in r.getMessage() for r in caplog.records)


def test_fresh_restarts_and_deletes_checkpoints(manifest, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(manifest, out, epochs=3, checkpoint_every=1, progress=kill_after(2))
    assert (out / "checkpoints" / "epoch-002.pt").is_file()
    calls = []
    m = train(manifest, out, epochs=3, fresh=True, progress=calls.append)
    assert "resumed_from_epoch" not in m and [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert [c["epoch"] for c in calls if c["phase"] == "epoch"] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "latest.pt"]


# --------------------------------------------------------------------------------- optimizers & schedules
def lrs(metrics):
    return [h["lr"] for h in metrics["history"]]


def test_cosine_with_warmup_follows_schedule(manifest, tmp_path):
    m = train(manifest, tmp_path / "run", epochs=3, lr=0.01, warmup_epochs=1.0)
    steps = m["history"][0]["steps"]  # 24 train items, batch 8: 3 steps per epoch
    f = _lr_lambda(3 * steps, steps)
    assert lrs(m) == pytest.approx([0.01 * f(e * steps - 1) for e in (1, 2, 3)])
    assert lrs(m)[0] == pytest.approx(0.01)  # the warm-up ends at the last step of epoch 1


def test_sgd_cosine_restarts(manifest, tmp_path):
    m = train(
        manifest, tmp_path / "run", epochs=4, optimizer="sgd", lr=0.05, scheduler="cosine_restarts", restart_epochs=2
    )
    assert m["epochs_run"] == 4 and all(math.isfinite(h["train_loss"]) for h in m["history"])
    steps = m["history"][0]["steps"]
    t0 = 2 * steps
    eta_min = 0.05 * MIN_LR_RATIO

    def expected(t_cur):
        return eta_min + (0.05 - eta_min) * (1 + math.cos(math.pi * t_cur / t0)) / 2

    # recorded lr = lr of each epoch's last step; the cycle restarts after epoch 2
    assert lrs(m) == pytest.approx([expected(steps - 1), expected(2 * steps - 1)] * 2)
    assert lrs(m)[2] > lrs(m)[1]
    opt = load(tmp_path / "run" / "checkpoints" / "latest.pt")["optimizer"]
    assert opt["param_groups"][0]["momentum"] == 0.9 and opt["param_groups"][0]["nesterov"] is True


def test_plateau_reduces_lr_when_metric_stalls(manifest, tmp_path):
    m = train(
        manifest,
        tmp_path / "run",
        epochs=4,
        lr=0.01,
        scheduler="plateau",
        plateau_patience=0,
        plateau_factor=0.5,
        early_stopping={"metric": "primary", "min_delta": 1.0},  # top-1 can never improve by 1.0
    )
    assert lrs(m) == pytest.approx([0.01, 0.01, 0.005, 0.0025])  # the first epoch sets the reference


def test_accumulate_steps(manifest, tmp_path):
    out = tmp_path / "run"
    m = train(manifest, out, epochs=2, batch_size=4, accumulate_steps=4, scheduler="none", lr=0.002)
    steps = m["history"][0]["steps"]  # 24 / 4 = 6 batches -> groups of 4 + 2 -> 2 optimizer steps per epoch
    assert steps == 6 and lrs(m) == [0.002, 0.002]
    ckpt = load(out / "checkpoints" / "latest.pt")
    assert ckpt["global_step"] == 12 and ckpt["optimizer_steps"] == 4
    assert all(int(s["step"]) == 4 for s in ckpt["optimizer"]["state"].values())  # AdamW's own step counter


# ------------------------------------------------------------------------------------------------ freezing
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_freeze_backbone_epochs(manifest, tmp_path, fraction):
    out = tmp_path / "run"
    opts = dict(epochs=2, freeze_backbone_epochs=1, freeze_fraction=fraction, unfreeze_lr_mult=0.1, checkpoint_every=1)
    m = train(manifest, out, **opts)
    init = initial_model(manifest, **opts)
    frozen, _norms = freezable_backbone_params(init, fraction)
    frozen_names = {n for n, p in init.named_parameters() if any(p is q for q in frozen)}
    init_sd = init.state_dict()
    e1 = load(out / "checkpoints" / "epoch-001.pt")["model"]
    e2 = load(out / "checkpoints" / "epoch-002.pt")["model"]
    for name in frozen_names:
        assert torch.equal(e1[name], init_sd[name]), name  # frozen during epoch 1
    assert any(not torch.equal(e2[n], e1[n]) for n in frozen_names)  # trained after unfreezing
    assert not torch.equal(e1["heads.0.weight"], init_sd["heads.0.weight"])  # the heads trained in epoch 1
    if fraction == 1.0:  # the whole backbone, BatchNorm statistics included, is untouched
        for k, v in init_sd.items():
            if k.startswith("backbone."):
                assert torch.equal(e1[k], v), k
    else:
        rest = [n for n, _ in init.backbone.named_parameters(prefix="backbone") if n not in frozen_names]
        assert rest and any(not torch.equal(e1[n], init_sd[n]) for n in rest)
    h1, h2 = m["history"]
    assert h1["backbone_frozen"] and not h2["backbone_frozen"]
    assert h2["lrs"]["backbone"] == pytest.approx(0.1 * h2["lrs"]["heads"])


# ------------------------------------------------------------------------------------- head loss weights
def test_head_loss_weights(manifest, tmp_path):
    with pytest.raises(ValueError) as exc:
        train(manifest, tmp_path / "bad", head_loss_weights={"shape": 1.0, "colour": 2.0})
    for word in ("'head_loss_weights'", "'colour'", "'shape'", "'color'"):
        assert word in str(exc.value)
    assert not (tmp_path / "bad" / "model.pt").exists()
    with pytest.raises(ValueError, match="every head has weight 0"):
        train(manifest, tmp_path / "bad", head_loss_weights={"shape": 0, "color": 0})
    logits = [torch.randn(4, 2), torch.randn(4, 3)]
    y = torch.tensor([[0, 1], [1, 2], [0, 0], [1, -100]])
    parts = [_heads_loss([lg], y[:, h : h + 1], 0.0) for h, lg in enumerate(logits)]
    assert torch.isclose(_heads_loss(logits, y, 0.0, None, [0.5, 2.0]), 0.5 * parts[0] + 2.0 * parts[1])
    m = train(manifest, tmp_path / "ok", epochs=1, head_loss_weights={"shape": 0.0})
    assert m["epochs_run"] == 1


# ------------------------------------------------------------------------------- early stopping & selection
def test_early_stopping_and_val_loss_selection(manifest, tmp_path):
    out = tmp_path / "stop"
    m = train(manifest, out, epochs=8, early_stopping={"metric": "primary", "patience": 2, "min_delta": 1.0})
    assert m["stopped_early"] == "early_stopping" and m["epochs_run"] == 3
    primaries = [h["primary"] for h in m["history"]]
    assert m["primary"] == max(primaries)  # (ties broken by the lower val loss)
    again = train(manifest, out, epochs=8, early_stopping={"metric": "primary", "patience": 2, "min_delta": 1.0})
    assert again["epochs_run"] == 3 and again["resumed_from_epoch"] == 3  # a stopped run stays stopped

    m = train(manifest, tmp_path / "loss", epochs=4, lr=0.02, early_stopping={"metric": "val_loss"})
    losses = [h["val_loss"] for h in m["history"]]
    assert m["best_epoch"] == losses.index(min(losses)) + 1 and m["selection_metric"] == "val_loss"
    assert m["primary"] == m["history"][m["best_epoch"] - 1]["primary"]

    m = train(manifest, tmp_path / "head", epochs=2, early_stopping={"metric": "top1:color"})
    top1 = [h["heads"]["color"]["top1"] for h in m["history"]]
    assert top1[m["best_epoch"] - 1] == max(top1)
    with pytest.raises(ValueError, match="'top1:colour' names no head.*'top1:color'"):
        train(manifest, tmp_path / "bad", early_stopping={"metric": "top1:colour"})


# ------------------------------------------------------------------------------------------------- config
def test_new_config_defaults():
    cfg = resolve_config(None)
    assert cfg["optimizer"] == "adamw" and cfg["scheduler"] == "cosine" and cfg["accumulate_steps"] == 1
    assert cfg["early_stopping"] == {"metric": "primary", "patience": None, "min_delta": 0.0}
    assert cfg["head_loss_weights"] is None and cfg["freeze_backbone_epochs"] == 0 and cfg["checkpoint_every"] == 0
    cfg = resolve_config({"early_stopping": {"patience": 3.0}, "head_loss_weights": {"part": 2}, "momentum": 0})
    assert cfg["early_stopping"] == {"metric": "primary", "patience": 3, "min_delta": 0.0}
    assert cfg["head_loss_weights"] == {"part": 2.0} and cfg["momentum"] == 0.0
    assert resolve_config(cfg) == cfg


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"optimizer": "adam"}, ["'optimizer'", "'adamw'", "'sgd'"]),
        ({"momentum": 1.0}, ["'momentum'", "[0, 1)"]),
        ({"scheduler": "step"}, ["'scheduler'", "'cosine_restarts'", "'plateau'", "'none'"]),
        ({"restart_epochs": 0}, ["'restart_epochs'", "integer >= 1"]),
        ({"restart_mult": 1.5}, ["'restart_mult'", "integer >= 1"]),
        ({"plateau_patience": -1}, ["'plateau_patience'"]),
        ({"plateau_factor": 1.0}, ["'plateau_factor'", "(0, 1)"]),
        ({"accumulate_steps": 0}, ["'accumulate_steps'", "integer"]),
        ({"head_loss_weights": {"part": -1}}, ["'head_loss_weights'", "weight >= 0"]),
        ({"head_loss_weights": [1, 2]}, ["'head_loss_weights'", "dict"]),
        ({"early_stopping": 5}, ["'early_stopping'", "dict"]),
        ({"early_stopping": {"paitence": 3}}, ["'early_stopping'", "unknown key", "'paitence'", "'patience'"]),
        ({"early_stopping": {"metric": "top5"}}, ["'early_stopping.metric'", '"val_loss"', "top1:<head name>"]),
        ({"early_stopping": {"patience": 0}}, ["'early_stopping.patience'", "null"]),
        ({"early_stopping": {"min_delta": -0.1}}, ["'early_stopping.min_delta'", ">= 0"]),
        ({"freeze_backbone_epochs": -1}, ["'freeze_backbone_epochs'"]),
        ({"freeze_fraction": 0}, ["'freeze_fraction'", "(0, 1]"]),
        ({"freeze_fraction": 1.5}, ["'freeze_fraction'"]),
        ({"unfreeze_lr_mult": 0}, ["'unfreeze_lr_mult'", "> 0"]),
        ({"checkpoint_every": -1}, ["'checkpoint_every'"]),
    ],
)
def test_new_config_keys_rejected(overrides, words):
    with pytest.raises(ValueError) as exc:
        resolve_config(overrides)
    for w in words:
        assert w in str(exc.value)


def test_sampler_and_augmentation_keys_are_validated():
    with pytest.raises(ValueError, match="sampler"):
        resolve_config({"sampler": "random"})
    with pytest.raises(ValueError, match="augment"):
        resolve_config({"augment": "extreme"})
    with pytest.raises(ValueError, match="source"):
        resolve_config({"sampler": "weighted", "source_weights": {"reel": 1.0}})


def test_arcface_two_phases_embedding_and_export(manifest, tmp_path):
    """ArcFace head (pytorch-metric-learning): warm-up with the backbone frozen and margin 0, then the whole
    network with the target margin; the embedding is the ArcFace embedding; ONNX matches torch."""
    from inference.recognizer import Recognizer
    from training.engine.onnx_export import export_onnx

    out = tmp_path / "arc"
    m = train(
        manifest, out, epochs=3, head_type="arcface", arcface_dim=16, arcface_margin=20.0, freeze_backbone_epochs=1
    )
    hist = m["history"]
    assert [h["arcface_margin"] for h in hist] == [0.0, 20.0, 20.0]
    assert [h["backbone_frozen"] for h in hist] == [True, False, False]
    assert m["embedding_dim"] == 16
    sd = load(out / "model.pt")["state_dict"]
    assert "arcface.W" in sd and tuple(sd["arcface.W"].shape) == (16, 2)  # the shape head (leaf) is ArcFace
    rec = Recognizer.load(out)
    probs, emb = rec.predict([Image.new("RGB", (32, 32), (200, 30, 30))])
    assert emb.shape == (1, 16) and abs(float((emb**2).sum()) - 1) < 1e-4
    assert set(probs) == {"shape", "color"} and abs(float(probs["shape"].sum()) - 1) < 1e-5
    assert export_onnx(out)["max_abs_diff"] <= 1e-4
    # The ArcFace head learns: it beats chance on the separable toy data after a few epochs.
    assert m["heads"]["shape"]["top1"] is not None


def test_arcface_config_errors(manifest, tmp_path):
    with pytest.raises(ValueError, match="head_type"):
        resolve_config({"head_type": "cosface"})
    with pytest.raises(ValueError, match="arcface_margin"):
        resolve_config({"head_type": "arcface", "arcface_margin": 120})
    with pytest.raises(ValueError, match="arcface_head"):
        train(manifest, tmp_path / "x", head_type="arcface", arcface_head="wheels")


def test_learns_trivially_separable_colour(tmp_path):
    # red vs blue squares on light backgrounds: the model must get (nearly) every val image right
    manifest = make_shapes_dataset(tmp_path / "img", n=48, size=32, shapes=("square",))
    m = train_model(manifest, tiny(epochs=3), tmp_path / "out")
    assert m["n_val"] == 12
    assert m["heads"]["color"]["top1"] >= 0.9
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]


def test_no_val_items_metrics_on_train_and_time_limit(tmp_path):
    manifest = make_shapes_dataset(tmp_path / "img", n=16, size=32, val_every=0)
    m = train_model(manifest, tiny(epochs=5, max_train_seconds=0.01), tmp_path / "out")
    assert m["metrics_on"] == "train" and m["n_val"] == 0
    assert m["heads"]["color"]["n_val"] == 16  # evaluated on the train items, flagged above
    assert m["stopped_early"] == "time_limit" and m["epochs_run"] == 1
    assert (tmp_path / "out" / "model.pt").is_file()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "mean train (optimistic) top-1" in report and "n_train (optimistic)" in report
    assert "val top-1" not in report and "| n_val | 0 |" in report
