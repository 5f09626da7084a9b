"""The shelf box queue (issue 18.5, review.box_queue): shelf photos whose detector boxes wait as suggestions are
handed out with leases, accepted (every suggestion confirmed), done (the set as the reviewer saved it), excluded
or skipped; stale box versions are 409 and nothing changes; undo puts the boxes back unless they changed since;
the page shows the box editor; the REST queue API serves box items; other projects' items are 404."""

import pytest
from django.urls import reverse

from labeling import boxes
from labeling.models import Box, BoxSet, Image, ProjectMember
from labeling.tests.factories import ImageFactory, ProjectFactory
from review import box_queue, services
from review.models import ReviewItem

pytestmark = pytest.mark.django_db


def _suggest(image, head, classes, scores):
    """The detector's suggestions on `image` as inference.shelf.shelf_keep writes them (a set nobody saved)."""
    box_set, _ = BoxSet.objects.get_or_create(image=image, head=head)
    Box.objects.bulk_create(
        [
            Box(
                box_set=box_set,
                label_class=classes["bottle"],
                x=5.0 + 20 * i,
                y=10.0,
                w=15.0,
                h=30.0,
                source=Box.Source.MODEL,
                score=s,
                order=i,
            )
            for i, s in enumerate(scores)
        ]
    )
    return box_set


@pytest.fixture
def shelf():
    project = ProjectFactory(name="Shelf", preset="shelf")
    head = project.heads.get(name="container")
    classes = {c.name: c for c in head.classes.all()}
    images = [ImageFactory(project=project, size=100) for _ in range(3)]
    for image, scores in zip(images, ([0.9, 0.35], [0.8, 0.55, 0.7], [0.2]), strict=True):
        _suggest(image, head, classes, scores)
    return project, head, classes, images


def test_sweep_queues_unreviewed_suggestions_least_sure_first_once(shelf):
    project, head, classes, images = shelf
    assert box_queue.box_queue_sweep(project=project) == 3
    assert box_queue.box_queue_sweep(project=project) == 0  # open items are not queued twice
    items = list(ReviewItem.objects.filter(project=project, queue="boxes").order_by("rank", "id"))
    assert [it.image_id for it in items] == [images[2].id, images[0].id, images[1].id]
    assert [it.score for it in items] == pytest.approx([0.2, 0.35, 0.55])
    # a photo a person already confirmed (no suggestion left) is not queued
    other = ImageFactory(project=project, size=100)
    confirmed = [{"x": 1, "y": 1, "w": 9, "h": 9, "class_id": classes["can"].id}]
    boxes.box_set(image=other, head=head, boxes=confirmed, expected_version=0)
    assert box_queue.box_queue_sweep(project=project) == 0


def test_accept_confirms_every_suggestion_and_undo_puts_them_back(shelf, reviewer):
    project, head, classes, images = shelf
    box_queue.box_queue_sweep(project=project)
    item = services.queue_next(project=project, queue="boxes", user=reviewer)
    assert item.image_id == images[2].id
    with pytest.raises(boxes.BoxConflict):  # a stale version (someone saved meanwhile): nothing changes
        services.item_resolve(item=item, user=reviewer, action="accept", expected_version=3)
    assert BoxSet.objects.get(image=images[2]).version == 0
    done = services.item_resolve(item=item, user=reviewer, action="accept", expected_version=0)
    assert done.status == "done" and done.resolution == "accepted"
    box_set = BoxSet.objects.get(image=images[2])
    assert box_set.version == 1 and [(b.source, b.score) for b in box_set.boxes.all()] == [("human", None)]
    undone = services.item_undo(user=reviewer, project=project, queue="boxes")
    assert undone.id == item.id and undone.status == "open" and undone.leased_by == reviewer
    box_set.refresh_from_db()
    assert box_set.version == 2 and [(b.source, b.score) for b in box_set.boxes.all()] == [("model", 0.2)]
    # accepted again, then edited by someone: the accept can no longer be undone, and nothing changes
    services.item_resolve(item=undone, user=reviewer, action="accept", expected_version=2)
    boxes.box_set(image=images[2], head=head, boxes=[], expected_version=3, reason="edit")
    with pytest.raises(services.ReviewError, match="changed since"):
        services.item_undo(user=reviewer, project=project, queue="boxes")
    assert BoxSet.objects.get(image=images[2]).boxes.count() == 0
    assert ReviewItem.objects.get(pk=item.pk).status == "done"


def test_done_needs_a_saved_set_without_suggestions(shelf, reviewer):
    project, head, classes, images = shelf
    box_queue.box_queue_sweep(project=project)
    item = services.queue_next(project=project, queue="boxes", user=reviewer)
    with pytest.raises(services.ReviewError, match="Nobody has saved"):
        services.item_resolve(item=item, user=reviewer, action="done")
    # saved with one suggestion left: refused, naming how many
    current = boxes.box_dicts(BoxSet.objects.get(image_id=item.image_id))
    boxes.box_set(image=item.image, head=head, boxes=current + [{**current[0], "x": 60.0}], expected_version=0)
    with pytest.raises(services.ReviewError, match="2 suggestions are still unreviewed"):
        services.item_resolve(item=item, user=reviewer, action="done", expected_version=1)
    fixed = [{**b, "source": "human", "score": None, "class_id": classes["can"].id} for b in current]
    boxes.box_set(image=item.image, head=head, boxes=fixed, expected_version=1)
    with pytest.raises(boxes.BoxConflict):
        services.item_resolve(item=item, user=reviewer, action="done", expected_version=1)
    done = services.item_resolve(item=item, user=reviewer, action="done", expected_version=2)
    assert done.resolution == "corrected" and done.undo == {"box_version": 2}
    from review.stats import reviewer_stats

    (row,) = reviewer_stats(project=project)
    assert row["corrected"] == 1 and row["accepted_share"] == 0.0  # the model's boxes needed a person's edit
    # undoing "done" reopens the item and leaves the boxes as saved
    services.item_undo(user=reviewer, project=project, queue="boxes")
    assert BoxSet.objects.get(image_id=item.image_id).version == 2
    with pytest.raises(services.ReviewError, match="shelf box item is decided with"):
        services.item_resolve(item=item, user=reviewer, action="keep")


