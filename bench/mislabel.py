"""Mislabel detection on real photos with injected label noise: the product's mislabel queue on its pretrained
default (out-of-fold heads on cached frozen features) beside cleanlab on a linear probe of the same features,
measured in the same run (target: top-N precision and recall >= 0.9).

Data: ../shared/datasets/grocery-store/train only (2,640 photos; heads coarse + fine, fine under coarse, read with
bench.train_accuracy.grocery). 10 % of the FINE labels (round(0.1 n)) are flipped at random, numpy
default_rng(0): the items are drawn without replacement, each gets a different fine class drawn uniformly from the
other 80. The coarse label follows the new fine class (a fine label implies its coarse parent; a labeler who picks the
wrong product also files it under that product's parent), so a flipped photo is wrong on both heads whenever the new
class has another parent, and on the fine head only when it is a sibling (e.g. another apple).
The flipped items are the ground truth; the result file records them under "flipped" (0-based rows of
train.txt and the fine class each was given).

Features: the `sku` preset's recipe (training/presets/sku.yaml through training.selectors.preset_config, its CPU
variant: tf_efficientnet_lite0 with the bundled ImageNet weights, 224 px, no hflip), pooled frozen-backbone
features from training.engine.features.cached_features, computed once into a fresh cache (the cold warm-up,
timed) and read back by both arms.

Arms (the same K group-aware folds from training.engine.oof.group_folds, seed 0, one photo per group):
  ours      training.engine.oof.out_of_fold_predictions mode "quick" with the sku recipe, on the warm cache (timed):
            per fold the heads (coarse + fine, quick.train_heads) train on the other folds and predict fold f
            (see oof.py for how the training and selection rows are chosen); then review.core.rank_label_issues
            on the fine head's out-of-fold probabilities - what the product's mislabel queue
            (review.services.mislabel_refresh) ranks. "Top N" is the first N items of that queue.
  baseline  a scikit-learn linear probe on the same features: per fold StandardScaler + LogisticRegression
            (defaults, lbfgs, max_iter 2000) fitted on the other K-1 folds, predicting fold f; the fine labels only;
            its out-of-fold probabilities go to plain cleanlab
            cleanlab.filter.find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence").
            Also reported: the probe's probabilities through review.core.rank_label_issues (the product's
            ranking), which separates what the ranking adds from what the heads add.

N = the number of flipped labels. Reported per arm: precision and recall of the top N (equal unless the issue list
is shorter than N), of the whole issue set (its size may differ from N), and the AUROC of cleanlab's
self-confidence quality score over all photos (flipped = positive, low quality = more suspect), plus out-of-fold
fine top-1 against the noisy and the true labels; and the seconds of the cold feature warm-up and of ours on the
warm cache.

Environment: LOUPE_BENCH_K folds (default 4); LOUPE_BENCH_LIMIT=n runs on a seeded random subset of n photos (a
smoke run while developing; nothing is written); LOUPE_BENCH_CACHE=dir reuses a feature cache folder instead of a
fresh one (the warm-up is then not cold; nothing is written).
If the dataset folder is absent the bench prints "skipped: ..." and exits 0 without writing anything.
Run: .venv/bin/python -m bench.mislabel  (writes bench/results/mislabel.json)."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench.common import metric, table, write

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
ROOT = DATA / "grocery-store"
K = int(os.environ.get("LOUPE_BENCH_K", 4))
LIMIT = int(os.environ.get("LOUPE_BENCH_LIMIT", 0)) or None
CACHE = os.environ.get("LOUPE_BENCH_CACHE") or None
NOISE, SEED = 0.10, 0
TARGET = 0.9


def noisy_dataset() -> tuple[dict, np.ndarray, np.ndarray]:
    """The grocery train split (a seeded subset of LIMIT photos when set) with 10 % of the fine labels flipped;
    returns (dataset, flipped indices, true fine)."""
    from bench.train_accuracy import grocery  # noqa: PLC0415 - imports torch/timm

    ds = grocery()
    ds["items"] = [copy.deepcopy(it) for it in ds["items"] if it["split"] == "train"]
    if LIMIT:
        keep = np.sort(np.random.default_rng(SEED + 1).choice(len(ds["items"]), LIMIT, replace=False))
        ds["items"] = [ds["items"][i] for i in keep]
    fine = next(h["classes"] for h in ds["heads"] if h["name"] == "fine")
    idx = {c: i for i, c in enumerate(fine)}
    true = np.array([idx[it["labels"]["fine"]] for it in ds["items"]])
    rng = np.random.default_rng(SEED)
    flipped = np.sort(rng.choice(len(true), size=int(round(NOISE * len(true))), replace=False))
    for i in flipped:
        new = int(rng.integers(len(fine) - 1))
        new += new >= true[i]  # uniform over the other classes
        ds["items"][i]["labels"] = {"coarse": ds["parent_of"][fine[new]], "fine": fine[new]}
    return ds, flipped, true


def recipe() -> dict:
    """The sku preset's engine config (its CPU variant), as a project of that preset trains and runs OOF with."""
    import django  # noqa: PLC0415

    # training.services needs Django's app registry (no database is touched): development settings will do
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    os.environ.setdefault("DEBUG", "1")
    django.setup()
    from training.selectors import preset_config  # noqa: PLC0415

    return {**preset_config("sku", cuda=False), "seed": SEED}


