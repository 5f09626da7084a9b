"""Is active learning paying off? Per model version: how many labels it was trained on (and how many came from
the low-confidence queue's active picks vs its random control arm), its accuracy, and what the queue's two arms
say about it.

The random control arm is an unbiased sample of the unlabeled pool (and of production photos): the model's
answer on those items, checked by a reviewer, is its accuracy where it is actually used — measured on photos
it was not trained on (they were unlabeled when it was trained). The active arm is what the uncertainty
strategy picked: the share of those the model got wrong is how informative each active label is; when active
picks are wrong much more often than random ones, every reviewed active item teaches the model more than a
random one would, which is the point of the strategy.

The A/B itself, label for label, is `arms_probe` (review.arms): after every retrain the worker measures the
new model's retrieval top-1 on the test split with the gallery holding the base labels plus the first n active
picks, or the first n random-arm picks, and stores the curve in the version's metrics["arms"]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labeling.models import Project
from training.models import ModelVersion

from .models import ReviewItem

COUNTED = (ReviewItem.Resolution.ACCEPTED, ReviewItem.Resolution.KEPT, ReviewItem.Resolution.RELABELED)


def arms_probe(
    *,
    project: Project,
    frozen_at,
    manifest: dict,
    gallery_ids: Sequence[int],
    gallery_emb: np.ndarray,
    test_ids: Sequence[int],
    test_emb: np.ndarray,
) -> dict:
    """{"heads": {head: review.arms.arm_curve(...)}} for one trained model: gallery_ids/gallery_emb are its train
    split embeddings, test_ids/test_emb its test split's, both keyed by image id; the labels are the frozen
    dataset version's (manifest), the arms the low-confidence items reviewers resolved (accepted, kept or
    relabelled) before `frozen_at`, in the order they were resolved."""
    from .arms import arm_curve  # noqa: PLC0415

    by_id = {it["id"]: it for it in manifest["items"]}
    picks = (
        ReviewItem.objects.filter(
            project=project,
            queue=ReviewItem.Queue.UNCERTAIN,
            status=ReviewItem.Status.DONE,
            resolution__in=COUNTED,
            resolved_at__lte=frozen_at,
        )
        .order_by("resolved_at", "id")
        .values_list("image_id", "head__name", "random_control")
    )
    arms: dict[str, dict[int, bool]] = {}
    for image_id, head, random_control in picks:
        arms.setdefault(head, {}).setdefault(image_id, random_control)  # the first review decides
    row_of = {int(i): r for r, i in enumerate(gallery_ids)}
    out = {}
    for head in (h["name"] for h in manifest["heads"]):
        g_labels = [by_id[int(i)]["labels"].get(head) for i in gallery_ids]
        t_labels = [by_id[int(i)]["labels"].get(head) for i in test_ids]
        picked = [(row_of[i], r) for i, r in arms.get(head, {}).items() if i in row_of and g_labels[row_of[i]]]
        out[head] = arm_curve(
            gallery_emb,
            g_labels,
            [row for row, r in picked if not r],
            [row for row, r in picked if r],
            test_emb,
            t_labels,
        )
    return {"heads": out}


def _test_top1(metrics: dict) -> float | None:
    heads = (metrics.get("test") or {}).get("heads") or {}
    vals = [h.get("top1") for h in heads.values() if isinstance(h, dict) and h.get("top1") is not None]
    return sum(vals) / len(vals) if vals else None


def learning_curve(*, project: Project) -> dict:
    """{"rows": [per version, oldest first: number, created_at, n_train, test_top1 (mean over heads, frozen
    test split), val_primary, labels_active / labels_random (reviewed low-confidence items resolved before the
    version's dataset was frozen, cumulative), random_acc + random_n (its answers on its own random-arm items,
    as reviewed), active_wrong + active_n (share of its active picks it got wrong)], "summary": {...}}."""
    items = list(
        ReviewItem.objects.filter(
            project=project, queue=ReviewItem.Queue.UNCERTAIN, status=ReviewItem.Status.DONE, resolution__in=COUNTED
        ).values("model_version", "random_control", "suggested_class_id", "resolved_class_id", "resolved_at")
    )
    versions = list(
        ModelVersion.objects.filter(project=project).select_related("run__dataset_version").order_by("number")
    )
    rows = []
    for v in versions:
        ds = v.run.dataset_version if v.run_id and v.run and v.run.dataset_version_id else None
        frozen_at = ds.created_at if ds is not None else v.created_at
        before = [it for it in items if it["resolved_at"] is not None and it["resolved_at"] <= frozen_at]
        own = [it for it in items if it["model_version"] == v.number]
        rand = [it for it in own if it["random_control"]]
        act = [it for it in own if not it["random_control"]]

        def right(it):
            return it["suggested_class_id"] is not None and it["suggested_class_id"] == it["resolved_class_id"]

        rows.append(
            {
                "number": v.number,
                "created_at": v.created_at,
                "is_active": v.is_active,
                "n_train": v.metrics.get("n_train"),
                "test_top1": _test_top1(v.metrics),
                "val_primary": v.metrics.get("primary"),
                "ab": _ab_last(v),
                "labels_active": sum(1 for it in before if not it["random_control"]),
                "labels_random": sum(1 for it in before if it["random_control"]),
                "random_n": len(rand),
                "random_acc": (sum(map(right, rand)) / len(rand)) if rand else None,
                "active_n": len(act),
                "active_wrong": (sum(1 for it in act if not right(it)) / len(act)) if act else None,
            }
        )
    rand_all = [it for it in items if it["random_control"]]
    act_all = [it for it in items if not it["random_control"]]

    def wrong_share(group):
        if not group:
            return None
        return sum(1 for it in group if it["suggested_class_id"] != it["resolved_class_id"]) / len(group)

    a, r = wrong_share(act_all), wrong_share(rand_all)
    summary = {
        "active_n": len(act_all),
        "random_n": len(rand_all),
        "active_wrong": a,
        "random_wrong": r,
        # how many times more often the model is wrong on active picks than on random ones (None when unknown)
        "informativeness": (a / r) if a is not None and r else None,
    }
    pts = [r for r in rows if r["n_train"]]
    chart = _chart(
        {
            key: [(r["n_train"], r[key], f"v{r['number']}: {r[key]:.3f}") for r in pts if r[key] is not None]
            for key in ("test_top1", "random_acc")
        }
    )
    return {"rows": rows, "summary": summary, "chart": chart, "ab": _ab(versions)}


def _curves(version: ModelVersion) -> dict[str, dict]:
    """The heads of the version's A/B (metrics["arms"], written by the worker after training) that have a curve."""
    heads = ((version.metrics or {}).get("arms") or {}).get("heads") or {}
    return {head: c for head, c in heads.items() if len(c.get("points") or []) >= 2}


