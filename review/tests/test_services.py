import threading

import pytest
from django.db import connection, transaction

from labeling.models import Image, Label, LabelClass, LabelEvent
from labeling.services import LabelConflict
from review import services
from review.models import ReviewItem
from review.tests.factories import ReviewItemFactory
from review.tests.helpers import plant


@pytest.mark.django_db
def test_refresh_queues_the_planted_flips_and_never_requeues_a_confirmed_label(
    shapes_project, trained_version, admin_user
):
    project = shapes_project(6)
    version = trained_version(project)
    flipped = plant(project, version)
    assert services.mislabel_refresh(version=version) == {"class": len(flipped)}
    items = list(ReviewItem.objects.filter(project=project, status="open").select_related("suggested_class"))
    assert {it.image_id for it in items} == set(flipped)
    assert all(it.suggested_class.name == flipped[it.image_id] for it in items)
    assert [it.rank for it in items] == list(range(len(items))) and items[0].score <= items[-1].score
    assert items[0].top_k[0]["label"] == flipped[items[0].image_id] and len(items[0].top_k) == 4
    # "keep" confirms the given label: a refresh never queues it again; the other items are rebuilt
    first = services.queue_next(project=project, queue="mislabel", user=admin_user)
    services.item_resolve(item=first, user=admin_user, action="keep")
    assert services.mislabel_refresh(version=version) == {"class": len(flipped) - 1}
    assert first.image_id not in set(
        ReviewItem.objects.filter(project=project, status="open").values_list("image_id", flat=True)
    )
    assert ReviewItem.objects.filter(status="stale").count() == len(flipped) - 1
    # a label changed since the freeze is not queued (the queue would show a label nobody gave)
    other = ReviewItem.objects.filter(project=project, status="open").first()
    Label.objects.filter(image_id=other.image_id).update(label_class=other.suggested_class)
    assert services.mislabel_refresh(version=version) == {"class": len(flipped) - 2}


@pytest.mark.django_db
def test_resolutions_change_labels_with_history_and_undo_puts_them_back(
    shapes_project, trained_version, admin_user, reviewer
):
    project = shapes_project(6)
    version = trained_version(project)
    flipped = plant(project, version)
    services.mislabel_refresh(version=version)
    item = services.queue_next(project=project, queue="mislabel", user=reviewer)
    label = Label.objects.get(image_id=item.image_id)
    with pytest.raises(LabelConflict):  # the reviewer saw an older label version: nothing changes
        services.item_resolve(item=item, user=reviewer, action="accept", expected_version=label.version - 1 or 99)
    services.item_resolve(item=item, user=reviewer, action="accept", expected_version=label.version)
    label.refresh_from_db()
    assert label.label_class.name == flipped[item.image_id]
    assert LabelEvent.objects.filter(image_id=item.image_id, reason="review:accept").exists()
    with pytest.raises(services.ReviewError, match="already reviewed"):
        services.item_resolve(item=item, user=reviewer, action="keep")
    undone = services.item_undo(user=reviewer, project=project, queue="mislabel")
    assert undone.pk == item.pk and undone.status == "open" and undone.leased_by == reviewer
    label.refresh_from_db()
    assert label.label_class.name != flipped[item.image_id]  # the given (wrong) label is back
    # relabel to a class of the reviewer's choice, exclude a bad photo (and undo it)
    blue = LabelClass.objects.get(head=label.head, name="blue")
    services.item_resolve(item=undone, user=reviewer, action="relabel", class_id=blue.id)
    assert Label.objects.get(pk=label.pk).label_class == blue
    nxt = services.queue_next(project=project, queue="mislabel", user=reviewer)
    assert nxt.pk != item.pk
    services.item_resolve(item=nxt, user=reviewer, action="exclude")
    assert Image.objects.get(pk=nxt.image_id).status == "excluded"
    services.item_undo(user=reviewer, project=project, queue="mislabel")
    assert Image.objects.get(pk=nxt.image_id).status == "ok"
    with pytest.raises(services.ReviewError, match="action must be"):
        services.item_resolve(item=nxt, user=reviewer, action="delete")


@pytest.mark.django_db
def test_leases_two_reviewers_never_share_an_item_and_abandoned_items_come_back(
    shapes_project, trained_version, admin_user, reviewer
):
    import datetime as dt

    from django.utils import timezone

    project = shapes_project(6)
    version = trained_version(project)
    plant(project, version)
    services.mislabel_refresh(version=version)
    a = services.queue_next(project=project, queue="mislabel", user=admin_user)
    b = services.queue_next(project=project, queue="mislabel", user=reviewer)
    assert a.pk != b.pk
    assert services.queue_next(project=project, queue="mislabel", user=admin_user).pk == a.pk  # still mine
    with pytest.raises(services.ReviewError, match="Another reviewer"):
        services.item_resolve(item=a, user=reviewer, action="keep")
    later = timezone.now() + dt.timedelta(seconds=3600)  # admin walked away: the lease expired
    c = services.queue_next(project=project, queue="mislabel", user=reviewer, now=later)
    assert c.pk in (a.pk, b.pk)
    # skip: the item goes to others, not back to the one who skipped it
    services.item_resolve(item=b, user=reviewer, action="skip")
    assert services.queue_next(project=project, queue="mislabel", user=reviewer).pk != b.pk


