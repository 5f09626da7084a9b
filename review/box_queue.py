"""The shelf box queue (issue 18.5): shelf photos whose detector boxes a person should check. An item is one photo
of a shelf project and its detection head; the detector's boxes wait in the photo's box set as suggestions (source
"model", with their scores) until a reviewer accepts them all, or edits and saves them in the box editor and calls
the photo done. Items come from the shelf endpoint (inference.shelf.shelf_keep: some box below the head's
threshold) and from `box_queue_sweep`, which queues every photo whose set still holds unreviewed suggestions.

Decisions (review.services.item_resolve dispatches here for queue "boxes"):
  accept   every suggestion becomes a box a person confirmed (source human), saved with the box set version the
           reviewer saw (stale: BoxConflict, nothing changes); resolution "accepted"
  done     the set as the reviewer saved it in the editor: refused while a suggestion is left or while the set was
           never saved by a person; resolution "corrected"
  exclude  a bad photo: the image is excluded from training (as for the label queues)
  skip     it goes to other reviewers
Undo puts back what accept changed through the action log (refused when the boxes changed since) and reopens the
item; undoing "done" reopens the item only (the editor's own undo steps back through box edits)."""

from __future__ import annotations

from django.db.models import Min, Q

from labeling.boxes import BoxConflict, box_dicts, box_set, same_boxes
from labeling.models import Box, BoxSet, DatasetAction, Head, Image, ImageEvent

from .models import ReviewItem

BOX_ACTIONS = ("accept", "done", "exclude", "skip")
RANK_SCALE = 1000  # rank = the lowest box score in thousandths: the least sure photo first, arrival order on ties


class BoxReviewError(Exception):
    """A box decision that cannot be made (the message says what to do); review.services re-raises it as
    ReviewError."""


def box_rank(lowest_score: float) -> int:
    return max(0, min(RANK_SCALE, round(float(lowest_score) * RANK_SCALE)))


def box_item_add(*, image: Image, head: Head, lowest_score: float, model_version: int | None) -> ReviewItem | None:
    """Queue `image` for a box review (call inside the caller's transaction). Nothing when an open item for the
    photo and head exists already. Returns the new item or None."""
    if ReviewItem.objects.filter(
        image=image, head=head, queue=ReviewItem.Queue.BOXES, status=ReviewItem.Status.OPEN
    ).exists():
        return None
    return ReviewItem.objects.create(
        project_id=image.project_id,
        queue=ReviewItem.Queue.BOXES,
        image=image,
        head=head,
        score=float(lowest_score),
        suggested_prob=float(lowest_score),
        rank=box_rank(lowest_score),
        model_version=model_version,
    )


def box_queue_sweep(*, project) -> int:
    """Queue every photo of the project whose box set (of a detection head) still holds a suggestion of the model
    and has no open item: the suggestions a reviewer has not seen yet, wherever they came from. Returns how many
    items were added."""
    sets = (
        BoxSet.objects.filter(image__project=project, head__kind=Head.Kind.DETECTION, image__status=Image.Status.OK)
        .filter(boxes__source=Box.Source.MODEL)
        .exclude(
            Q(image__review_items__queue=ReviewItem.Queue.BOXES) & Q(image__review_items__status=ReviewItem.Status.OPEN)
        )
        .annotate(lowest=Min("boxes__score", filter=Q(boxes__source=Box.Source.MODEL)))
        .values_list("image_id", "head_id", "lowest")
        .distinct()
    )
    items = [
        ReviewItem(
            project=project,
            queue=ReviewItem.Queue.BOXES,
            image_id=image_id,
            head_id=head_id,
            score=float(lowest or 0.0),
            suggested_prob=float(lowest or 0.0),
            rank=box_rank(lowest or 0.0),
        )
        for image_id, head_id, lowest in sets
    ]
    ReviewItem.objects.bulk_create(items, batch_size=1000)
    return len(items)