def _ab_last(version: ModelVersion) -> dict | None:
    """The A/B's largest equal-n point of the version's first head that has one: {"head", "n", "active", "random"}."""
    return next(({"head": head, **c["points"][-1]} for head, c in _curves(version).items()), None)


def _ab(versions: list[ModelVersion]) -> dict | None:
    """The newest version's A/B of the arms, per head with a curve: {"version", "heads": [{"head", "n_base",
    "n_test", "n_active", "n_random", "points", "last", "gain", "chart"}]}."""
    for v in reversed(versions):
        shown = []
        for head, c in _curves(v).items():
            pts = c["points"]
            last = pts[-1]
            shown.append(
                {
                    **c,
                    "head": head,
                    "last": last,
                    # active minus random test top-1 at the largest equal n, in percentage points
                    "gain": round((last["active"] - last["random"]) * 100, 1),
                    "chart": _chart(
                        {
                            arm: [(c["n_base"] + p["n"], p[arm], f"{p['n']} {arm} labels: {p[arm]:.3f}") for p in pts]
                            for arm in ("active", "random")
                        }
                    ),
                }
            )
        if shown:
            return {"version": v.number, "heads": shown}
    return None


def _chart(lines: dict[str, list[tuple[float, float, str]]], width: int = 560, height: int = 240, pad: int = 36):
    """SVG polylines, one per named line of (x, accuracy in [0, 1], tooltip) points; coordinates precomputed."""
    xs = sorted({x for pts in lines.values() for x, _, _ in pts})
    if not xs:
        return None
    lo, hi = xs[0], xs[-1]
    span = (hi - lo) or 1

    def x(n):
        return pad + (n - lo) / span * (width - 2 * pad) if hi != lo else width / 2

    def y(acc):
        return height - pad - acc * (height - 2 * pad)

    def line(pts):
        coords = [(round(x(px), 1), round(y(py), 1), title) for px, py, title in pts]
        return {
            "points": " ".join(f"{cx},{cy}" for cx, cy, _ in coords),
            "dots": [{"x": cx, "y": cy, "label": title} for cx, cy, title in coords],
        }

    return {
        "width": width,
        "height": height,
        **{name: line(pts) for name, pts in lines.items()},
        "x_ticks": [{"x": round(x(n), 1), "label": n} for n in xs],
        "y_ticks": [{"y": round(y(v), 1), "label": f"{v:.1f}"} for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "x0": pad,
        "x1": width - pad,
        "y0": height - pad,
        "y1": pad,
    }
