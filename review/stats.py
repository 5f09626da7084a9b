"""Per-reviewer statistics over resolved review items."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from .models import ReviewItem

BREAK = timedelta(minutes=10)  # a gap longer than this between two decisions is a break, not work


def reviewer_stats(*, project) -> list[dict]:
    """Per reviewer: decisions, items per hour of active time (gaps over 10 minutes are breaks; each session
    counts at least one minute), how often the model's suggestion was accepted (accepted / accepted + kept +
    relabeled), and agreement with other reviewers on the (image, head) pairs both decided (same final class,
    or both excluded). Sorted by decisions, most first."""
    rows = (
        ReviewItem.objects.filter(project=project, resolved_by__isnull=False)
        .exclude(resolution__in=["", ReviewItem.Resolution.SKIPPED])
        .values_list(
            "resolved_by_id",
            "resolved_by__username",
            "resolved_at",
            "resolution",
            "image_id",
            "head_id",
            "resolved_class_id",
        )
        .order_by("resolved_by_id", "resolved_at")
    )
    per: dict[int, dict] = {}
    decisions: dict[tuple[int, int], dict[int, tuple]] = defaultdict(dict)
    for uid, name, at, resolution, image_id, head_id, class_id in rows:
        s = per.setdefault(uid, {"user": name, "decisions": 0, "times": [], "counts": defaultdict(int)})
        s["decisions"] += 1
        s["times"].append(at)
        s["counts"][resolution] += 1
        decisions[(image_id, head_id)][uid] = (resolution == "excluded", class_id)
    agree: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for by_user in decisions.values():
        if len(by_user) < 2:
            continue
        for uid, mine in by_user.items():
            for other, theirs in by_user.items():
                if other != uid:
                    agree[uid][0] += mine == theirs
                    agree[uid][1] += 1
    out = []
    for uid, s in per.items():
        active = timedelta()
        start = prev = s["times"][0]
        for t in s["times"][1:]:
            if t - prev > BREAK:
                active += max(prev - start, timedelta(minutes=1))
                start = t
            prev = t
        active += max(prev - start, timedelta(minutes=1))
        c = s["counts"]
        judged = c["accepted"] + c["kept"] + c["relabeled"] + c["corrected"]  # corrected: shelf boxes edited
        out.append(
            {
                "user": s["user"],
                "decisions": s["decisions"],
                "per_hour": s["decisions"] / (active.total_seconds() / 3600),
                "accepted_share": c["accepted"] / judged if judged else None,
                "kept": c["kept"],
                "relabeled": c["relabeled"],
                "corrected": c["corrected"],
                "excluded": c["excluded"],
                "agreement": agree[uid][0] / agree[uid][1] if agree[uid][1] else None,
                "shared": agree[uid][1],
            }
        )
    return sorted(out, key=lambda r: (-r["decisions"], r["user"]))
