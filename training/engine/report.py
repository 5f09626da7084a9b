"""Evaluation artifacts of a training run, from validation predictions (pure: numpy, faiss and matplotlib only;
no Django, no torch).

    classification_report(probs, targets, classes)   -> dict   top-k, per-class P/R/F1, confusion, confused pairs
    retrieval_report(gallery_emb, gallery_labels, query_emb, query_labels) -> dict   Recall@k and mAP (faiss)
    plot_confusion(confusion, classes, path)                    PNG (row-normalised)
    plot_curves(history, path)                                  PNG (losses, per-head val top-1, lr)
    plot_reliability(reliability, path)                         PNG (accuracy per confidence bin, before/after T)
    write_report_md(path, metrics=..., heads=..., retrieval=..., images=..., config=...)   report.md

Every returned dict holds only Python ints/floats/str/None/lists/dicts (json.dumps(..., allow_nan=False) works);
a metric that is undefined (no known targets, a class never predicted, ...) is None, never NaN.
Every file is written to a temp name in the target directory and then os.replace()d.
matplotlib is imported lazily (Agg canvas, no pyplot: safe outside the main thread)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .atomic import write_atomic, write_text_atomic
from .manifest import IGNORE_INDEX

MAP_CAP = 1000  # mAP is computed over at most this many neighbours per query ("map_at" says when it bites)
_QUERY_CHUNK = 1024  # queries searched at once (bounds the (chunk, k) neighbour arrays)
_ANNOTATE_MAX = 15  # confusion cells are annotated with counts up to this many shown classes


# ----------------------------------------------------------------------------------------------- helpers
def _safe(obj):
    """JSON-safe copy: numpy scalars/arrays -> Python, NaN/inf -> None, tuples -> lists, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_safe(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def _ratio(num, den) -> float | None:
    return float(num) / float(den) if den else None


def _atomic_write(path, writer: Callable[[str], None]) -> None:
    """atomic.write_atomic with the temp file's name as a str (matplotlib and csv take either)."""
    write_atomic(path, lambda tmp: writer(str(tmp)))


_write_text_atomic = write_text_atomic


# ------------------------------------------------------------------------------------------ classification
def classification_report(
    probs: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    *,
    top_k: Sequence[int] = (1, 5),
    max_pairs: int = 20,
    pred: np.ndarray | None = None,
) -> dict:
    """Metrics of one head from its validation scores.

    probs: (N, K) scores (probabilities or logits: only their order matters; NaN counts as the lowest score).
    targets: (N,) class indices, IGNORE_INDEX rows (unknown label) are excluded from everything.
    The prediction is the arg-max (lowest index on ties), or `pred` (N,) when given (the decision served, e.g. a
    child head decoded under its parent: hierarchy.decide; -1 = no class, counted wrong and left out of the
    confusion matrix); top-k counts a hit when the target is among the k highest scores with the same tie rule (k
    is clipped to K, as in the training loop), top-1 with `pred` a hit of the decision.

    Returns {"n", "top1", "top5" (one "top{k}" per k), "macro": {"precision", "recall", "f1"} (over classes
    present in validation; precision over classes ever predicted), "per_class": {cls: {"n", "predicted",
    "correct", "precision", "recall", "f1", "accuracy"}} (every class; precision None when never predicted,
    recall/accuracy/f1 None when absent from validation; accuracy == recall), "confusion": K x K list of int
    (rows = true, cols = predicted), "most_confused": [{"true", "predicted", "count", "share_of_true"}] (off the
    diagonal, count desc, at most max_pairs)}."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).reshape(-1)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, K), got shape {probs.shape}")
    n_all, k_cls = probs.shape
    if len(classes) != k_cls:
        raise ValueError(f"probs has {k_cls} columns but {len(classes)} classes were given")
    if targets.shape[0] != n_all:
        raise ValueError(f"probs has {n_all} rows but targets has {targets.shape[0]}")
    if k_cls == 0:
        raise ValueError("a head needs at least one class")
    targets = targets.astype(np.int64)
    known = targets != IGNORE_INDEX
    bad = known & ((targets < 0) | (targets >= k_cls))
    if bad.any():
        raise ValueError(
            f"targets must be in [0, {k_cls}) or IGNORE_INDEX ({IGNORE_INDEX}), got {targets[bad][:3].tolist()}"
        )
    p = probs[known]
    t = targets[known]
    n = int(t.shape[0])
    p = np.where(np.isnan(p), -np.inf, p)

    out: dict = {"n": n}
    if n:
        pred = p.argmax(axis=1) if pred is None else np.asarray(pred).reshape(-1)[known].astype(np.int64)
        p_t = p[np.arange(n), t]
        # rank of the target in a stable descending sort: strictly higher scores + equal scores at lower index
        higher = (p > p_t[:, None]).sum(axis=1)
        tied_before = ((p == p_t[:, None]) & (np.arange(k_cls)[None, :] < t[:, None])).sum(axis=1)
        rank = higher + tied_before
        for k in top_k:
            out[f"top{int(k)}"] = float((pred == t).mean() if int(k) == 1 else (rank < min(int(k), k_cls)).mean())
        decided = pred >= 0
        confusion = np.bincount(t[decided] * k_cls + pred[decided], minlength=k_cls * k_cls).reshape(k_cls, k_cls)
    else:
        for k in top_k:
            out[f"top{int(k)}"] = None
        confusion = np.zeros((k_cls, k_cls), dtype=np.int64)

    true_n = np.bincount(t, minlength=k_cls)
    pred_n = confusion.sum(axis=0)
    correct = np.diag(confusion)
    per_class = {}
    for c, name in enumerate(classes):
        prec = _ratio(correct[c], pred_n[c])
        rec = _ratio(correct[c], true_n[c])
        if rec is None:
            f1 = None
        elif correct[c] == 0:
            f1 = 0.0
        else:
            f1 = 2 * prec * rec / (prec + rec)
        per_class[str(name)] = {
            "n": int(true_n[c]),
            "predicted": int(pred_n[c]),
            "correct": int(correct[c]),
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "accuracy": rec,
        }
    out["per_class"] = per_class

    def _mean(key: str) -> float | None:
        vals = [m[key] for m in per_class.values() if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    out["macro"] = {"precision": _mean("precision"), "recall": _mean("recall"), "f1": _mean("f1")}
    out["confusion"] = confusion.astype(np.int64).tolist()

    pairs = []
    if n and k_cls > 1 and max_pairs > 0:
        off = confusion.copy()
        np.fill_diagonal(off, 0)
        ti, pi = np.nonzero(off)
        counts = off[ti, pi]
        shares = counts / true_n[ti]
        order = np.lexsort((pi, ti, -shares, -counts))[:max_pairs]
        pairs = [
            {
                "true": str(classes[ti[j]]),
                "predicted": str(classes[pi[j]]),
                "count": int(counts[j]),
                "share_of_true": float(shares[j]),
            }
            for j in order
        ]
    out["most_confused"] = pairs
    return _safe(out)


# ----------------------------------------------------------------------------------------------- retrieval
def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _knn_search(gallery: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """Return search(queries) -> (Q, k) gallery indices by descending inner product (faiss IndexFlatIP;
    numpy fallback when faiss is not installed)."""
    try:
        import faiss  # noqa: PLC0415 - heavy import only when retrieval is evaluated
    except ImportError:  # pragma: no cover - faiss-cpu is a requirement; keep working without it
        faiss = None
    if faiss is not None:
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(gallery)

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, k)[1]

        return search

    def search_np(q: np.ndarray) -> np.ndarray:  # pragma: no cover
        sims = q @ gallery.T
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    return search_np


def _self_ids(exclude_self_ids, n_gallery: int, n_query: int):
    """(gallery_ids, query_ids) as object arrays, or None. Accepts True (row i of the query set is row i of the
    gallery), one sequence of ids used for both sets, or a pair (gallery_ids, query_ids)."""
    if exclude_self_ids is None or exclude_self_ids is False:
        return None
    if exclude_self_ids is True:
        if n_gallery != n_query:
            raise ValueError("exclude_self_ids=True needs the same number of gallery and query rows")
        ids = np.arange(n_gallery)
        return ids.astype(object), ids.astype(object)
    if (
        isinstance(exclude_self_ids, tuple)
        and len(exclude_self_ids) == 2
        and all(np.ndim(np.asarray(v, dtype=object)) == 1 for v in exclude_self_ids)
    ):
        g_ids, q_ids = exclude_self_ids
    else:
        g_ids = q_ids = exclude_self_ids
    g_ids = np.asarray(list(g_ids), dtype=object)
    q_ids = np.asarray(list(q_ids), dtype=object)
    if g_ids.shape[0] != n_gallery or q_ids.shape[0] != n_query:
        raise ValueError(
            f"exclude_self_ids: {g_ids.shape[0]} gallery ids / {q_ids.shape[0]} query ids for "
            f"{n_gallery} gallery / {n_query} query rows"
        )
    return g_ids, q_ids


def retrieval_report(
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5),
    exclude_self_ids=None,
    map_cap: int = MAP_CAP,
) -> dict:
    """Nearest-neighbour retrieval quality of embeddings (cosine similarity via faiss IndexFlatIP).

    Rows whose label is IGNORE_INDEX are dropped from the gallery and from the queries. For each query the gallery
    is ranked by similarity (items with the query's id removed when exclude_self_ids is given: True for "the
    query set is the gallery, row by row", a sequence of ids used for both sets, or a tuple (gallery_ids,
    query_ids)). A gallery item is relevant when it has the query's label.

    recall@k: share of queries with a relevant item among their k nearest neighbours.
    map: mean over queries of the average precision of the full ranking (exact). When a query has more than
    `map_cap` candidates, AP is taken over its top map_cap neighbours and normalised by min(#relevant, map_cap)
    (AP@map_cap as in GLDv2), and "map_at" is map_cap; otherwise "map_at" is None.
    Queries without any relevant gallery item cannot be answered and are left out of every metric (counted in
    "n_queries_without_positive"); "n_queries" counts the scored ones. Metrics are None when none is scored.

    Returns {"recall@1", "recall@5" (one "recall@k" per k), "map", "map_at", "n_queries", "n_gallery",
    "n_queries_without_positive"}."""
    g_emb = np.asarray(gallery_emb)
    q_emb = np.asarray(query_emb)
    g_lab = np.asarray(gallery_labels).reshape(-1).astype(np.int64)
    q_lab = np.asarray(query_labels).reshape(-1).astype(np.int64)
    if g_emb.ndim != 2 or q_emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got {g_emb.shape} and {q_emb.shape}")
    if g_emb.shape[0] != g_lab.shape[0] or q_emb.shape[0] != q_lab.shape[0]:
        raise ValueError("embeddings and labels must have the same number of rows")
    if g_emb.shape[0] and q_emb.shape[0] and g_emb.shape[1] != q_emb.shape[1]:
        raise ValueError(f"gallery dim {g_emb.shape[1]} != query dim {q_emb.shape[1]}")
    ids = _self_ids(exclude_self_ids, g_emb.shape[0], q_emb.shape[0])
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")

    g_keep = g_lab != IGNORE_INDEX
    q_keep = q_lab != IGNORE_INDEX
    g_lab, q_lab = g_lab[g_keep], q_lab[q_keep]
    g_ids = ids[0][g_keep] if ids else None
    q_ids = ids[1][q_keep] if ids else None
    n_gallery = int(g_lab.shape[0])
    empty = {f"recall@{k}": None for k in ks}
    empty.update({"map": None, "map_at": None, "n_queries": 0, "n_gallery": n_gallery})
    empty["n_queries_without_positive"] = 0
    if n_gallery == 0 or q_lab.shape[0] == 0:
        empty["n_queries_without_positive"] = int(q_lab.shape[0])
        return empty
    gallery = _normalise(g_emb[g_keep])
    queries = _normalise(q_emb[q_keep])

    # per query: how many gallery items it excludes, and how many of those share its label
    label_count: dict[int, int] = {}
    for lab in g_lab.tolist():
        label_count[lab] = label_count.get(lab, 0) + 1
    n_q = int(q_lab.shape[0])
    n_excl = np.zeros(n_q, dtype=np.int64)
    n_excl_same = np.zeros(n_q, dtype=np.int64)
    if g_ids is not None:
        by_id: dict = {}
        by_id_label: dict = {}
        for gid, lab in zip(g_ids.tolist(), g_lab.tolist(), strict=True):
            by_id[gid] = by_id.get(gid, 0) + 1
            by_id_label[(gid, lab)] = by_id_label.get((gid, lab), 0) + 1
        for i, (qid, lab) in enumerate(zip(q_ids.tolist(), q_lab.tolist(), strict=True)):
            n_excl[i] = by_id.get(qid, 0)
            n_excl_same[i] = by_id_label.get((qid, lab), 0)
    n_rel = np.array([label_count.get(lab, 0) for lab in q_lab.tolist()], dtype=np.int64) - n_excl_same
    n_cand = n_gallery - n_excl  # ranked candidates per query
    depth = np.minimum(n_cand, map_cap)  # positions scored per query
    k_search = int(min(n_gallery, max(int(depth.max()), max(ks)) + int(n_excl.max())))
    search = _knn_search(gallery, max(1, k_search))

    hits = {k: 0 for k in ks}
    ap_sum = 0.0
    n_scored = 0
    for start in range(0, n_q, _QUERY_CHUNK):
        sl = slice(start, min(n_q, start + _QUERY_CHUNK))
        nbr = search(queries[sl])  # (C, k_search)
        valid = nbr >= 0
        if g_ids is not None:
            valid &= g_ids[np.where(valid, nbr, 0)] != q_ids[sl][:, None]
        pos = np.cumsum(valid, axis=1) - 1  # 0-based rank among the kept neighbours
        rel = valid & (g_lab[np.where(valid, nbr, 0)] == q_lab[sl][:, None])
        scored = n_rel[sl] > 0
        for k in ks:
            hits[k] += int((rel & (pos < k)).any(axis=1)[scored].sum())
        in_depth = rel & (pos < depth[sl][:, None])
        prec = np.cumsum(in_depth, axis=1) / np.maximum(pos + 1, 1)
        denom = np.minimum(n_rel[sl], depth[sl])
        ap = (prec * in_depth).sum(axis=1)[scored] / denom[scored]
        ap_sum += float(ap.sum())
        n_scored += int(scored.sum())

    out = {f"recall@{k}": _ratio(hits[k], n_scored) for k in ks}
    out["map"] = _ratio(ap_sum, n_scored)
    out["map_at"] = int(map_cap) if bool((n_cand[n_rel > 0] > map_cap).any()) else None
    out["n_queries"] = n_scored
    out["n_gallery"] = n_gallery
    out["n_queries_without_positive"] = n_q - n_scored
    return _safe(out)


# ------------------------------------------------------------------------------------------------ plotting
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - lazy matplotlib
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> None:
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _short(name: str, n: int = 24) -> str:
    name = str(name)
    return name if len(name) <= n else name[: n - 1] + "…"


def plot_confusion(confusion, classes: list[str], path, *, max_classes: int = 40, title: str = "") -> None:
    """PNG of the row-normalised confusion matrix (rows = true class). With more than max_classes classes only
    the max_classes classes with the most errors (wrong predictions as true class plus as predicted class) are
    shown, in their original order, and the title says so. Cells carry counts when at most 15 classes are
    shown."""
    cm = np.asarray(confusion, dtype=np.int64)
    k_cls = len(classes)
    if cm.shape != (k_cls, k_cls):
        raise ValueError(f"confusion must be {k_cls} x {k_cls}, got {cm.shape}")
    idx = np.arange(k_cls)
    subtitle = ""
    if k_cls > max_classes:
        off = cm.copy()
        np.fill_diagonal(off, 0)
        errors = off.sum(axis=1) + off.sum(axis=0)
        top = np.lexsort((idx, -errors))[:max_classes]
        idx = np.sort(top)
        subtitle = f"{max_classes} most-confused of {k_cls} classes"
    sub = cm[np.ix_(idx, idx)]
    row_n = cm[idx].sum(axis=1)  # normalise by the full row, so hidden columns still count
    norm = np.divide(sub, row_n[:, None], out=np.zeros(sub.shape, dtype=np.float64), where=row_n[:, None] > 0)
    shown = len(idx)
    names = [_short(classes[i]) for i in idx]

    side = min(22.0, max(4.5, 0.28 * shown + 2.5))
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fontsize = 9 if shown <= 15 else max(4, int(9 - shown / 10))
    ax.set_xticks(range(shown))
    ax.set_yticks(range(shown))
    ax.set_xticklabels(names, rotation=90, fontsize=fontsize)
    ax.set_yticklabels(names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if shown <= _ANNOTATE_MAX:
        for r in range(shown):
            for c in range(shown):
                if sub[r, c]:
                    ax.text(
                        c,
                        r,
                        str(int(sub[r, c])),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if norm[r, c] > 0.5 else "black",
                    )
    full_title = " - ".join(s for s in (title, subtitle) if s) or "confusion matrix (row-normalised)"
    ax.set_title(full_title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)


def plot_reliability(reliability: dict, path, *, title: str = "") -> None:
    """PNG reliability diagram of one head: accuracy per confidence bin against the diagonal, before and after
    temperature scaling. `reliability`: {"before"/"after": {"edges", "count", "confidence", "accuracy", "ece"}}
    (inference.calibration.reliability_bins)."""
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for key, colour, label in (("before", "tab:orange", "raw softmax"), ("after", "tab:blue", "temperature-scaled")):
        bins = reliability.get(key)
        if not bins:
            continue
        edges = np.asarray(bins["edges"], dtype=np.float64)
        acc = [a if a is not None else np.nan for a in bins["accuracy"]]
        width = float(edges[1] - edges[0])
        if key == "after":
            ax.bar(edges[:-1], acc, width=width, align="edge", color=colour, alpha=0.35, edgecolor=colour)
        conf = [c if c is not None else np.nan for c in bins["confidence"]]
        ece = bins.get("ece")
        ece_text = f", ECE {ece:.3f}" if ece is not None else ""
        ax.plot(conf, acc, marker="o", color=colour, linewidth=1.5, label=f"{label}{ece_text}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(" - ".join(s for s in (title, "reliability on val") if s), fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)


def _series(history: list[dict], getter) -> list[float]:
    vals = []
    for rec in history:
        try:
            v = getter(rec)
        except (KeyError, TypeError, AttributeError):
            v = None
        vals.append(float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else float("nan"))
    return vals


def plot_curves(history: list[dict], path, *, evaluated_on: str = "val") -> None:
    """PNG with two panels over epochs: train/val loss (lr on a secondary axis) and per-head val top-1 (plus the
    mean over heads, "primary"). Uses the training loop's history records (epoch, train_loss, val_loss,
    heads: {name: {top1, ...}}, primary, lr); missing/None values leave gaps. `evaluated_on` names where the
    "val" figures come from ("train (optimistic)" for a run without validation photos)."""
    history = [h for h in (history or []) if isinstance(h, dict)]
    fig = _new_figure(10.0, 4.2)
    ax_loss = fig.add_subplot(1, 2, 1)
    ax_acc = fig.add_subplot(1, 2, 2)
    if not history:
        for ax in (ax_loss, ax_acc):
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        epochs = [rec.get("epoch", i + 1) for i, rec in enumerate(history)]
        marker = "o" if len(history) <= 30 else None
        ax_loss.plot(epochs, _series(history, lambda r: r["train_loss"]), marker=marker, label="train loss")
        ax_loss.plot(epochs, _series(history, lambda r: r["val_loss"]), marker=marker, label=f"{evaluated_on} loss")
        lrs = _series(history, lambda r: r["lr"])
        handles, labels = ax_loss.get_legend_handles_labels()
        if any(math.isfinite(v) for v in lrs):
            ax_lr = ax_loss.twinx()
            (line,) = ax_lr.plot(epochs, lrs, color="grey", linestyle=":", marker=marker, label="lr")
            ax_lr.set_ylabel("learning rate")
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            handles.append(line)
            labels.append("lr")
        ax_loss.legend(handles, labels, fontsize=8, loc="upper right")
        head_names: list[str] = []
        for rec in history:
            for name in (rec.get("heads") or {}).keys():
                if name not in head_names:
                    head_names.append(name)
        for name in head_names:
            ax_acc.plot(
                epochs, _series(history, lambda r, n=name: r["heads"][n]["top1"]), marker=marker, label=str(name)
            )
        if len(head_names) > 1:
            ax_acc.plot(epochs, _series(history, lambda r: r["primary"]), color="black", linestyle="--", label="mean")
        ax_acc.set_ylim(0.0, 1.02)
        if head_names:
            ax_acc.legend(fontsize=8, loc="lower right")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss", fontsize=10)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"{evaluated_on} top-1")
    ax_acc.set_title(f"{'validation' if evaluated_on == 'val' else evaluated_on} top-1 per head", fontsize=10)
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    _save_png(fig, path)


# ------------------------------------------------------------------------------------------------ markdown
def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4f}"
    return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _pct(v) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.1f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _fmt_seconds(s) -> str:
    if not isinstance(s, (int, float)) or not math.isfinite(float(s)):
        return "n/a"
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _rel_link(target: str, base_dir: Path) -> str:
    p = Path(target)
    if p.is_absolute():
        try:
            return Path(os.path.relpath(p, base_dir)).as_posix()
        except ValueError:  # other drive on Windows
            return p.name
    return p.as_posix()


def write_report_md(
    path,
    *,
    metrics: dict,
    heads: dict[str, dict],
    retrieval: dict | None,
    images: dict[str, str],
    config: dict,
) -> None:
    """Write report.md: run summary (from metrics.json: backbone, epochs, best epoch, device, seconds,
    n_train/n_val/n_test), an overview table of the heads, per head its top-1/top-5, 10 weakest classes by recall
    and most-confused pairs (from classification_report), the plots (images: {caption: file name}, linked
    relative to the report), retrieval metrics when given, and the resolved config as a JSON block.

    A head's image is placed in its section when its caption is the head name or starts with "<head> "
    (e.g. "part confusion"); other images go to the "Plots" section."""
    path = Path(path)
    metrics = metrics or {}
    heads = heads or {}
    images = dict(images or {})
    # Never "val" for figures computed on the training photos (a dataset version without validation photos).
    on = "train (optimistic)" if metrics.get("metrics_on") == "train" else "val"
    lines: list[str] = ["# Training report", ""]
    lines += _summary_md(metrics, config, on)
    head_names = list(heads) + [n for n in (metrics.get("heads") or {}) if n not in heads]
    lines += _heads_overview_md(head_names, heads, metrics, on)
    used_images: set[str] = set()
    for name in head_names:
        lines += _head_md(name, heads.get(name), metrics, images, path.parent, used_images)
    if retrieval:
        lines += _retrieval_md(retrieval)
    lines += _plots_md(images, used_images, path.parent)

    # ---- config
    lines += ["## Resolved config", "", "```json"]
    lines.append(json.dumps(_safe(config or {}), indent=2, sort_keys=True, default=str, allow_nan=False))
    lines += ["```", ""]
    _write_text_atomic(path, "\n".join(lines))


def _summary_md(metrics: dict, config: dict, on: str) -> list[str]:
    """report.md's summary table (from metrics.json)."""
    lines: list[str] = ["## Summary", ""]
    epochs_run = metrics.get("epochs_run", len(metrics.get("history") or []) or None)
    epochs_cfg = (config or {}).get("epochs")
    epochs = f"{epochs_run} of {epochs_cfg}" if epochs_run is not None and epochs_cfg is not None else epochs_run
    summary = [
        ["backbone", metrics.get("backbone", (config or {}).get("backbone"))],
        ["epochs", epochs],
        ["best epoch", metrics.get("best_epoch")],
        [
            f"mean {on} top-1 (best epoch)",
            _pct(metrics.get("primary")) if metrics.get("primary") is not None else None,
        ],
        ["device", metrics.get("device")],
        ["time", _fmt_seconds(metrics.get("seconds"))],
        ["n_train", metrics.get("n_train")],
        ["n_val", metrics.get("n_val")],
        ["n_test", metrics.get("n_test")],
    ]
    if metrics.get("metrics_on"):
        summary.append(["metrics on", metrics["metrics_on"]])
    if metrics.get("stopped_early"):
        summary.append(["stopped early", metrics["stopped_early"]])
    if metrics.get("skipped_files"):
        summary.append(["unreadable files skipped", metrics["skipped_files"]])
    lines += _table(["", "value"], summary) + [""]
    return lines


