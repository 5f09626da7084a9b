"""What a finished run reports: JSON-safe metrics (NaN/inf as null), per-class metrics per head, and the best
epoch's evaluation artifacts (classification reports, confusion and curve pictures, retrieval against the train
split, report.md). Shared by the full loop, the quick retrain and the tail fine-tune."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import atomic
from .data import ManifestDataset, draft_size, eval_transform, resize_mode
from .epoch import prepare_batch
from .hierarchy import decide, leaf_head
from .manifest import IGNORE_INDEX


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


def write_json_atomic(path: Path, data) -> None:
    """JSON of data with NaN/inf as null (_clean), written whole."""
    atomic.write_json_atomic(path, _clean(data))


def write_head_reports(
    metrics: dict, heads: list[dict], logits: list[np.ndarray], targets: np.ndarray, out_dir: Path
) -> tuple[dict[str, str], dict[str, dict]]:
    """Per head (logits[h]: (N, K_h) on the evaluated split, targets: (N, H) with IGNORE_INDEX for unknown): the
    classification report of the decisions served (hierarchy.decide on the softmax probabilities) into
    metrics["heads"][name] (per class, macro, most confused), confusion_<head>.png and .json; then curves.png.
    Returns ({caption: picture file}, {head: classification report}) for report.md.
    Shared by the full training loop and the quick (heads-only) retrain."""
    from . import report  # noqa: PLC0415 - matplotlib only when a report is written

    images: dict[str, str] = {}
    head_reports: dict[str, dict] = {}
    q, pred = decide(
        [F.softmax(torch.from_numpy(np.asarray(lg, dtype=np.float32)), dim=1).numpy() for lg in logits], heads
    )  # what the Recognizer serves
    for h, head in enumerate(heads):
        name = head["name"]
        rep = report.classification_report(q[h], targets[:, h], head["classes"], pred=pred[h])
        head_reports[name] = rep
        m = metrics["heads"][name]
        m["per_class"] = {
            c: {k: v[k] for k in ("n", "correct", "accuracy", "precision", "recall", "f1")}
            for c, v in rep["per_class"].items()
            if v["n"]
        }
        m["macro"] = rep.get("macro")
        m["most_confused"] = rep["most_confused"]
        png = f"confusion_{name}.png"
        report.plot_confusion(rep["confusion"], head["classes"], out_dir / png, title=name)
        images[f"{name} confusion"] = png
        write_json_atomic(out_dir / f"confusion_{name}.json", {"classes": head["classes"], "matrix": rep["confusion"]})
    report.plot_curves(
        metrics["history"],
        out_dir / "curves.png",
        evaluated_on="train (optimistic)" if metrics.get("metrics_on") == "train" else "val",
    )
    images["curves"] = "curves.png"
    return images, head_reports


@torch.inference_mode()
def _predict_all(model, loader, device, autocast_ctx, mean, std, n: int, heads: list[dict]):
    """Logits per head (n, K) float32, targets (n, H) int64 and L2-normalised embeddings (n, D) of a loader in
    order; rows of unreadable files stay NaN (logits/embeddings) and IGNORE_INDEX (targets)."""
    model.eval()
    logits_out = [np.full((n, len(h["classes"])), np.nan, dtype=np.float32) for h in heads]
    targets = np.full((n, len(heads)), IGNORE_INDEX, dtype=np.int64)
    emb = None
    for x, y, idx, _bad in loader:
        if x is None:
            continue
        x = prepare_batch(x, device, mean, std)
        with autocast_ctx():
            logits, feats = model(x)
        rows = np.asarray(idx)
        for h, lg in enumerate(logits):
            logits_out[h][rows] = lg.float().cpu().numpy()
        targets[rows] = y.numpy()
        e = F.normalize(feats.float(), dim=1).cpu().numpy()
        if emb is None:
            emb = np.full((n, e.shape[1]), np.nan, dtype=np.float32)
        emb[rows] = e
    return logits_out, targets, emb


def _final_report(model, parsed, cfg, out_dir, metrics, eval_loader, eval_items, device, autocast_ctx, mean, std, kw):
    """The best epoch's evaluation artifacts: per-class precision/recall and confusion per head (metrics.json +
    confusion_<head>.png), most-confused pairs, curves.png, retrieval Recall@1/5 + mAP against a Faiss gallery of
    the train split (metrics["retrieval"]) and report.md."""
    from . import report  # noqa: PLC0415

    heads = parsed.heads
    logits, targets, emb = _predict_all(model, eval_loader, device, autocast_ctx, mean, std, len(eval_items), heads)
    images, head_reports = write_head_reports(metrics, heads, logits, targets, out_dir)
    retrieval = None
    if cfg["eval_retrieval"] and parsed.val and emb is not None:
        gallery_ds = ManifestDataset(
            parsed.train, eval_transform(cfg["image_size"], resize_mode(cfg)), draft_size(cfg["image_size"])
        )
        gallery_loader = DataLoader(gallery_ds, batch_size=max(1, cfg["batch_size"] * 2), shuffle=False, **kw)
        _g_logits, g_targets, g_emb = _predict_all(
            model, gallery_loader, device, autocast_ctx, mean, std, len(parsed.train), heads
        )
        retrieval = {}
        ok_q = ~np.isnan(emb).any(axis=1)
        ok_g = ~np.isnan(g_emb).any(axis=1) if g_emb is not None else None
        for h, head in enumerate(heads):
            if ok_g is None or not ok_g.any():
                break
            retrieval[head["name"]] = report.retrieval_report(
                g_emb[ok_g], g_targets[ok_g, h], emb[ok_q], targets[ok_q, h]
            )
    write_report(out_dir, cfg, heads, metrics, head_reports, images, retrieval)


def write_report(out_dir: Path, cfg: dict, heads: list[dict], metrics: dict, head_reports, images, retrieval) -> None:
    """metrics' retrieval figures (when computed) and picture names, and report.md with the leaf head's retrieval
    (model, part, sku): the last step of every trainer's evaluation report (the loop, the quick retrain)."""
    from . import report  # noqa: PLC0415 - matplotlib and faiss load only when a report is written

    if retrieval is not None:
        metrics["retrieval"] = retrieval
    metrics["report_images"] = images
    report.write_report_md(
        out_dir / "report.md",
        metrics=metrics,
        heads=head_reports,
        retrieval=(retrieval or {}).get(leaf_head(heads)),
        images=images,
        config=cfg,
    )


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
