"""Reads for training pages: what a change would do, before it is made."""

from labeling.models import Head

from .models import ModelVersion


def head_thresholds_plan(*, version: ModelVersion, heads: list[str] | None = None) -> list[dict]:
    """The serving-threshold changes that "Use suggested thresholds" would make: per head with a calibrated
    suggestion (and in `heads`, when given) that differs from the current threshold, {"head_id", "head", "old",
    "new"} (confidences 0-1), in head order. [] when nothing would change or the version was not calibrated."""
    suggested = version.suggested_thresholds
    rows = []
    for head in Head.objects.filter(project_id=version.project_id, name__in=list(suggested)).order_by("order", "id"):
        if heads is not None and head.name not in heads:
            continue
        new = round(min(1.0, max(0.0, suggested[head.name])), 4)
        if new != head.threshold:
            rows.append({"head_id": head.id, "head": head.name, "old": head.threshold, "new": new})
    return rows