def _heads_overview_md(head_names: list[str], heads: dict, metrics: dict, on: str) -> list[str]:
    """The overview table of the heads (none without heads)."""
    lines: list[str] = []
    if head_names:
        lines += ["## Heads", ""]
        rows = []
        for name in head_names:
            rep = heads.get(name) or (metrics.get("heads") or {}).get(name) or {}
            n_cls = len(rep.get("per_class") or {}) if name in heads else None
            rows.append(
                [
                    name,
                    n_cls,
                    rep.get("n", rep.get("n_val")),
                    _pct(rep.get("top1")),
                    _pct(rep.get("top5")),
                    _pct((rep.get("macro") or {}).get("f1")) if name in heads else "n/a",
                ]
            )
        n_col = "n_train (optimistic)" if on != "val" else "n_val"
        lines += _table(["head", "classes", n_col, "top-1", "top-5", "macro F1"], rows) + [""]
    return lines


def _head_md(name: str, rep: dict | None, metrics: dict, images: dict, base_dir: Path, used_images: set) -> list[str]:
    """A head's section: its figures, weakest classes, most-confused pairs and its images (their captions are added
    to used_images); only top-1/top-5 without a detailed report (rep None)."""
    lines: list[str] = [f"## Head `{_cell(name)}`", ""]
    if rep is None:
        m = (metrics.get("heads") or {}).get(name) or {}
        lines += [f"top-1 {_pct(m.get('top1'))}, top-5 {_pct(m.get('top5'))} (no detailed report)", ""]
        return lines
    lines += _table(
        ["metric", "value"],
        [
            ["n (known labels)", rep.get("n")],
            ["top-1", _pct(rep.get("top1"))],
            ["top-5", _pct(rep.get("top5"))],
            ["macro precision", _pct((rep.get("macro") or {}).get("precision"))],
            ["macro recall", _pct((rep.get("macro") or {}).get("recall"))],
            ["macro F1", _pct((rep.get("macro") or {}).get("f1"))],
        ],
    ) + [""]
    present = [(c, m) for c, m in (rep.get("per_class") or {}).items() if m.get("n") and m.get("recall") is not None]
    if present:
        weakest = sorted(present, key=lambda cm: (cm[1]["recall"], -cm[1]["n"], cm[0]))[:10]
        lines += ["### Weakest classes (by recall)", ""]
        lines += _table(
            ["class", "n", "recall", "precision", "F1"],
            [[c, m["n"], _pct(m["recall"]), _pct(m["precision"]), _pct(m["f1"])] for c, m in weakest],
        ) + [""]
    absent = [c for c, m in (rep.get("per_class") or {}).items() if not m.get("n")]
    if absent:
        shown = ", ".join(_cell(c) for c in absent[:20]) + (f" and {len(absent) - 20} more" if len(absent) > 20 else "")
        lines += [f"Classes without validation images ({len(absent)}): {shown}", ""]
    pairs = rep.get("most_confused") or []
    lines += ["### Most-confused pairs", ""]
    if pairs:
        lines += _table(
            ["true", "predicted", "count", "share of true"],
            [[p["true"], p["predicted"], p["count"], _pct(p["share_of_true"])] for p in pairs],
        ) + [""]
    else:
        lines += ["No confusions." if rep.get("n") else "No validation images with a known label.", ""]
    for caption, file in images.items():
        if caption == name or caption.startswith(f"{name} "):
            lines += [f"![{_cell(caption)}]({_rel_link(file, base_dir)})", ""]
            used_images.add(caption)
    return lines


def _retrieval_md(retrieval: dict) -> list[str]:
    """The retrieval metrics table."""
    lines: list[str] = ["## Retrieval (embeddings)", ""]
    rows = [[k, _pct(v) if isinstance(v, float) else v] for k, v in retrieval.items() if k.startswith("recall@")]
    map_label = f"mAP@{retrieval['map_at']}" if retrieval.get("map_at") else "mAP"
    rows.append([map_label, _pct(retrieval.get("map"))])
    for key in ("n_queries", "n_gallery", "n_queries_without_positive"):
        if key in retrieval:
            rows.append([key, retrieval[key]])
    lines += _table(["metric", "value"], rows) + [""]
    return lines


def _plots_md(images: dict, used_images: set, base_dir: Path) -> list[str]:
    """The plots not placed in a head's section."""
    lines: list[str] = []
    rest = [(c, f) for c, f in images.items() if c not in used_images]
    if rest:
        lines += ["## Plots", ""]
        for caption, file in rest:
            lines += [f"### {_cell(caption)}", "", f"![{_cell(caption)}]({_rel_link(file, base_dir)})", ""]
    return lines
