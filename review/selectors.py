"""Reads of the review app: the image grid's flagged / model-disagrees filters and sorts (and why a model sort
cannot sort yet), the job that rebuilds a queue, queue counts and double-review disagreements."""

import math

from django.db.models import Count, Exists, Min, OuterRef, QuerySet

from labeling.models import Project
from training.models import Job

from .models import ReviewItem

QUEUE_JOB = {
    ReviewItem.Queue.MISLABEL: Job.Kind.MISLABEL_REFRESH,
    ReviewItem.Queue.UNCERTAIN: Job.Kind.UNCERTAIN_REFRESH,
}
SORT_QUEUE = {"quality": ReviewItem.Queue.MISLABEL, "confidence": ReviewItem.Queue.UNCERTAIN}


def refresh_job(project, queue: str) -> Job | None:
    """The job that rebuilds `queue`, for the pages that show it: the queued or running one, else the latest one
    when it failed or was cancelled (the page says why the queue is older than the active model), else None."""
    latest = Job.objects.filter(project=project, kind=QUEUE_JOB[queue]).order_by("-created_at", "-id").first()
    if latest is None or latest.status == Job.Status.SUCCEEDED:
        return None
    return latest


def sort_note(project, sort: str) -> dict | None:
    """Why a model-based grid sort cannot order by the model yet: {"text", "job"} when `sort` needs a queue that
    has no open item (no model promoted, or its job still waits or runs); None when the sort works."""
    queue = SORT_QUEUE.get(sort)
    if queue is None or ReviewItem.objects.filter(project=project, queue=queue, status=ReviewItem.Status.OPEN).exists():
        return None
    job = refresh_job(project, queue)
    if job is not None and job.is_active:
        text = "The model's scores for this sort are being computed; until they are, the grid is in id order."
    else:
        text = (
            "No photo has a score for this sort yet (it needs a promoted model and its queue, or every photo is "
            "reviewed); the grid is in id order."
        )
    return {"text": text, "job": job}


def _open(queue: str | None = None):
    qs = ReviewItem.objects.filter(image=OuterRef("pk"), status=ReviewItem.Status.OPEN)
    return qs.filter(queue=queue) if queue else qs


def filter_images(qs: QuerySet, *, flagged: bool = False, disagrees: bool = False) -> QuerySet:
    """flagged: in an open review queue item; disagrees: the model (out-of-fold) suggests another class."""
    if flagged:
        qs = qs.filter(Exists(_open()))
    if disagrees:
        qs = qs.filter(Exists(_open(ReviewItem.Queue.MISLABEL)))
    return qs


SORTS = {"id": "image id", "quality": "label quality (worst first)", "confidence": "model confidence (lowest first)"}


class ScoredFirst:
    """`qs` ordered with the images that have an open item of `queue` first (lowest `field` first, then id), then
    the others by id — as a sequence Django's Paginator can count and slice.

    A page costs two indexed queries: the open items' (image, min score) — a few thousand rows, fetched once —
    and the unscored images by id with an anti-join. The obvious ORDER BY over a correlated subquery per image
    evaluates the subquery for every image of the project and sorts them all: 320-470 ms at 100,000 images
    against 90-110 ms this way (bench/review_ui.py)."""

    def __init__(self, qs: QuerySet, queue: str, field: str):
        self.qs = qs.order_by()
        self._open = ReviewItem.objects.filter(queue=queue, status=ReviewItem.Status.OPEN)
        self._field = field
        self._ids: list[int] | None = None
        self._count: int | None = None

    def scored_ids(self) -> list[int]:
        if self._ids is None:
            rows = (
                self._open.filter(image__in=self.qs.values("pk"))
                .values("image_id")
                .annotate(s=Min(self._field))
                .order_by("s", "image_id")
                .values_list("image_id", flat=True)
            )
            self._ids = list(rows)
        return self._ids

    def count(self) -> int:
        if self._count is None:
            self._count = self.qs.count()
        return self._count

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, k):
        if isinstance(k, int):
            got = self[k : k + 1]
            if not got:
                raise IndexError(k)
            return got[0]
        start, stop = k.start or 0, k.stop if k.stop is not None else self.count()
        ids = self.scored_ids()
        head = ids[start:stop]
        by_id = self.qs.in_bulk(head) if head else {}
        out = [by_id[i] for i in head if i in by_id]
        if stop > len(ids):
            rest = self.qs.exclude(Exists(self._open.filter(image=OuterRef("pk")))).order_by("id")
            out += list(rest[max(0, start - len(ids)) : stop - len(ids)])
        return out


