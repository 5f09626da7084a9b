"""Review-queue facts for other pages (the image grid's flagged / model-disagrees filters and sorts)."""

from django.db.models import Exists, F, OuterRef, QuerySet, Subquery

from .models import ReviewItem


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


def sort_images(qs: QuerySet, sort: str) -> QuerySet:
    """Label quality: the open mislabel item's cleanlab score, lowest first; confidence: the open low-confidence
    item's top probability, lowest first. Images without such an item come after, by id."""
    if sort == "quality":
        score = _open(ReviewItem.Queue.MISLABEL).order_by("score").values("score")[:1]
        return qs.annotate(review_score=Subquery(score)).order_by(F("review_score").asc(nulls_last=True), "id")
    if sort == "confidence":
        prob = _open(ReviewItem.Queue.UNCERTAIN).order_by("suggested_prob").values("suggested_prob")[:1]
        return qs.annotate(review_score=Subquery(prob)).order_by(F("review_score").asc(nulls_last=True), "id")
    return qs