def box_set_of(item: ReviewItem) -> BoxSet | None:
    return BoxSet.objects.filter(image_id=item.image_id, head_id=item.head_id).first()


def box_resolve(*, item: ReviewItem, user, action: str, expected_version: int | None) -> dict:
    """The box part of a decision on a locked, open item (review.services.item_resolve holds the lock and records
    the resolution). Returns {"resolution", "undo"}."""
    if action not in BOX_ACTIONS:
        raise BoxReviewError(f"A shelf box item is decided with {', '.join(BOX_ACTIONS)} (got {action!r}).")
    undo: dict = {}
    if action == "accept":
        current = BoxSet.objects.select_for_update().filter(image_id=item.image_id, head_id=item.head_id).first()
        version = current.version if current else 0
        if expected_version is not None and expected_version != version:
            raise BoxConflict(current or BoxSet(image_id=item.image_id, head_id=item.head_id, version=0))
        boxes = box_dicts(current)
        if not boxes and version == 0:
            raise BoxReviewError("This photo has no boxes to accept: draw them in the editor, save, then mark it done.")
        human = {"source": Box.Source.HUMAN, "score": None}
        confirmed = [b | human if b["source"] == Box.Source.MODEL else b for b in boxes]
        change = box_set(
            image=item.image,
            head=item.head,
            boxes=confirmed,
            expected_version=version,
            user=user,
            reason="review:accept",
        )
        undo = {"box_action_id": change.action.id if change.action else None}
        return {"resolution": ReviewItem.Resolution.ACCEPTED, "undo": undo}
    if action == "done":
        current = box_set_of(item)
        if current is None or current.version == 0:
            raise BoxReviewError(
                "Nobody has saved these boxes yet: accept the suggestions (Accept all), or edit them and save, "
                "then mark the photo done."
            )
        if expected_version is not None and expected_version != current.version:
            raise BoxConflict(current)
        left = current.boxes.filter(source=Box.Source.MODEL).count()
        if left:
            raise BoxReviewError(
                f"{left} suggestion{'s are' if left != 1 else ' is'} still unreviewed: accept (a) or reject (r) "
                "each in the editor and save, or press Accept all."
            )
        return {"resolution": ReviewItem.Resolution.CORRECTED, "undo": {"box_version": current.version}}
    if action == "exclude":
        image = Image.objects.select_for_update().get(pk=item.image_id)
        undo["old_status"] = image.status
        if image.status != Image.Status.EXCLUDED:
            Image.objects.filter(pk=image.pk).update(status=Image.Status.EXCLUDED, status_reason="review: bad photo")
            ImageEvent.objects.create(
                image=image, old_status=image.status, new_status=Image.Status.EXCLUDED, user=user, reason="review"
            )
        return {"resolution": ReviewItem.Resolution.EXCLUDED, "undo": undo}
    return {"resolution": ReviewItem.Resolution.SKIPPED, "undo": {}}


def box_undo(*, item: ReviewItem, user) -> None:
    """The box part of undoing `item`'s decision (inside review.services.item_undo's transaction): an accept's
    box change is reverted through the action log (BoxReviewError when the boxes changed since)."""
    from labeling.health import action_undo  # noqa: PLC0415 (health imports labeling.boxes)

    undo = item.undo or {}
    if item.resolution == ReviewItem.Resolution.ACCEPTED and undo.get("box_action_id"):
        action = DatasetAction.objects.filter(pk=undo["box_action_id"], undone_at__isnull=True).first()
        if action is None:
            return
        current = box_set_of(item)
        changes = (action.changes or {}).get("box_sets", [])
        if current is None or not changes or not same_boxes(box_dicts(current), changes[-1]["new"]):
            raise BoxReviewError(
                "Cannot undo: these boxes were changed since they were accepted (undo those edits in the editor first)."
            )
        action_undo(action=action, user=user)
