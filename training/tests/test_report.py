"""Evaluation artifacts (training.engine.report): hand-computed metrics, retrieval, PNGs and report.md."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.engine.manifest import IGNORE_INDEX
from training.engine.report import (
    classification_report,
    plot_confusion,
    plot_curves,
    retrieval_report,
    write_report_md,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IGN = IGNORE_INDEX


def _json_safe(obj) -> None:
    json.dumps(obj, allow_nan=False)


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 100
    assert data[:8] == PNG_SIGNATURE


def _no_temp_files(directory) -> None:
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------ classification
# true a: rows 0, 1, 7 -> predicted a, b, b; true b: rows 2, 3 -> b, a; true c: rows 4, 5 -> a, c; row 6 unknown
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.8, 0.1],
        [0.6, 0.3, 0.1],
        [0.5, 0.1, 0.4],
        [0.1, 0.1, 0.8],
        [0.0, 0.0, 1.0],  # unknown label: would be a (wrong) prediction of c if it counted
        [0.1, 0.6, 0.3],
    ]
)
TARGETS = np.array([0, 0, 1, 1, 2, 2, IGN, 0])
CLASSES = ["a", "b", "c"]


def test_classification_report_hand_computed():
    rep = classification_report(PROBS, TARGETS, CLASSES, top_k=(1, 2, 5))
    _json_safe(rep)
    assert rep["n"] == 7
    assert rep["top1"] == pytest.approx(3 / 7)
    assert rep["top2"] == pytest.approx(5 / 7)  # target ranks: 0,2,0,1,1,0,2
    assert rep["top5"] == 1.0  # k clipped to K=3
    assert rep["confusion"] == [[1, 2, 0], [1, 1, 0], [1, 0, 1]]
    pc = rep["per_class"]
    assert list(pc) == CLASSES
    assert pc["a"] == {
        "n": 3,
        "predicted": 3,
        "correct": 1,
        "precision": pytest.approx(1 / 3),
        "recall": pytest.approx(1 / 3),
        "f1": pytest.approx(1 / 3),
        "accuracy": pytest.approx(1 / 3),
    }
    assert pc["b"]["precision"] == pytest.approx(1 / 3)
    assert pc["b"]["recall"] == pytest.approx(1 / 2)
    assert pc["b"]["f1"] == pytest.approx(0.4)
    # the unknown row (predicted c) is excluded: c is predicted once, correctly
    assert pc["c"]["predicted"] == 1
    assert pc["c"]["precision"] == 1.0
    assert pc["c"]["recall"] == 0.5
    assert pc["c"]["f1"] == pytest.approx(2 / 3)
    assert rep["macro"]["recall"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert rep["macro"]["f1"] == pytest.approx((1 / 3 + 0.4 + 2 / 3) / 3)
    assert rep["most_confused"] == [
        {"true": "a", "predicted": "b", "count": 2, "share_of_true": pytest.approx(2 / 3)},
        {"true": "b", "predicted": "a", "count": 1, "share_of_true": 0.5},
        {"true": "c", "predicted": "a", "count": 1, "share_of_true": 0.5},
    ]
    assert classification_report(PROBS, TARGETS, CLASSES, max_pairs=1)["most_confused"][0]["count"] == 2


def test_classification_report_of_given_decisions():
    # the decisions served (e.g. a child head decoded under its parent) instead of the arg-max; -1 = no class
    pred = PROBS.argmax(axis=1)
    pred[7], pred[1] = 0, -1  # row 7 (target a): now right; row 1 (target a): no class, wrong, not in the matrix
    rep = classification_report(PROBS, TARGETS, CLASSES, pred=pred)
    known = TARGETS != IGN
    assert rep["top1"] == pytest.approx(float((pred[known] == TARGETS[known]).mean()))
    assert rep["top5"] == classification_report(PROBS, TARGETS, CLASSES)["top5"]  # ranks: the scores' order
    assert sum(map(sum, rep["confusion"])) == int(known.sum()) - 1
    assert rep["per_class"]["a"]["n"] == 3 and rep["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    same = classification_report(PROBS, TARGETS, CLASSES, pred=PROBS.argmax(axis=1))
    assert same == classification_report(PROBS, TARGETS, CLASSES)


def test_classification_report_default_keys_and_ignore_only_changes_nothing():
    rep = classification_report(PROBS, TARGETS, CLASSES)
    assert {"n", "top1", "top5", "per_class", "confusion", "most_confused"} <= set(rep)
    # dropping the unknown row gives the identical report
    keep = TARGETS != IGN
    assert classification_report(PROBS[keep], TARGETS[keep], CLASSES) == rep


def test_never_predicted_and_absent_classes():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.6, 0.4, 0.0]])
    rep = classification_report(probs, np.array([0, 1, 1]), ["x", "y", "z"])
    _json_safe(rep)
    y, z = rep["per_class"]["y"], rep["per_class"]["z"]
    assert y == {"n": 2, "predicted": 0, "correct": 0, "precision": None, "recall": 0.0, "f1": 0.0, "accuracy": 0.0}
    assert z == {"n": 0, "predicted": 0, "correct": 0, "precision": None, "recall": None, "f1": None, "accuracy": None}
    assert rep["per_class"]["x"]["precision"] == pytest.approx(1 / 3)
    assert rep["top1"] == pytest.approx(1 / 3)
    assert rep["most_confused"] == [{"true": "y", "predicted": "x", "count": 2, "share_of_true": 1.0}]


def test_ties_and_nan_scores():
    # equal scores: lowest index wins (as a stable sort would); NaN counts as the lowest score
    probs = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [np.nan, 0.2, 0.1]])
    rep = classification_report(probs, np.array([0, 1, 0]), ["a", "b", "c"], top_k=(1, 2))
    _json_safe(rep)
    assert rep["confusion"] == [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert rep["top1"] == pytest.approx(1 / 3)
    assert rep["top2"] == pytest.approx(2 / 3)


def test_zero_known_targets():
    for probs, targets in ((np.full((2, 3), 1 / 3), np.array([IGN, IGN])), (np.zeros((0, 3)), np.zeros(0, int))):
        rep = classification_report(probs, targets, CLASSES)
        _json_safe(rep)
        assert rep["n"] == 0
        assert rep["top1"] is None and rep["top5"] is None
        assert rep["confusion"] == [[0, 0, 0]] * 3
        assert rep["most_confused"] == []
        assert rep["macro"] == {"precision": None, "recall": None, "f1": None}
        assert all(m["n"] == 0 and m["recall"] is None and m["precision"] is None for m in rep["per_class"].values())


def test_single_class_head():
    rep = classification_report(np.ones((3, 1)), np.array([0, 0, IGN]), ["only"])
    _json_safe(rep)
    assert rep["n"] == 2 and rep["top1"] == 1.0 and rep["top5"] == 1.0
    assert rep["confusion"] == [[2]]
    assert rep["most_confused"] == []
    assert rep["per_class"]["only"]["f1"] == 1.0


def test_classification_report_rejects_bad_input():
    with pytest.raises(ValueError, match="classes"):
        classification_report(PROBS, TARGETS, ["a", "b"])
    with pytest.raises(ValueError, match="targets"):
        classification_report(PROBS, np.array([0, 0, 1, 1, 2, 3, IGN, 0]), CLASSES)
    with pytest.raises(ValueError, match="rows"):
        classification_report(PROBS, TARGETS[:3], CLASSES)


def test_outputs_are_plain_python_types():
    rep = classification_report(PROBS.astype(np.float32), TARGETS.astype(np.int32), CLASSES)

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert v is None or type(v) in (int, float, str, bool), type(v)

    walk(rep)


# ----------------------------------------------------------------------------------------------- retrieval
def _unit(degrees) -> np.ndarray:
    a = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# leave-one-out set; row 5 (1 degree, unknown label) would be everyone's near neighbour if it counted
LOO_EMB = _unit([0, 12, 20, 90, 100, 1])
LOO_LAB = np.array([0, 0, 1, 1, 2, IGN])


def test_retrieval_leave_one_out_hand_computed():
    # q0 -> 1(A) 2 3 4: AP 1; q1 -> 2 0(A) 3 4: AP 1/2; q2 -> 1 0 3(B) 4: AP 1/3; q3 -> 4 2(B) 1 0: AP 1/2;
    # q4 (label 2) has no other item of its label: not scored
    rep = retrieval_report(LOO_EMB, LOO_LAB, LOO_EMB, LOO_LAB, ks=(1, 2, 5), exclude_self_ids=True)
    _json_safe(rep)
    assert rep["recall@1"] == pytest.approx(1 / 4)
    assert rep["recall@2"] == pytest.approx(3 / 4)
    assert rep["recall@5"] == 1.0
    assert rep["map"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert rep["map_at"] is None
    assert rep["n_queries"] == 4 and rep["n_gallery"] == 5 and rep["n_queries_without_positive"] == 1
    # ids given as one sequence (gallery ids == query ids) or as a (gallery_ids, query_ids) pair: same result
    ids = ["p", "q", "r", "s", "t", "u"]
    assert retrieval_report(LOO_EMB, LOO_LAB, LOO_EMB, LOO_LAB, ks=(1, 2, 5), exclude_self_ids=ids) == rep
    pair = (ids, list(ids))
    assert retrieval_report(LOO_EMB, LOO_LAB, LOO_EMB, LOO_LAB, ks=(1, 2, 5), exclude_self_ids=pair) == rep


def test_retrieval_without_exclusion_finds_itself():
    rep = retrieval_report(LOO_EMB, LOO_LAB, LOO_EMB, LOO_LAB)
    assert set(rep) == {"recall@1", "recall@5", "map", "map_at", "n_queries", "n_gallery", "n_queries_without_positive"}
    assert rep["recall@1"] == 1.0 and rep["n_queries"] == 5
    # q0 -> 0 1 ...: AP 1; q1 -> 1 2 0: (1 + 2/3)/2; q2 -> 2 1 0 3: (1 + 2/4)/2; q3 -> 3 4 2: (1 + 2/3)/2; q4: 1
    assert rep["map"] == pytest.approx((1 + 5 / 6 + 3 / 4 + 5 / 6 + 1) / 5)


def test_retrieval_separate_query_set_and_cap():
    gallery = _unit([0, 10, 20, 90, 100])
    g_lab = np.array([0, 1, 0, 1, 2])
    queries = _unit([-5, 93])
    q_lab = np.array([0, 1])
    # q(-5) -> g0 g1 g2 g3 g4: relevant at 1, 3 -> (1 + 2/3)/2; q(93) -> g3 g4 g2 g1 g0: relevant at 1, 4 -> 3/4
    rep = retrieval_report(gallery, g_lab, queries, q_lab)
    assert rep["recall@1"] == 1.0 and rep["recall@5"] == 1.0
    assert rep["map"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert rep["map_at"] is None
    # capped at 2 neighbours: AP@2 = 1 / min(2 relevant, 2) for both
    capped = retrieval_report(gallery, g_lab, queries, q_lab, map_cap=2)
    assert capped["map"] == pytest.approx(0.5) and capped["map_at"] == 2


def test_retrieval_matches_brute_force_and_caps_big_galleries():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    # exact mAP on a 300-item gallery == sklearn's AP of each query's similarity ranking
    g, q = unit(300), unit(40)
    g_lab, q_lab = rng.integers(0, 6, 300), rng.integers(0, 6, 40)
    rep = retrieval_report(g, g_lab, q, q_lab)
    sims = q @ g.T
    expected = np.mean([average_precision_score(g_lab == q_lab[i], sims[i]) for i in range(40)])
    assert rep["map"] == pytest.approx(expected, abs=1e-9)
    assert rep["map_at"] is None
    top1 = g_lab[sims.argmax(axis=1)] == q_lab
    assert rep["recall@1"] == pytest.approx(top1.mean())

    # 1500-item gallery: AP over the top 1000, normalised by min(#relevant, 1000)
    g, q = unit(1500), unit(30)
    g_lab, q_lab = rng.integers(0, 3, 1500), rng.integers(0, 3, 30)
    rep = retrieval_report(g, g_lab, q, q_lab)
    assert rep["map_at"] == 1000 and rep["n_gallery"] == 1500 and rep["n_queries"] == 30
    order = np.argsort(-(q @ g.T), axis=1)[:, :1000]
    aps = []
    for i in range(30):
        rel = g_lab[order[i]] == q_lab[i]
        prec = np.cumsum(rel) / np.arange(1, 1001)
        aps.append((prec * rel).sum() / min((g_lab == q_lab[i]).sum(), 1000))
    assert rep["map"] == pytest.approx(np.mean(aps), abs=1e-6)  # float32 near-ties may swap neighbours
    _json_safe(rep)


def test_retrieval_edge_cases():
    emb = _unit([0, 30])
    rep = retrieval_report(emb, np.array([IGN, IGN]), emb, np.array([0, 1]))
    _json_safe(rep)
    assert rep["n_gallery"] == 0 and rep["n_queries"] == 0 and rep["map"] is None and rep["recall@1"] is None
    # a single item leaving itself out has nothing left to find
    rep = retrieval_report(emb[:1], np.array([0]), emb[:1], np.array([0]), exclude_self_ids=True)
    assert rep["n_queries"] == 0 and rep["n_queries_without_positive"] == 1 and rep["recall@5"] is None
    with pytest.raises(ValueError):
        retrieval_report(emb, np.array([0, 1]), emb[:1], np.array([0]), exclude_self_ids=True)


# ------------------------------------------------------------------------------------------------- plots
def test_plot_confusion_small_and_large(tmp_path):
    rep = classification_report(PROBS, TARGETS, CLASSES)
    small = tmp_path / "confusion_part.png"
    plot_confusion(rep["confusion"], CLASSES, small, title="part")
    _assert_png(small)

    rng = np.random.default_rng(1)
    k = 120
    classes = [f"class_{i:03d}_with_a_rather_long_name" for i in range(k)]
    targets = rng.integers(0, k, 600)
    preds = np.where(rng.random(600) < 0.6, targets, rng.integers(0, k, 600))
    probs = np.eye(k)[preds]
    big_rep = classification_report(probs, targets, classes)
    big = tmp_path / "confusion_species.png"
    plot_confusion(big_rep["confusion"], classes, big, title="species")
    _assert_png(big)
    # K=1 and an all-zero matrix do not crash
    plot_confusion([[0]], ["only"], tmp_path / "one.png")
    _assert_png(tmp_path / "one.png")
    _no_temp_files(tmp_path)


def _history():
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "val_loss": None if e == 2 else 2.5 / e,
            "heads": {"part": {"top1": 0.2 * e, "top5": 0.9, "n_val": 10}, "species": {"top1": 0.1 * e}},
            "primary": 0.15 * e,
            "lr": 1e-3 * (1 - 0.2 * e),
        }
        for e in (1, 2, 3)
    ]


def test_plot_curves(tmp_path):
    plot_curves(_history(), tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png")
    plot_curves(_history()[:1], tmp_path / "one_epoch.png")
    _assert_png(tmp_path / "one_epoch.png")
    plot_curves([], tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png")
    _no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------ markdown
def test_write_report_md(tmp_path):
    part = classification_report(PROBS, TARGETS, CLASSES)
    weird = classification_report(np.ones((1, 2)), np.array([IGN]), ["x|y", "z"])
    retrieval = retrieval_report(LOO_EMB, LOO_LAB, LOO_EMB, LOO_LAB, exclude_self_ids=True)
    metrics = {
        "backbone": "mobilenetv3_small_100",
        "epochs_run": 3,
        "best_epoch": 2,
        "device": "cpu",
        "seconds": 75.5,
        "n_train": 40,
        "n_val": 8,
        "n_test": 5,
        "primary": 3 / 7,
        "history": _history(),
        "heads": {"part": {"top1": 3 / 7, "top5": 1.0, "n_val": 7}, "extra": {"top1": 0.5, "top5": 1.0}},
    }
    config = {"backbone": "mobilenetv3_small_100", "epochs": 5, "lr": 0.001, "img_size": [128, 128]}
    images = {
        "part confusion": "confusion_part.png",
        "curves": str(tmp_path / "curves.png"),  # absolute: linked relative to the report
    }
    path = tmp_path / "report.md"
    write_report_md(path, metrics=metrics, heads={"part": part, "odd": weird}, retrieval=retrieval, images=images,
                    config=config)  # fmt: skip
    text = path.read_text(encoding="utf-8")
    for section in (
        "# Training report",
        "## Summary",
        "## Heads",
        "## Head `part`",
        "### Weakest classes (by recall)",
        "### Most-confused pairs",
        "## Retrieval (embeddings)",
        "## Plots",
        "## Resolved config",
    ):
        assert section in text, section
    for row in (
        "| backbone | mobilenetv3_small_100 |",
        "| epochs | 3 of 5 |",
        "| best epoch | 2 |",
        "| device | cpu |",
        "| time | 75.5 s |",
        "| n_train | 40 |",
        "| n_val | 8 |",
        "| n_test | 5 |",
        "| part | 3 | 7 | 42.9% | 100.0% | 46.7% |",
        "| extra | n/a | n/a | 50.0% | 100.0% | n/a |",
        "| top-1 | 42.9% |",
        "| a | 3 | 33.3% | 33.3% | 33.3% |",
        "| a | b | 2 | 66.7% |",
        "| c | a | 1 | 50.0% |",
        "| recall@1 | 25.0% |",
        "| mAP | 58.3% |",
        "| n_queries | 4 |",
    ):
        assert row in text, row
    # weakest classes: a (recall 1/3) before b and c (1/2; b has... same n 2 -> by name)
    weakest = text.split("### Weakest classes (by recall)")[1].split("###")[0]
    assert weakest.index("| a |") < weakest.index("| b |") < weakest.index("| c |")
    assert "![part confusion](confusion_part.png)" in text
    assert "![curves](curves.png)" in text
    assert "x\\|y" in text  # table-breaking characters escaped
    assert "No validation images with a known label." in text
    config_block = text.split("```json\n")[1].split("\n```")[0]
    assert json.loads(config_block) == config
    _no_temp_files(tmp_path)

    # minimal inputs: no retrieval, no images, nothing known
    write_report_md(tmp_path / "min.md", metrics={}, heads={}, retrieval=None, images={}, config={})
    minimal = (tmp_path / "min.md").read_text(encoding="utf-8")
    assert "## Summary" in minimal and "## Retrieval" not in minimal and "## Plots" not in minimal


def test_nan_inputs_stay_json_safe():
    probs = np.full((3, 2), np.nan)
    rep = classification_report(probs, np.array([0, 1, IGN]), ["a", "b"])
    _json_safe(rep)
    assert not any(isinstance(v, float) and math.isnan(v) for v in rep.values())
    emb = np.array([[np.nan, 0.0], [1.0, 0.0]], dtype=np.float32)
    _json_safe(retrieval_report(emb, np.array([0, 0]), emb, np.array([0, 0]), exclude_self_ids=True))