# ------------------------------------------------------------------------------------------------- ours
def ours(manifest: dict, config: dict, out_dir: Path, cache_dir: Path, n: int) -> dict:
    from training.engine.oof import out_of_fold_predictions  # noqa: PLC0415

    summary = out_of_fold_predictions(manifest, config, out_dir, k=K, mode="quick", cache_dir=cache_dir)
    meta = json.loads((out_dir / "oof_meta.json").read_text())
    with np.load(summary["path"]) as z:
        ids = z["ids"].astype(np.int64)
        order = np.argsort(ids)
        assert np.array_equal(ids[order], np.arange(n)), "OOF must cover every photo once"
        return {
            "probs": z["probs_fine"][order],
            "labels": z["targets_fine"][order],
            "fold": z["fold"][order],
            "meta": meta,
        }


# --------------------------------------------------------------------------------------------- baseline
def linear_probe(X: np.ndarray, labels: np.ndarray, folds: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n_classes) out-of-fold softmax of StandardScaler + LogisticRegression, fitted per fold on the others."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    probs = np.zeros((len(labels), n_classes))
    for f in range(K):
        tr, held = folds != f, folds == f
        scaler = StandardScaler().fit(X[tr])
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(X[tr]), labels[tr])
        probs[np.ix_(held, clf.classes_)] = clf.predict_proba(scaler.transform(X[held]))
    return probs


# ---------------------------------------------------------------------------------------------- scoring
def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher = more likely positive), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata  # noqa: PLC0415

    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score(ranked: list[int], labels: np.ndarray, probs: np.ndarray, flipped: np.ndarray, true: np.ndarray) -> dict:
    from cleanlab.rank import get_label_quality_scores  # noqa: PLC0415

    truth = set(flipped.tolist())
    n = len(truth)
    top = ranked[:n]
    hit_top, hit_all = len(truth.intersection(top)), len(truth.intersection(ranked))
    is_flipped = np.zeros(len(labels), dtype=bool)
    is_flipped[flipped] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quality = get_label_quality_scores(labels, probs, method="self_confidence")
    pred = probs.argmax(1)
    return {
        "precision_top_n": hit_top / max(1, len(top)),
        "recall_top_n": hit_top / n,
        "n_top": len(top),
        "issues": len(ranked),
        "precision_issues": hit_all / max(1, len(ranked)),
        "recall_issues": hit_all / n,
        "auroc": auroc(-quality, is_flipped),
        "top1_noisy": float((pred == labels).mean()),
        "top1_true": float((pred == true).mean()),
    }