def test_exclude_skip_and_leases(shelf, reviewer, admin_user):
    project, head, classes, images = shelf
    box_queue.box_queue_sweep(project=project)
    mine = services.queue_next(project=project, queue="boxes", user=reviewer)
    theirs = services.queue_next(project=project, queue="boxes", user=admin_user)
    assert mine.id != theirs.id  # two reviewers never get the same photo
    with pytest.raises(services.ReviewError, match="Another reviewer holds"):
        services.item_resolve(item=theirs, user=reviewer, action="accept")
    services.item_resolve(item=mine, user=reviewer, action="exclude")
    assert Image.objects.get(pk=mine.image_id).status == Image.Status.EXCLUDED
    services.item_undo(user=reviewer, project=project, queue="boxes")
    assert Image.objects.get(pk=mine.image_id).status == Image.Status.OK
    skipped = services.item_resolve(item=mine, user=reviewer, action="skip")
    assert skipped.status == "open"
    # a skipped photo goes to others: the reviewer gets the third one next
    nxt = services.queue_next(project=project, queue="boxes", user=reviewer)
    assert nxt.id not in (mine.id, theirs.id)


def test_the_page_shows_the_editor_and_decides_with_the_version_it_holds(client, shelf, reviewer):
    project, head, classes, images = shelf
    box_queue.box_queue_sweep(project=project)
    client.force_login(reviewer)
    url = reverse("review:queue", args=[project.slug, "boxes"])
    page = client.get(url).content.decode()
    item = ReviewItem.objects.get(leased_by=reviewer)
    assert item.image_id == images[2].id
    assert 'class="box-editor"' in page and "box_review.js" in page and 'id="tab-boxes"' in page
    assert "1 unreviewed suggestion " in page and "3 left" in page and 'name="version" value="0"' in page
    resolve = reverse("review:resolve", args=[project.slug, "boxes", item.id])
    # a form post answers with the queue page again (post/redirect/get) and says what happened
    stale = client.post(resolve, {"action": "accept", "version": "5"}, follow=True)
    assert "nothing was overwritten" in stale.content.decode() and BoxSet.objects.get(image=images[2]).version == 0
    refused = client.post(resolve, {"action": "done", "version": "0"}, follow=True)
    assert "Nobody has saved" in refused.content.decode()
    assert ReviewItem.objects.get(pk=item.pk).status == "open"
    ok = client.post(resolve, {"action": "accept", "version": "0"})
    assert ok.status_code == 302 and ReviewItem.objects.get(pk=item.pk).resolution == "accepted"
    # the next photo is shown after the redirect; a reviewer cannot sweep (an admin action)
    assert f'data-item="{item.id}"' not in client.get(url).content.decode()
    sweep = client.post(reverse("review:refresh", args=[project.slug, "boxes"]))
    assert sweep.status_code == 403


def test_box_items_over_rest(shelf, reviewer, token_client, django_user_model):
    project, head, classes, images = shelf
    box_queue.box_queue_sweep(project=project)
    rev = token_client(reviewer)
    base = f"/api/v1/projects/{project.slug}/review/boxes"
    first = rev.post(f"{base}/next/").json()
    assert first["queue"] == "boxes" and first["image_id"] == images[2].id and first["label_version"] == 0
    assert first["head"] == "container" and first["score"] == pytest.approx(0.2)
    stale = rev.post(f"{base}/items/{first['id']}/resolve/", {"action": "accept", "version": 4}, format="json")
    assert stale.status_code == 409 and stale.json()["error"]["details"]["current"]["version"] == 0
    bad = rev.post(f"{base}/items/{first['id']}/resolve/", {"action": "keep"}, format="json")
    assert bad.status_code == 400 and "accept, done, exclude, skip" in bad.json()["error"]["message"]
    ok = rev.post(f"{base}/items/{first['id']}/resolve/", {"action": "accept", "version": 0}, format="json")
    assert ok.status_code == 200 and ok.json()["resolution"] == "accepted" and ok.json()["label_version"] == 1
    stats = rev.get(f"/api/v1/projects/{project.slug}/review/stats/").json()
    assert stats["queues"]["boxes"] == {"open": 2, "done": 1}
    # another project's members-only queue is hidden: 404, nothing leased
    hidden = ProjectFactory(name="Hidden shelf", preset="shelf", members_only=True)
    outsider = django_user_model.objects.create_user("outsider", password="outsider-pass-123")
    ProjectMember.objects.create(project=project, user=outsider, role=ProjectMember.Role.REVIEWER)
    out = token_client(outsider)
    r = out.post(f"/api/v1/projects/{hidden.slug}/review/boxes/next/")
    assert r.status_code == 404
    r = out.post(
        f"/api/v1/projects/{hidden.slug}/review/boxes/items/{first['id']}/resolve/", {"action": "skip"}, format="json"
    )
    assert r.status_code == 404
