"""Review queues: refresh from a model version, hand out items with leases, resolve, undo.

Leases: `queue_next` locks the first open item nobody holds with SELECT ... FOR UPDATE SKIP LOCKED and leases it
to the reviewer for LOUPE_REVIEW_LEASE_SECONDS, so two reviewers never get the same item, and an abandoned item
comes back when its lease expires."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from labeling import storage
from labeling.models import Image, ImageEvent, Label, LabelClass, Project
from labeling.services import LabelConflict, LabelingError, label_set
from training.engine.artifact import GALLERY_CACHE, TEST_CACHE
from training.engine.atomic import write_json_atomic
from training.jobs import job_enqueue
from training.models import Job, ModelVersion

from . import box_queue
from .core import rank_label_issues
from .curve import arms_probe
from .models import ReviewItem

log = logging.getLogger("review")


class ReviewError(LabelingError):
    pass


def _lease_seconds() -> int:
    return int(getattr(settings, "LOUPE_REVIEW_LEASE_SECONDS", 600))


# ----------------------------------------------------------------------------------------------- refresh
def mislabel_refresh(*, version) -> dict:
    """Rebuild the project's mislabel queue from the version's out-of-fold probabilities (<artifact>/oof/: every
    labeled photo of the frozen version, test split included): per head, cleanlab's label issues ranked worst
    first. Open items of earlier refreshes become stale; an (image, head, class) a reviewer already confirmed
    ("kept") is never queued again, and neither is an image whose label changed since the version's dataset was
    frozen. Returns {head: n_queued}."""
    art = storage.artifact_local(version.artifact_dir) / "oof"
    try:
        meta = json.loads((art / "oof_meta.json").read_text())
        data = np.load(art / "oof_predictions.npz")
    except (OSError, ValueError) as exc:
        raise ReviewError(
            f"v{version.number} has no out-of-fold predictions ({exc}); run oof_predictions first."
        ) from None
    project = version.project
    heads = {h.name: h for h in project.heads.all()}
    ids = data["ids"].astype(np.int64)
    current = {
        (image_id, head_id): class_id
        for image_id, head_id, class_id in Label.objects.filter(image__project=project).values_list(
            "image_id", "head_id", "label_class_id"
        )
    }
    confirmed = set(
        ReviewItem.objects.filter(
            project=project, queue=ReviewItem.Queue.MISLABEL, resolution=ReviewItem.Resolution.KEPT
        ).values_list("image_id", "head_id", "given_class_id")
    )
    excluded = set(Image.objects.filter(project=project).exclude(status=Image.Status.OK).values_list("id", flat=True))
    counts: dict[str, int] = {}
    items: list[ReviewItem] = []
    for name, head_meta in meta["heads"].items():
        head = heads.get(name)
        if head is None or f"probs_{name}" not in data:
            continue
        classes = head_meta["classes"]
        by_name = {c.name: c.id for c in LabelClass.objects.filter(head=head)}
        class_ids = [by_name.get(c) for c in classes]
        probs, targets = data[f"probs_{name}"], data[f"targets_{name}"].astype(np.int64)
        valid = np.flatnonzero((targets >= 0) & (targets < len(classes)))
        issues = rank_label_issues(targets[valid], probs[valid])
        n = 0
        for issue in issues:
            row = int(valid[issue.index])
            image_id, given_id = int(ids[row]), class_ids[issue.given]
            if image_id in excluded or given_id is None or current.get((image_id, head.id)) != given_id:
                continue  # gone, excluded, or relabeled since the freeze
            if (image_id, head.id, given_id) in confirmed:
                continue
            p = probs[row]
            order = np.argsort(-p)[:5]
            items.append(
                ReviewItem(
                    project=project,
                    queue=ReviewItem.Queue.MISLABEL,
                    image_id=image_id,
                    head=head,
                    given_class_id=given_id,
                    suggested_class_id=class_ids[issue.suggested],
                    suggested_prob=issue.suggested_prob,
                    score=issue.quality,
                    rank=0,
                    top_k=[
                        {"class_id": class_ids[int(j)], "label": classes[int(j)], "prob": round(float(p[j]), 4)}
                        for j in order
                    ],
                    model_version=version.number,
                )
            )
            n += 1
        counts[name] = n
    items.sort(key=lambda it: (it.score, it.image_id))
    for rank, it in enumerate(items):
        it.rank = rank
    with transaction.atomic():
        ReviewItem.objects.filter(
            project=project, queue=ReviewItem.Queue.MISLABEL, status=ReviewItem.Status.OPEN
        ).update(status=ReviewItem.Status.STALE, leased_by=None, lease_until=None)
        ReviewItem.objects.bulk_create(items, batch_size=1000)
    type(version).objects.filter(pk=version.pk).update(
        metrics={**(type(version).objects.get(pk=version.pk).metrics or {}), "mislabel_queue": counts}
    )
    log.info("mislabel queue of %s from v%s: %s", project.slug, version.number, counts)
    return counts


# ------------------------------------------------------------------------------------------------ leases
def queue_next(*, project: Project, queue: str, user, now=None) -> ReviewItem | None:
    """The reviewer's current item (a lease they still hold), else the best open item nobody holds, leased to
    them. None when the queue is empty. The image, head, given and suggested classes come with it (one query)."""
    now = now or timezone.now()
    base = ReviewItem.objects.filter(project=project, queue=queue, status=ReviewItem.Status.OPEN).select_related(
        "image", "head", "given_class", "suggested_class"
    )
    with transaction.atomic():
        mine = base.filter(leased_by=user, lease_until__gt=now).order_by("rank", "id").first()
        if mine is not None:
            return mine
        free = Q(lease_until__isnull=True) | Q(lease_until__lte=now)
        candidates = base.filter(free).exclude(resolution=ReviewItem.Resolution.SKIPPED, resolved_by=user)
        # a second look is for someone else (a subquery: FOR UPDATE refuses the outer join a lookup would make)
        theirs = ReviewItem.objects.filter(project=project, queue=queue, resolved_by=user).values("id")
        candidates = candidates.exclude(second_look_of_id__in=theirs)
        # lock the item row only (the joined classes are on the nullable side of outer joins)
        item = candidates.select_for_update(skip_locked=True, of=("self",)).order_by("rank", "id").first()
        if item is None:
            return None
        item.leased_by, item.lease_until = user, now + dt.timedelta(seconds=_lease_seconds())
        item.save(update_fields=["leased_by", "lease_until"])
        return item


def _holding(item: ReviewItem, user, now) -> ReviewItem:
    """Re-read the item under a row lock and check the user may resolve it."""
    item = ReviewItem.objects.select_for_update().get(pk=item.pk)
    if item.status != ReviewItem.Status.OPEN:
        raise ReviewError("This item was already reviewed (or replaced by a newer model's queue).")
    if item.leased_by_id not in (None, user.pk) and item.lease_until and item.lease_until > now:
        raise ReviewError("Another reviewer holds this item.")
    return item


# --------------------------------------------------------------------------------------------- resolving
ACTIONS = ("accept", "keep", "relabel", "exclude", "skip", "done")  # done: shelf box items only (box_queue)


def item_resolve(
    *, item: ReviewItem, user, action: str, class_id: int | None = None, expected_version: int | None = None
) -> ReviewItem:
    """Resolve an item: accept the suggestion, keep the given label (confirmed: never queued again for it),
    relabel to `class_id`, exclude the image (a bad photo), or skip (it goes to other reviewers).
    `expected_version` is the label version the reviewer saw: a stale one raises LabelConflict, nothing changes."""
    if action not in ACTIONS:
        raise ReviewError(f"action must be one of {', '.join(ACTIONS)} (got {action!r})")
    now = timezone.now()
    if item.queue == ReviewItem.Queue.BOXES:
        return _box_item_resolve(item=item, user=user, action=action, expected_version=expected_version, now=now)
    if action == "done":
        raise ReviewError(
            "action done is for shelf box items; a label item is accepted, kept, relabeled, excluded or skipped"
        )
    if item.second_look_of_id:
        return _second_look_resolve(item=item, user=user, action=action, class_id=class_id, now=now)
    with transaction.atomic():
        item = _holding(item, user, now)
        label = Label.objects.get(image_id=item.image_id, head_id=item.head_id)
        if expected_version is not None and label.version != expected_version:
            raise LabelConflict(label)
        undo: dict = {"label_id": label.id, "old_class_id": label.label_class_id}
        resolved_class = None
        if action in ("accept", "relabel"):
            target = item.suggested_class_id if action == "accept" else class_id
            if target is None:
                raise ReviewError("Pick a class to relabel to." if action == "relabel" else "No suggestion to accept.")
            change = label_set(
                label_id=label.id, class_id=target, expected_version=label.version, user=user, reason=f"review:{action}"
            )
            undo["new_version"] = change.label.version
            undo["parents"] = _parents_follow(image_id=item.image_id, class_id=target, user=user, action=action)
            resolved_class = target
        elif action == "keep":
            if label.label_class_id is None:
                raise ReviewError("Nothing to keep: this photo has no label yet. Accept or pick a class.")
            resolved_class = label.label_class_id
        elif action == "exclude":
            image = Image.objects.select_for_update().get(pk=item.image_id)
            undo["old_status"] = image.status
            if image.status != Image.Status.EXCLUDED:
                Image.objects.filter(pk=image.pk).update(
                    status=Image.Status.EXCLUDED, status_reason="review: bad photo"
                )
                ImageEvent.objects.create(
                    image=image, old_status=image.status, new_status=Image.Status.EXCLUDED, user=user, reason="review"
                )
        item.status = ReviewItem.Status.OPEN if action == "skip" else ReviewItem.Status.DONE
        item.resolution = ReviewItem.Resolution(
            {"accept": "accepted", "keep": "kept", "relabel": "relabeled", "exclude": "excluded", "skip": "skipped"}[
                action
            ]
        )
        item.resolved_class_id, item.resolved_by, item.resolved_at = resolved_class, user, now
        item.leased_by, item.lease_until, item.undo = None, None, undo
        item.save()
        if action != "skip":
            _maybe_second_look(item)
    return item


def _box_item_resolve(*, item: ReviewItem, user, action: str, expected_version: int | None, now) -> ReviewItem:
    """A shelf box item (review.box_queue): the boxes change with the decision, in one transaction. A stale box
    set version raises labeling.boxes.BoxConflict."""
    with transaction.atomic():
        item = _holding(item, user, now)
        try:
            done = box_queue.box_resolve(item=item, user=user, action=action, expected_version=expected_version)
        except box_queue.BoxReviewError as exc:
            raise ReviewError(str(exc)) from None
        item.status = ReviewItem.Status.OPEN if action == "skip" else ReviewItem.Status.DONE
        item.resolution = done["resolution"]
        item.resolved_class, item.resolved_by, item.resolved_at = None, user, now
        item.leased_by, item.lease_until, item.undo = None, None, done["undo"]
        item.save()
    return item


def _ancestors(class_id: int) -> list[tuple[int, int]]:
    """(class id, head id) of the class's parent, its parent's parent, ... (a model's make), nearest first."""
    out = []
    cls = LabelClass.objects.filter(pk=class_id).values("parent_id", "parent__head_id").first()
    while cls and cls["parent_id"]:
        out.append((cls["parent_id"], cls["parent__head_id"]))
        cls = LabelClass.objects.filter(pk=cls["parent_id"]).values("parent_id", "parent__head_id").first()
    return out


def _parents_follow(*, image_id: int, class_id: int, user, action: str) -> list[dict]:
    """Hierarchy: a photo relabeled to a model gets that model's make (and so on up), as the label editor does.
    Returns the undo records of the parent labels it changed."""
    changed = []
    for parent_id, head_id in _ancestors(class_id):
        label = Label.objects.select_for_update().filter(image_id=image_id, head_id=head_id).first()
        if label is not None and label.label_class_id != parent_id:
            change = label_set(
                label_id=label.id,
                class_id=parent_id,
                expected_version=label.version,
                user=user,
                reason=f"review:{action} (parent)",
            )
            changed.append(
                {"label_id": label.id, "old_class_id": label.label_class_id, "new_version": change.label.version}
            )
    return changed


def _second_look_wanted(item: ReviewItem, share: float) -> bool:
    """Deterministic per item (a multiplicative hash of its id): the same item is always picked or not."""
    return share > 0 and ((item.id * 2654435761) % 2**32) / 2**32 < share


def _maybe_second_look(item: ReviewItem) -> ReviewItem | None:
    """Double review: a share (Project.double_review_share) of decisions gets a blind copy for another reviewer,
    at the same place in the queue."""
    share = Project.objects.filter(pk=item.project_id).values_list("double_review_share", flat=True).first() or 0.0
    if not _second_look_wanted(item, share) or item.second_looks.exists():
        return None
    return ReviewItem.objects.create(
        project_id=item.project_id,
        queue=item.queue,
        image_id=item.image_id,
        head_id=item.head_id,
        given_class_id=item.given_class_id,
        suggested_class_id=item.suggested_class_id,
        suggested_prob=item.suggested_prob,
        score=item.score,
        rank=item.rank,
        top_k=item.top_k,
        model_version=item.model_version,
        random_control=item.random_control,
        second_look_of=item,
    )


def _second_look_resolve(*, item: ReviewItem, user, action: str, class_id: int | None, now) -> ReviewItem:
    """A blind second decision: recorded (for agreement), no label or image is changed."""
    with transaction.atomic():
        item = _holding(item, user, now)
        if action in ("accept", "relabel"):
            resolved = item.suggested_class_id if action == "accept" else class_id
            if resolved is None:
                raise ReviewError("Pick a class to relabel to." if action == "relabel" else "No suggestion to accept.")
        elif action == "keep":
            if item.given_class_id is None:
                raise ReviewError("Nothing to keep: this photo had no label. Accept or pick a class.")
            resolved = item.given_class_id
        else:
            resolved = None
        item.status = ReviewItem.Status.OPEN if action == "skip" else ReviewItem.Status.DONE
        item.resolution = {"accept": "accepted", "keep": "kept", "relabel": "relabeled", "exclude": "excluded"}.get(
            action, "skipped"
        )
        item.resolved_class_id, item.resolved_by, item.resolved_at = resolved, user, now
        item.leased_by, item.lease_until, item.undo = None, None, {"second_look": True}
        item.save()
    return item


def item_undo(*, user, project: Project, queue: str) -> ReviewItem | None:
    """Undo the user's last resolution in this queue: the label goes back (only if nobody changed it since:
    LabelConflict otherwise), an excluded image comes back, and the item is open and leased to the user again."""
    now = timezone.now()
    with transaction.atomic():
        item = (
            ReviewItem.objects.select_for_update()
            .filter(project=project, queue=queue, resolved_by=user)
            .exclude(resolution="")
            .exclude(undo__has_key="bulk_action")  # a bulk rule is undone as a whole (its DatasetAction)
            .order_by("-resolved_at", "-id")
            .first()
        )
        if item is None:
            return None
        undo = item.undo or {}
        if item.queue == ReviewItem.Queue.BOXES:
            try:
                box_queue.box_undo(item=item, user=user)
            except box_queue.BoxReviewError as exc:
                raise ReviewError(str(exc)) from None
            if item.resolution == ReviewItem.Resolution.EXCLUDED and undo.get("old_status") != Image.Status.EXCLUDED:
                _unexclude(item, undo, user)
        elif undo.get("second_look"):
            pass  # a second look changed nothing
        elif item.resolution in (ReviewItem.Resolution.ACCEPTED, ReviewItem.Resolution.RELABELED):
            for record in [undo, *undo.get("parents", [])]:  # all or nothing: the transaction rolls back
                label = Label.objects.select_for_update().get(pk=record["label_id"])
                if label.version != record.get("new_version"):
                    raise LabelConflict(label)
                label_set(
                    label_id=label.id,
                    class_id=record["old_class_id"],
                    expected_version=label.version,
                    user=user,
                    reason="review:undo",
                )
        elif item.resolution == ReviewItem.Resolution.EXCLUDED and undo.get("old_status") != Image.Status.EXCLUDED:
            _unexclude(item, undo, user)
        item.second_looks.filter(status=ReviewItem.Status.OPEN).delete()  # not decided yet: drawn again on redo
        item.status, item.resolution, item.resolved_class = ReviewItem.Status.OPEN, "", None
        item.resolved_by, item.resolved_at, item.undo = None, None, {}
        item.leased_by, item.lease_until = user, now + dt.timedelta(seconds=_lease_seconds())
        item.save()
        return item


def _unexclude(item: ReviewItem, undo: dict, user) -> None:
    old = undo.get("old_status", Image.Status.OK)
    Image.objects.filter(pk=item.image_id).update(status=old, status_reason="")
    ImageEvent.objects.create(
        image_id=item.image_id, old_status=Image.Status.EXCLUDED, new_status=old, user=user, reason="review:undo"
    )


# --------------------------------------------------------------------------------------------- bulk rules
def bulk_rule_preview(
    *, project: Project, accept_above: float | None = None, exclude_below: float | None = None
) -> dict:
    """What a bulk rule on the open mislabel items would do, without doing it: accept the model's suggestion
    where its probability is above `accept_above`; exclude the image where the model gives no class more than
    `exclude_below` (a photo it cannot read: blurred, empty, not the object). A threshold left None does nothing.
    Items another reviewer holds are left alone. Returns {"accept": [items], "exclude": [items], "held": n,
    "total": n to change, "token": the confirmation token bulk_rule_apply wants (labeling.health.plan_token)}."""
    from labeling.health import plan_token  # noqa: PLC0415

    for value in (accept_above, exclude_below):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ReviewError("Thresholds are probabilities between 0 and 1.")
    if accept_above is None and exclude_below is None:
        raise ReviewError("Set a threshold to accept above, to exclude below, or both.")
    if accept_above is not None and exclude_below is not None and exclude_below > accept_above:
        raise ReviewError("The exclude threshold must not be above the accept threshold.")
    now = timezone.now()
    items = list(
        ReviewItem.objects.filter(project=project, queue=ReviewItem.Queue.MISLABEL, status=ReviewItem.Status.OPEN)
        .select_related("image", "head", "given_class", "suggested_class")
        .order_by("rank", "id")
    )
    accept, exclude, held = [], [], 0
    for it in items:
        if it.leased_by_id is not None and it.lease_until and it.lease_until > now:
            held += 1
            continue
        best = max((t["prob"] for t in it.top_k), default=it.suggested_prob)
        if accept_above is not None and it.suggested_class_id is not None and it.suggested_prob > accept_above:
            accept.append(it)
        elif exclude_below is not None and best < exclude_below:
            exclude.append(it)
    token = plan_token(
        {
            "accept_above": accept_above,
            "exclude_below": exclude_below,
            "accept": [(it.pk, it.suggested_class_id) for it in accept],
            "exclude": [it.pk for it in exclude],
        }
    )
    return {"accept": accept, "exclude": exclude, "held": held, "total": len(accept) + len(exclude), "token": token}


def bulk_rule_apply(*, project: Project, user, accept_above: float | None, exclude_below: float | None, confirm: str):
    """Apply bulk_rule_preview's decisions as one DatasetAction (undo on the Health page or via action_undo
    puts the labels, the images and the items back). `confirm` is the token of the preview the user confirmed:
    a missing token, or one of another preview (the queue moved on, or the form is replayed after it was
    applied), is refused with ReviewError and nothing changes. Returns the action, or None when there was
    nothing to do."""
    from labeling.health import _relabel, _set_status  # noqa: PLC0415 - the same change records as health actions
    from labeling.models import DatasetAction  # noqa: PLC0415

    now = timezone.now()
    with transaction.atomic():
        plan = bulk_rule_preview(project=project, accept_above=accept_above, exclude_below=exclude_below)
        if not confirm:
            raise ReviewError("Nothing was applied: confirm the preview first.")
        if confirm != plan["token"]:
            raise ReviewError(
                "Nothing was applied: the queue changed since the preview you confirmed (or it was already "
                "applied). Check the new preview."
            )
        if not plan["accept"] and not plan["exclude"]:
            return None
        locked = {
            it.pk
            for it in ReviewItem.objects.select_for_update(skip_locked=True).filter(
                pk__in=[it.pk for it in plan["accept"] + plan["exclude"]], status=ReviewItem.Status.OPEN
            )
        }
        accept = [it for it in plan["accept"] if it.pk in locked]
        exclude = [it for it in plan["exclude"] if it.pk in locked]
        parts = []
        if accept_above is not None:
            parts.append(f"accepted {len(accept)} suggestion(s) above {accept_above:g}")
        if exclude_below is not None:
            parts.append(f"excluded {len(exclude)} photo(s) below {exclude_below:g}")
        summary = "mislabel queue: " + ", ".join(parts)
        action = DatasetAction.objects.create(
            project=project,
            kind=DatasetAction.Kind.REVIEW_BULK,
            summary=summary,
            params={"accept_above": accept_above, "exclude_below": exclude_below},
            user=user,
        )
        label_changes = []
        by_class: dict[int, list[int]] = {}
        for it in accept:
            by_class.setdefault(it.suggested_class_id, []).append(it)
        for class_id, its in by_class.items():
            labels = Label.objects.select_for_update().filter(
                image_id__in=[it.image_id for it in its], head_id__in=[it.head_id for it in its]
            )
            wanted = {(it.image_id, it.head_id) for it in its}
            labels = [lb for lb in labels if (lb.image_id, lb.head_id) in wanted]
            label_changes += _relabel(labels, class_id, "review: bulk accept", user, action)
            # hierarchy: the accepted model's make (and so on up) follows, in the same undoable action
            for parent_id, head_id in _ancestors(class_id):
                parents = Label.objects.select_for_update().filter(
                    image_id__in=[it.image_id for it in its], head_id=head_id
                )
                label_changes += _relabel(parents, parent_id, "review: bulk accept (parent)", user, action)
        images = list(Image.objects.select_for_update().filter(pk__in=[it.image_id for it in exclude]))
        status_changes = _set_status(images, Image.Status.EXCLUDED, "review: bulk exclude (unreadable)", user, action)
        for it, resolution in [(it, "accepted") for it in accept] + [(it, "excluded") for it in exclude]:
            ReviewItem.objects.filter(pk=it.pk).update(
                status=ReviewItem.Status.DONE,
                resolution=resolution,
                resolved_class=it.suggested_class if resolution == "accepted" else None,
                resolved_by=user,
                resolved_at=now,
                leased_by=None,
                lease_until=None,
                undo={"bulk_action": action.id},
            )
        action.changes = {
            "labels": label_changes,
            "status": status_changes,
            "items": [it.pk for it in accept + exclude],
        }
        action.save(update_fields=["changes"])
    return action


def queue_refresh(*, project: Project, queue: str, user=None) -> int:
    """Queue the rebuild of a review queue with the active version (a Celery task on the gpu queue): out-of-fold
    predictions + cleanlab for the mislabel queue, predictions of every unlabeled photo for the low-confidence
    queue. Returns the version number. ReviewError when nothing is promoted yet."""
    version = ModelVersion.objects.filter(project=project, is_active=True).first()
    if version is None:
        raise ReviewError("Train and promote a model first: the queue is built from its predictions.")
    # An admin asked for it: a broker outage is a 503 (BrokerUnavailable) that changed nothing.
    mislabel = queue == ReviewItem.Queue.MISLABEL
    job_enqueue(
        project=project,
        kind=Job.Kind.MISLABEL_REFRESH if mislabel else Job.Kind.UNCERTAIN_REFRESH,
        version=version if mislabel else None,
        user=user,
        what=f"the {'mislabel' if mislabel else 'low-confidence'} queue rebuild",
    )
    return version.number


# ------------------------------------------------------------------------------------- low-confidence queue
def uncertain_refresh(*, project: Project, size: int | None = None, seed: int = 0, report=None) -> dict:
    """Rebuild the project's low-confidence queue with the active model: every usable image with an unlabeled
    head (imported photos and production photos kept by the recognition endpoint) is predicted; its most
    uncertain unlabeled head (the project's strategy: least confidence, margin or entropy) is its score; the
    most uncertain are diversified on the embeddings (k-center greedy, far from each other and from the labeled
    gallery), and `random_control_share` of the batch is drawn at random and marked as the control arm. Random
    items are interleaved evenly, so both arms are labeled at the same pace. Returns {"candidates", "queued",
    "random", "strategy", "model_version"}."""
    from inference.batch import predict_items_cached  # noqa: PLC0415
    from inference.recognizer import Recognizer  # noqa: PLC0415

    from . import active  # noqa: PLC0415

    version = ModelVersion.objects.filter(project=project, is_active=True).first()
    if version is None:
        raise ReviewError("Train and promote a model first: the queue ranks photos by its uncertainty.")
    size = int(size or getattr(settings, "LOUPE_UNCERTAIN_BATCH", 500))
    heads = {h.id: h for h in project.heads.all()}
    unlabeled: dict[int, list[int]] = {}
    for image_id, head_id in (
        Label.objects.filter(image__project=project, image__status=Image.Status.OK, label_class__isnull=True)
        .order_by("image_id", "head_id")
        .values_list("image_id", "head_id")
    ):
        unlabeled.setdefault(image_id, []).append(head_id)
    image_ids = sorted(unlabeled)
    files = {i: (f, sha) for i, f, sha in Image.objects.filter(pk__in=image_ids).values_list("id", "file", "sha256")}
    report = report or (lambda **_: None)
    report(step=f"predicting {len(image_ids)} unlabeled photos with v{version.number}")
    art = storage.artifact_local(version.artifact_dir)
    rec = Recognizer.load(art)
    # Through the feature cache keyed by this version's backbone: a re-rank only runs the backbone on new photos.
    paths = storage.local_paths([files[i][0] for i in image_ids])
    cached = [
        {"path": path or storage.missing_path(files[i][0]), "sha256": files[i][1]}
        for i, path in zip(image_ids, paths, strict=True)
    ]
    probs, emb, ok = (
        predict_items_cached(rec, cached, settings.LOUPE_FEATURE_CACHE)
        if cached
        else ({}, np.zeros((0, rec.embedding_dim)), np.zeros(0, bool))
    )
    keep = np.flatnonzero(ok)
    image_ids = [image_ids[i] for i in keep]
    emb = emb[keep] if len(keep) else np.zeros((0, rec.embedding_dim), np.float32)
    head_scores = {
        h.name: active.uncertainty(probs[h.name][keep], project.uncertainty_strategy)
        for h in heads.values()
        if h.name in probs and len(keep)
    }
    scores = np.zeros(len(image_ids))
    chosen_head: list[int] = []
    for row, image_id in enumerate(image_ids):
        best_head, best = None, -1.0
        for head_id in unlabeled[image_id]:
            name = heads[head_id].name
            if name in head_scores and head_scores[name][row] > best:
                best_head, best = head_id, float(head_scores[name][row])
        chosen_head.append(best_head)
        scores[row] = max(best, 0.0)
    usable = [r for r, h in enumerate(chosen_head) if h is not None]
    labeled = None
    cache = art / GALLERY_CACHE
    if cache.is_file():
        with np.load(cache) as cached:
            labeled = cached["emb"]
        if len(labeled) > 20_000:  # enough to keep picks away from what is labeled; bounded work
            labeled = labeled[np.random.default_rng(seed).choice(len(labeled), 20_000, replace=False)]
    picks = active.select_by_scores(
        scores[usable],
        emb[usable],
        size=size,
        random_share=project.random_control_share,
        labeled_embeddings=labeled,
        seed=seed,
    )
    active_picks = [(usable[r], s) for r, is_random, s in picks if not is_random]
    random_picks = [(usable[r], s) for r, is_random, s in picks if is_random]
    total, n_random = len(active_picks) + len(random_picks), len(random_picks)
    slots = {int((j + 0.5) * total / n_random) for j in range(n_random)} if n_random else set()
    actives, randoms = iter(active_picks), iter(random_picks)
    order = []  # random control items spread evenly through the queue: both arms are labeled at the same pace
    for position in range(total):
        row, score = next(randoms) if position in slots else next(actives)
        order.append((row, position in slots, score))
    classes = {h.id: {c.name: c.id for c in LabelClass.objects.filter(head=h)} for h in heads.values()}
    items = []
    for rank, (row, is_random, score) in enumerate(order):
        head = heads[chosen_head[row]]
        p = probs[head.name][keep[row]]
        names = rec.label_maps[head.name]
        top = np.argsort(-p)[:5]
        cid = classes[head.id]
        items.append(
            ReviewItem(
                project=project,
                queue=ReviewItem.Queue.UNCERTAIN,
                image_id=image_ids[row],
                head=head,
                given_class=None,
                suggested_class_id=cid.get(names[int(top[0])]),
                suggested_prob=float(p[top[0]]),
                score=float(score),
                rank=rank,
                top_k=[
                    {"class_id": cid.get(names[int(j)]), "label": names[int(j)], "prob": round(float(p[j]), 4)}
                    for j in top
                ],
                model_version=version.number,
                random_control=is_random,
            )
        )
    with transaction.atomic():
        ReviewItem.objects.filter(
            project=project, queue=ReviewItem.Queue.UNCERTAIN, status=ReviewItem.Status.OPEN
        ).update(status=ReviewItem.Status.STALE, leased_by=None, lease_until=None)
        ReviewItem.objects.bulk_create(items, batch_size=1000)
    return {
        "candidates": len(usable),
        "queued": len(items),
        "random": sum(it.random_control for it in items),
        "strategy": project.uncertainty_strategy,
        "model_version": version.number,
    }


def arms_probe_report(*, out_dir: Path, manifest: dict, project: Project, frozen_at) -> dict:
    """The low-confidence queue's A/B on this model (review.curve.arms_probe): retrieval top-1 on the test split
    against the number of active vs random-arm labels in the gallery; written as arms.json."""
    if not (out_dir / GALLERY_CACHE).exists() or not (out_dir / TEST_CACHE).exists():
        return {}  # no validation split (no gallery cache) or no test split: nothing to measure on
    with np.load(out_dir / GALLERY_CACHE) as g, np.load(out_dir / TEST_CACHE) as t:
        out = arms_probe(
            project=project,
            frozen_at=frozen_at,
            manifest=manifest,
            gallery_ids=g["ids"],
            gallery_emb=g["emb"],
            test_ids=t["ids"],
            test_emb=t["emb"],
        )
    write_json_atomic(out_dir / "arms.json", out)
    return out


def reopen_bulk_rule_items(action) -> None:
    """Undo of a review queue bulk rule (labeling.health.action_undo's hook): the items it resolved are open
    again (the labels it changed are put back by labeling)."""
    ReviewItem.objects.filter(pk__in=(action.changes or {}).get("items", []), resolved_by=action.user).update(
        status=ReviewItem.Status.OPEN, resolution="", resolved_by=None, resolved_at=None, undo={}
    )