def sort_images(qs: QuerySet, sort: str):
    """Label quality: the open mislabel item's cleanlab score, lowest first; confidence: the open low-confidence
    item's top probability, lowest first. Images without such an item come after, by id."""
    if sort == "quality":
        return ScoredFirst(qs, ReviewItem.Queue.MISLABEL, "score")
    if sort == "confidence":
        return ScoredFirst(qs, ReviewItem.Queue.UNCERTAIN, "suggested_prob")
    return qs


def bulk_rule_defaults(*, project) -> dict:
    """Default thresholds of the mislabel queue's bulk rules, from what the model's calibration supports, else
    none. accept_above: the highest of the calibrated thresholds (inference.evaluation.calibrate_version,
    metrics["calibration"]["softmax_threshold"]: the smallest confidence at which the version's validation
    answers were >= 95 % right) over the heads of the open items, of the version(s) that built the queue; None
    when any of them has no calibrated value. exclude_below: always None (the calibration measures how often
    confident answers are right, not which photos are unreadable). Returns {"accept_above", "exclude_below",
    "basis": a sentence for the page}."""
    from training.models import ModelVersion  # noqa: PLC0415 - as in review.services

    pairs = set(
        ReviewItem.objects.filter(project=project, queue=ReviewItem.Queue.MISLABEL, status=ReviewItem.Status.OPEN)
        .values_list("model_version", "head__name")
        .distinct()
    )
    numbers = {n for n, _ in pairs if n is not None}
    suggested = {
        v.number: v.suggested_thresholds for v in ModelVersion.objects.filter(project=project, number__in=numbers)
    }
    values = {(n, h): (suggested.get(n) or {}).get(h) for n, h in pairs}
    out = {"accept_above": None, "exclude_below": None}
    if not pairs:
        return out | {"basis": "The queue is empty."}
    missing = sorted({f"v{n} {h}" if n else h for (n, h), t in values.items() if t is None})
    if missing:
        return out | {
            "basis": f"No default: the model that built the queue has no calibrated threshold for {', '.join(missing)}."
        }
    per_head = ", ".join(f"v{n} {h} {t:.2f}" for (n, h), t in sorted(values.items()))
    return out | {
        "accept_above": math.ceil(max(values.values()) * 100) / 100,  # rounded up: never below the calibration
        "basis": (
            "Accept default: the highest calibrated threshold of the queue's heads, the confidence at which the "
            f"model's validation answers were at least 95 % right ({per_head}). Exclude: no default, the "
            "calibration says nothing about unreadable photos."
        ),
    }


def double_review_disagreements(*, project: Project, limit: int = 50) -> tuple[int, list[dict]]:
    """(count, the latest `limit`) of blind second looks whose decision differs from the first reviewer's."""
    pairs = (
        ReviewItem.objects.filter(project=project, status=ReviewItem.Status.DONE, second_look_of__isnull=False)
        .filter(second_look_of__status=ReviewItem.Status.DONE)
        .select_related("second_look_of__resolved_by", "second_look_of__resolved_class", "resolved_by")
        .select_related("resolved_class", "head", "image")
        .order_by("-resolved_at")
    )
    out = []
    for second in pairs:
        first = second.second_look_of
        a = (first.resolution == "excluded", first.resolved_class_id)
        b = (second.resolution == "excluded", second.resolved_class_id)
        if a != b:
            out.append({"first": first, "second": second})
    return len(out), out[:limit]


def queue_counts(*, project: Project) -> dict[str, dict[str, int]]:
    """{queue: {status: n}} of the project's review items."""
    out: dict[str, dict[str, int]] = {}
    rows = ReviewItem.objects.filter(project=project).values_list("queue", "status").order_by().annotate(n=Count("id"))
    for queue, status, n in rows:
        out.setdefault(queue, {})[status] = n
    return out