def main() -> None:
    if not (ROOT / "train.txt").is_file() or not (ROOT / "train").is_dir():
        print(f"skipped: {ROOT} (train.txt and train/) is missing; this bench needs ../shared/datasets/grocery-store")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cleanlab.filter import find_label_issues  # noqa: PLC0415

    from bench.train_accuracy import manifest_of  # noqa: PLC0415
    from review.core import rank_label_issues  # noqa: PLC0415
    from training.engine import resolve_config  # noqa: PLC0415
    from training.engine.features import cached_features  # noqa: PLC0415
    from training.engine.oof import group_folds  # noqa: PLC0415

    t_start = time.monotonic()
    config = recipe()
    cfg = resolve_config(config)
    ds, flipped, true = noisy_dataset()
    n = len(ds["items"])
    manifest = manifest_of(ds)
    folds = np.array(group_folds(manifest["items"], K, seed=cfg["seed"]))
    fine = next(h["classes"] for h in ds["heads"] if h["name"] == "fine")
    fine_idx = {c: i for i, c in enumerate(fine)}
    labels = np.array([fine_idx[it["labels"]["fine"]] for it in ds["items"]])
    print(
        f"{n} photos, {len(flipped)} fine labels flipped; K={K}; sku recipe: {cfg['backbone']} "
        f"{cfg['image_size']} px, quick_epochs {cfg['quick_epochs']}, lr {cfg['lr']}, wd {cfg['weight_decay']}",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(CACHE) if CACHE else Path(tmp) / "feature-cache"
        print(f"features: {cfg['backbone']} into {cache_dir} …", flush=True)
        t0 = time.monotonic()
        feats = cached_features(manifest["items"], cfg, cache_dir)
        t_features = time.monotonic() - t0
        assert feats.ok.all(), "every grocery photo must decode"
        print(f"  {feats.stats['misses']} computed, {feats.stats['hits']} cached, {t_features:.0f} s", flush=True)

        print("ours: out-of-fold predictions, mode quick, warm cache …", flush=True)
        t0 = time.monotonic()
        oof = ours(manifest, config, Path(tmp) / "oof", cache_dir, n)
        t_ours = time.monotonic() - t0
    assert np.array_equal(oof["fold"], folds), "the engine's folds must be the baseline's"
    assert np.array_equal(oof["labels"], labels), "noisy labels"
    assert (labels[flipped] != true[flipped]).all() and (labels != true).sum() == len(flipped)
    issues = rank_label_issues(labels, oof["probs"])
    s_ours = score([it.index for it in issues], labels, oof["probs"].astype(np.float64), flipped, true)

    print("baseline: linear probe out-of-fold predictions …", flush=True)
    t0 = time.monotonic()
    base_probs = linear_probe(feats.X, labels, folds, len(fine))
    t_base = time.monotonic() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny-class warnings; the ranking is still defined
        ranked = find_label_issues(labels, base_probs, return_indices_ranked_by="self_confidence")
    s_base = score([int(i) for i in ranked], labels, base_probs, flipped, true)
    # the same probabilities through the product's ranking: what the heads alone add
    s_base_ours = score([it.index for it in rank_label_issues(labels, base_probs)], labels, base_probs, flipped, true)

    base_name = "cleanlab find_label_issues on a StandardScaler + LogisticRegression probe, same features and folds"
    met_p = s_ours["precision_top_n"] >= TARGET
    met_r = s_ours["recall_top_n"] >= TARGET
    metrics = {
        "mislabel_precision_top_n": metric(
            s_ours["precision_top_n"], "precision", base_name, s_base["precision_top_n"], f">= {TARGET}", met_p
        ),
        "mislabel_recall_top_n": metric(
            s_ours["recall_top_n"], "recall", base_name, s_base["recall_top_n"], f">= {TARGET}", met_r
        ),
        "mislabel_precision_top_n_same_ranking": metric(
            s_ours["precision_top_n"],
            "precision",
            "the linear probe's OOF probabilities ranked by review.core.rank_label_issues",
            s_base_ours["precision_top_n"],
        ),
        "mislabel_precision_issue_set": metric(
            s_ours["precision_issues"], "precision", base_name, s_base["precision_issues"]
        ),
        "mislabel_recall_issue_set": metric(s_ours["recall_issues"], "recall", base_name, s_base["recall_issues"]),
        "mislabel_issue_set_size": metric(s_ours["issues"], "items", base_name, s_base["issues"]),
        "mislabel_quality_auroc": metric(s_ours["auroc"], "AUROC", base_name, s_base["auroc"]),
        "oof_fine_top1_noisy_labels": metric(s_ours["top1_noisy"], "top-1", "linear probe OOF", s_base["top1_noisy"]),
        "oof_fine_top1_true_labels": metric(s_ours["top1_true"], "top-1", "linear probe OOF", s_base["top1_true"]),
        "oof_seconds_warm_cache": metric(t_ours, "s", "linear probe, K folds on the same features", t_base),
        "feature_warmup_seconds_cold_cache": metric(t_features, "s", "ours on the warm cache (OOF seconds)", t_ours),
    }
    met = met_p and met_r
    notes = (
        f"grocery-store train/: {n} photos{' (LOUPE_BENCH_LIMIT subset)' if LIMIT else ''}, {len(flipped)} fine "
        f"labels ({NOISE:.0%}) flipped with numpy default_rng({SEED}) to another fine class (coarse follows); "
        f"N = {len(flipped)}. K={K} group-aware folds. sku recipe (CPU): {cfg['backbone']} bundled ImageNet weights, "
        f"{cfg['image_size']} px, frozen; features {feats.stats['misses']} computed / {feats.stats['hits']} cached "
        f"in {t_features:.0f} s. Ours: engine OOF mode quick (heads coarse + fine, quick_epochs "
        f"{cfg['quick_epochs']}, lr {cfg['lr']}, weight decay {cfg['weight_decay']}; fold heads: "
        f"{oof['meta']['fold_training']}) {t_ours:.1f} s on the warm cache -> review.core.rank_label_issues, "
        f"queue {s_ours['issues']} items, top {s_ours['n_top']}. Baseline: "
        f"linear probe {t_base:.1f} s -> cleanlab find_label_issues (defaults, ranked by self_confidence), "
        f"{s_base['issues']} issues, top {s_base['n_top']}; through rank_label_issues instead: "
        f"{s_base_ours['issues']} issues, top-N {s_base_ours['precision_top_n']:.3f}. "
        f"Target (>= {TARGET}) {'met' if met else 'not met'}. Total wall {time.monotonic() - t_start:.0f} s."
    )
    print(table(metrics))
    print(notes)
    if LIMIT or CACHE:
        print("not written: LOUPE_BENCH_LIMIT / LOUPE_BENCH_CACHE runs are smoke runs")
        return
    path = write("mislabel", metrics, notes=notes)
    body = json.loads(path.read_text())  # the ground truth, compactly: rows of train.txt and their given class
    body["flipped"] = {
        "train_txt_rows": ",".join(str(int(i)) for i in flipped),
        "given_fine": ",".join(fine[int(labels[i])] for i in flipped),
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
