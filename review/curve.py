"""Is active learning paying off? Per model version: how many labels it was trained on (and how many came from
the low-confidence queue's active picks vs its random control arm), its accuracy, and what the queue's two arms
say about it.

The random control arm is an unbiased sample of the unlabeled pool (and of production photos): the model's
answer on those items, checked by a reviewer, is its accuracy where it is actually used — measured on photos
it was not trained on (they were unlabeled when it was trained). The active arm is what the uncertainty
strategy picked: the share of those the model got wrong is how informative each active label is; when active
picks are wrong much more often than random ones, every reviewed active item teaches the model more than a
random one would, which is the point of the strategy. (An A/B of two models, one trained with the active picks
and one with as many random picks, would measure the payoff directly; it costs a second training run per
retrain and is not run.)"""

from __future__ import annotations

from labeling.models import Project
from training.models import ModelVersion

from .models import ReviewItem

COUNTED = (ReviewItem.Resolution.ACCEPTED, ReviewItem.Resolution.KEPT, ReviewItem.Resolution.RELABELED)


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
    return {"rows": rows, "summary": summary, "chart": _chart(rows)}


def _chart(rows: list[dict], width: int = 560, height: int = 240, pad: int = 36) -> dict | None:
    """SVG polylines (test top-1 and random-arm accuracy against training labels), coordinates precomputed."""
    pts = [r for r in rows if r["n_train"]]
    if not pts:
        return None
    xs = [r["n_train"] for r in pts]
    lo, hi = min(xs), max(xs)
    span = (hi - lo) or 1

    def x(n):
        return pad + (n - lo) / span * (width - 2 * pad) if hi != lo else width / 2

    def y(acc):
        return height - pad - acc * (height - 2 * pad)

    def line(key):
        coords = [(round(x(r["n_train"]), 1), round(y(r[key]), 1), r) for r in pts if r[key] is not None]
        return {
            "points": " ".join(f"{cx},{cy}" for cx, cy, _ in coords),
            "dots": [{"x": cx, "y": cy, "label": f"v{r['number']}: {r[key]:.3f}"} for cx, cy, r in coords],
        }

    return {
        "width": width,
        "height": height,
        "test": line("test_top1"),
        "random": line("random_acc"),
        "x_ticks": [{"x": round(x(n), 1), "label": n} for n in sorted(set(xs))],
        "y_ticks": [{"y": round(y(v), 1), "label": f"{v:.1f}"} for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "x0": pad,
        "x1": width - pad,
        "y0": height - pad,
        "y1": pad,
    }