@pytest.mark.django_db(transaction=True)
def test_concurrent_handouts_skip_locked_rows(shapes_project, trained_version, admin_user, reviewer):
    """Two reviewers asking at the same moment, each in their own transaction and database connection."""
    project = shapes_project(6)
    version = trained_version(project)
    plant(project, version)
    services.mislabel_refresh(version=version)
    got: dict[str, int] = {}
    holding = threading.Event()
    release = threading.Event()

    def first():
        try:
            with transaction.atomic():  # the hand-out's row lock is held until this block ends
                got["a"] = services.queue_next(project=project, queue="mislabel", user=admin_user).pk
                holding.set()
                release.wait(10)
        finally:
            connection.close()

    t = threading.Thread(target=first)
    t.start()
    assert holding.wait(10)
    import time

    started = time.monotonic()
    try:
        got["b"] = services.queue_next(project=project, queue="mislabel", user=reviewer).pk
        waited = time.monotonic() - started
    finally:
        release.set()
        t.join(10)
    assert got["a"] != got["b"]
    assert waited < 5, f"the second hand-out waited {waited:.1f} s for the first one's lock (no SKIP LOCKED?)"


@pytest.mark.django_db
def test_relabeling_a_model_sets_its_make_and_undo_puts_both_back(reviewer, car_project):
    from labeling.tests.factories import ImageFactory  # noqa: PLC0415

    project = car_project(groups=0)
    make, model = project.heads.order_by("order")
    toyota = make.classes.get(name="Toyota")
    civic, corolla = model.classes.get(name="Civic"), model.classes.get(name="Corolla")

    def corolla_photo(prob: float, rank: int):
        """A photo labeled Toyota Corolla, queued with the suggestion Civic."""
        image = ImageFactory(project=project, labels={"make": toyota, "model": corolla})
        make_label, model_label = Label.objects.get(image=image, head=make), Label.objects.get(image=image, head=model)
        item = ReviewItemFactory(
            image=image,
            head=model,
            given_class=corolla,
            suggested_class=civic,
            suggested_prob=prob,
            score=1 - prob,
            rank=rank,
        )
        return image, make_label, model_label, item

    def labels_of(image) -> dict:
        return dict(Label.objects.filter(image=image).values_list("head__name", "label_class__name"))

    image, make_label, model_label, item = corolla_photo(0.9, 0)
    services.item_resolve(item=item, user=reviewer, action="accept", expected_version=model_label.version)
    assert labels_of(image) == {"make": "Honda", "model": "Civic"}  # a Civic is never left under Toyota
    assert LabelEvent.objects.filter(image=image, reason="review:accept (parent)").count() == 1
    services.item_undo(user=reviewer, project=project, queue="mislabel")
    assert labels_of(image) == {"make": "Toyota", "model": "Corolla"}
    # the make was changed by someone else meanwhile: undo refuses and changes nothing
    item.refresh_from_db()
    services.item_resolve(item=item, user=reviewer, action="relabel", class_id=civic.id)
    Label.objects.filter(pk=make_label.pk).update(version=99)
    with pytest.raises(LabelConflict):
        services.item_undo(user=reviewer, project=project, queue="mislabel")
    assert Label.objects.get(pk=model_label.pk).label_class == civic
    # a bulk rule accepts a model above the threshold: its make follows, in the same undoable action
    from labeling.health import action_undo  # noqa: PLC0415

    other = corolla_photo(0.95, 1)[0]
    rule = {"accept_above": 0.8, "exclude_below": None}
    token = services.bulk_rule_preview(project=project, **rule)["token"]
    action = services.bulk_rule_apply(project=project, user=reviewer, **rule, confirm=token)
    assert labels_of(other) == {"make": "Honda", "model": "Civic"}
    action_undo(action=action, user=reviewer)
    assert labels_of(other) == {"make": "Toyota", "model": "Corolla"}


@pytest.mark.django_db
def test_the_refresh_task_reuses_a_versions_oof_and_leaves_the_queue_alone_for_a_version_not_active(
    shapes_project, trained_version
):
    from pipeline import tasks
    from training.models import ModelVersion

    project = shapes_project(6)
    version = trained_version(project)
    assert version.is_active  # a project's first model
    flipped = plant(project, version)  # out-of-fold files on disk, as a finished OOF job leaves them
    ModelVersion.objects.filter(pk=version.pk).update(metrics={**version.metrics, "oof": {"k": 5}})
    assert tasks.mislabel_refresh(version.id) == {"class": len(flipped)}  # reused: the planted flips, no refit
    ModelVersion.objects.filter(pk=version.pk).update(is_active=False)  # e.g. another version was promoted
    ReviewItem.objects.all().delete()
    assert tasks.mislabel_refresh(version.id) == {"skipped": f"v{version.number} is not the active version"}
    assert not ReviewItem.objects.exists()
