"""Boxes as labels (issue 18.1): the shelf preset, box sets with optimistic concurrency, history, undo through the
action log, validation messages, and the REST endpoints (happy path, bad input, other projects' ids, stale versions,
reviewers on admin endpoints)."""

import pytest

from labeling import boxes, health, services
from labeling.models import Box, BoxEvent, BoxSet, DatasetAction, Head, Label, ProjectMember
from labeling.tests.factories import ImageFactory, ProjectFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def shelf():
    project = ProjectFactory(name="Shelf", preset="shelf")
    head = project.heads.get(name="container")
    classes = {c.name: c for c in head.classes.all()}
    image = ImageFactory(project=project, size=100)  # 100 × 100 px
    return project, head, classes, image


def _box(cls, x=10.0, y=20.0, w=30.0, h=40.0, **extra):
    return {"x": x, "y": y, "w": w, "h": h, "class_id": cls.id, **extra}


def test_the_shelf_preset_has_a_detection_head_with_the_container_classes(shelf):
    project, head, classes, image = shelf
    assert head.kind == Head.Kind.DETECTION and project.preset == "shelf"
    assert sorted(classes) == ["bottle", "can", "glass", "unknown_container"]
    services.image_labels_ensure(image=image)
    assert not Label.objects.filter(head=head).exists()  # a detection head's labels are boxes, not Label rows
    skus = ProjectFactory(name="Skus", preset="sku")
    project.sku_project = skus
    project.save(update_fields=["sku_project"])
    skus.delete()  # SET_NULL: the shelf project stays
    project.refresh_from_db()
    assert project.sku_project is None


def test_box_set_stores_versions_history_and_refuses_stale_edits(shelf, admin_user):
    _project, head, classes, image = shelf
    first = boxes.box_set(image=image, head=head, boxes=[_box(classes["can"])], expected_version=0, user=admin_user)
    assert first.changed and first.box_set.version == 1
    assert list(first.box_set.boxes.values_list("x", "y", "w", "h")) == [(10.0, 20.0, 30.0, 40.0)]
    two = [_box(classes["can"]), _box(classes["bottle"], x=50, y=0, w=50, h=100, source="model", score=0.9)]
    second = boxes.box_set(image=image, head=head, boxes=two, expected_version=1, user=admin_user)
    assert second.box_set.version == 2 and second.box_set.boxes.count() == 2
    # Same set again: no new version, no event.
    assert not boxes.box_set(image=image, head=head, boxes=two, expected_version=2).changed
    # A stale version: refused with the current set, nothing overwritten.
    with pytest.raises(boxes.BoxConflict) as exc:
        boxes.box_set(image=image, head=head, boxes=[], expected_version=1)
    assert exc.value.current.version == 2 and exc.value.current.boxes.count() == 2
    events = list(BoxEvent.objects.filter(box_set__image=image).order_by("id"))
    assert [(len(e.old), len(e.new), e.version) for e in events] == [(0, 1, 1), (1, 2, 2)]
    assert events[1].new[1] == {"x": 50.0, "y": 0.0, "w": 50.0, "h": 100.0, "class_id": classes["bottle"].id,
                                "source": "model", "score": 0.9}  # fmt: skip
    assert DatasetAction.objects.filter(kind="box_set").count() == 2  # each change in the action log
    # An empty set is a real state: looked at, nothing there.
    boxes.box_set(image=image, head=head, boxes=[], expected_version=2)
    assert BoxSet.objects.get(image=image, head=head).version == 3 and not Box.objects.exists()


def test_undo_restores_the_previous_set_unless_it_changed_since(shelf, admin_user):
    _project, head, classes, image = shelf
    boxes.box_set(image=image, head=head, boxes=[_box(classes["can"])], expected_version=0)
    boxes.box_set(image=image, head=head, boxes=[_box(classes["glass"], w=5)], expected_version=1)
    action = boxes.box_set_undo(image=image, head=head, user=admin_user)
    current = BoxSet.objects.get(image=image, head=head)
    assert current.version == 3 and [b.label_class.name for b in current.boxes.all()] == ["can"]
    assert action.undone_at is not None and BoxEvent.objects.filter(action=action).count() == 2  # change + undo
    # Undo again: the first change (→ no boxes). Then nothing is left to undo.
    boxes.box_set_undo(image=image, head=head)
    assert not BoxSet.objects.get(image=image, head=head).boxes.exists()
    with pytest.raises(services.LabelingError, match="Nothing to undo"):
        boxes.box_set_undo(image=image, head=head)
    # An action whose set changed since is skipped by the action log's undo (never overwrites a later edit).
    change = boxes.box_set(image=image, head=head, boxes=[_box(classes["can"])], expected_version=4)
    boxes.box_set(image=image, head=head, boxes=[_box(classes["bottle"])], expected_version=5)
    assert health.action_undo(action=change.action) == {"skipped": 1}
    assert [b.label_class.name for b in BoxSet.objects.get(image=image, head=head).boxes.all()] == ["bottle"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"x": 80, "w": 30}, "box 0: box (80, 20, 30, 40) reaches outside the 100×100 image"),
        ({"w": 0}, "box 0: w and h must be > 0"),
        ({"x": -5}, "box 0: box (-5, 20, 30, 40) reaches outside"),
        ({"x": "left"}, "box 0: x must be a number of pixels"),
        ({"class_id": 999999}, "box 0: class_id 999999 is not a class of container"),
        ({"score": 1.5}, "box 0: score must be from 0 to 1"),
        ({"source": "guess"}, "box 0: source must be human or model"),
    ],
)
def test_bad_boxes_are_refused_with_the_box_named(shelf, bad, message):
    _project, head, classes, image = shelf
    with pytest.raises(services.LabelingError, match="Nothing was saved") as exc:
        boxes.box_set(image=image, head=head, boxes=[_box(classes["can"]), {**_box(classes["can"]), **bad}],
                      expected_version=0)  # fmt: skip
    assert message.replace("box 0", "box 1") in str(exc.value)
    assert not BoxSet.objects.exists() and not DatasetAction.objects.exists()


def test_boxes_need_a_detection_head_of_the_images_project(shelf):
    _project, head, classes, image = shelf
    other = ProjectFactory(name="Other shelf", preset="shelf")
    with pytest.raises(services.LabelingError, match="not a head of image"):
        boxes.box_set(image=image, head=other.heads.get(), boxes=[], expected_version=0)
    cls_head = services.head_create(project=image.project, name="brand")
    with pytest.raises(services.LabelingError, match="is a class head"):
        boxes.box_set(image=image, head=cls_head, boxes=[], expected_version=0)
    with pytest.raises(services.LabelingError, match="at most 2000"):
        boxes.box_set(image=image, head=head, boxes=[_box(classes["can"])] * 2001, expected_version=0)
    # A box just over the edge by float rounding is clipped, not refused.
    out = boxes.box_set(image=image, head=head, boxes=[_box(classes["can"], x=70.0000001, w=30)], expected_version=0)
    b = out.box_set.boxes.get()
    assert b.x + b.w == pytest.approx(100) and b.x + b.w <= 100


# ------------------------------------------------------------------------------------------------------ REST
@pytest.fixture
def admin(admin_user, token_client):
    return token_client(admin_user)


@pytest.fixture
def rev(reviewer, token_client):
    return token_client(reviewer)


def test_shelf_projects_are_created_over_rest_and_the_page(admin, rev, client, admin_user):
    skus = ProjectFactory(name="Skus", preset="sku")
    made = admin.post("/api/v1/projects/", {"name": "Aisle 3", "preset": "shelf", "sku_project": "skus"}, format="json")
    assert made.status_code == 201, made.json()
    data = made.json()
    assert data["sku_project"] == "skus" and data["heads"] == [
        {"name": "container", "kind": "detection", "parent": None, "optional": False, "threshold": 0.6, "classes": 4}
    ]
    bad = admin.post("/api/v1/projects/", {"name": "A4", "preset": "shelf", "sku_project": "nope"}, format="json")
    assert bad.status_code == 400 and "No project 'nope'" in bad.json()["error"]["message"]
    head = admin.post(f"/api/v1/projects/{skus.slug}/heads/", {"name": "shelf", "kind": "detection"}, format="json")
    assert head.status_code == 201 and head.json()["kind"] == "detection"
    client.force_login(admin_user)
    page = client.post("/", {"name": "Aisle 5", "preset": "shelf", "heads": "", "classes": ""})
    assert page.status_code == 302, page.content[:500]
    assert Head.objects.get(project__slug="aisle-5").kind == "detection"


def test_boxes_over_rest(admin, rev, shelf):
    project, head, classes, image = shelf
    url = f"/api/v1/projects/{project.slug}/images/{image.id}/boxes/container/"
    empty = rev.get(url)
    assert empty.status_code == 200 and empty.json()["version"] == 0 and empty.json()["boxes"] == []
    put = rev.put(url, {"version": 0, "boxes": [_box(classes["can"])]}, format="json")
    assert put.status_code == 200, put.json()
    body = put.json()
    assert body["version"] == 1 and body["updated_by"] == "reviewer"
    assert body["boxes"] == [{"x": 10.0, "y": 20.0, "w": 30.0, "h": 40.0, "class_id": classes["can"].id,
                              "label": "can", "source": "human", "score": None}]  # fmt: skip
    # Stale: 409 with the current set, in the one error shape.
    stale = admin.put(url, {"version": 0, "boxes": []}, format="json")
    assert stale.status_code == 409
    err = stale.json()["error"]
    assert err["code"] == "stale_version" and err["details"]["current"]["version"] == 1
    assert err["details"]["current"]["boxes"][0]["label"] == "can"
    # Bad input: wrong types (the serializer), a box outside the image (the service, naming the box).
    wrong = admin.put(url, {"version": "one", "boxes": [{"x": "a"}]}, format="json")
    assert wrong.status_code == 400 and "error" in wrong.json()
    outside = admin.put(url, {"version": 1, "boxes": [_box(classes["can"], y=90)]}, format="json")
    assert outside.status_code == 400 and "box 0: box (10, 90, 30, 40) reaches outside" in outside.json()["error"][
        "message"]  # fmt: skip
    assert admin.put(url, {"version": 1}, format="json").status_code == 400
    history = rev.get(f"/api/v1/projects/{project.slug}/images/{image.id}/").json()["history"]
    assert history[0]["head"] == "container" and history[0]["boxes"] == [0, 1] and history[0]["user"] == "reviewer"
    # Undo (members): back to no boxes; then nothing is left to undo (409).
    undone = rev.post(url + "undo/")
    assert undone.status_code == 200 and undone.json()["boxes"] == [] and undone.json()["version"] == 2
    assert rev.post(url + "undo/").status_code == 409
    # Unknown ids and other projects' ids: 404; a class head: 400 pointing at labels.
    other = ProjectFactory(name="Other", preset="shelf")
    other_image = ImageFactory(project=other, size=100)
    assert admin.get(f"/api/v1/projects/{project.slug}/images/{other_image.id}/boxes/container/").status_code == 404
    assert admin.get(f"/api/v1/projects/{project.slug}/images/999999/boxes/container/").status_code == 404
    assert admin.get(f"/api/v1/projects/{project.slug}/images/{image.id}/boxes/nohead/").status_code == 404
    other_class = other.heads.get().classes.get(name="can")
    foreign = admin.put(url, {"version": 2, "boxes": [_box(other_class)]}, format="json")
    assert foreign.status_code == 400 and "is not a class of container" in foreign.json()["error"]["message"]
    services.head_create(project=project, name="brand")
    as_label = admin.put(f"/api/v1/projects/{project.slug}/images/{image.id}/labels/container/", {"version": 1},
                         format="json")  # fmt: skip
    assert as_label.status_code == 400 and "detection head" in as_label.json()["error"]["message"]
    assert admin.get(f"/api/v1/projects/{project.slug}/images/{image.id}/boxes/brand/").status_code == 400
    # A members-only project: an outsider gets 404.
    project.members_only = True
    project.save(update_fields=["members_only"])
    assert rev.get(url).status_code == 404


def test_box_import_over_rest_is_for_project_admins(admin, rev, reviewer, shelf, settings):
    project, _head, _classes, _image = shelf
    ProjectMember.objects.create(project=project, user=reviewer, role="reviewer")
    url = f"/api/v1/projects/{project.slug}/boxes/import/"
    body = {"folder": str(settings.IMPORT_ROOTS[0]), "format": "yolo"}
    assert rev.post(url, body, format="json").status_code == 403
    refused = admin.post(url, body, format="json")  # an empty folder: no class list, no images/
    assert refused.status_code == 400 and refused.json()["error"]["details"]["errors"]
    outside = admin.post(url, {"folder": "/etc", "format": "coco"}, format="json")
    assert outside.status_code == 400 and "outside the import folders" in outside.json()["error"]["message"]
    assert admin.post(url, {"folder": "x", "format": "voc"}, format="json").status_code == 400


def test_a_shelf_projects_pages_still_render(client, admin_user, shelf):
    project, head, classes, image = shelf
    boxes.box_set(image=image, head=head, boxes=[_box(classes["can"])], expected_version=0, user=admin_user)
    client.force_login(admin_user)
    assert client.get(f"/p/{project.slug}/").status_code == 200
    assert client.get(f"/p/{project.slug}/images/{image.id}/").status_code == 200
    health_page = client.get(f"/p/{project.slug}/health/")
    assert health_page.status_code == 200 and "boxes of image" in health_page.content.decode()  # the action log


def test_a_box_import_job_is_queued_over_rest(admin, rev, shelf, settings):
    project, _head, _classes, _image = shelf
    url = f"/api/v1/projects/{project.slug}/imports/"
    body = {"mode": "boxes", "folder": str(settings.IMPORT_ROOTS[0])}
    no_format = admin.post(url, body, format="json")
    assert no_format.status_code == 400 and "needs the format" in no_format.json()["error"]["message"]
    wrong_head = admin.post(url, {**body, "format": "coco", "head": "shelf"}, format="json")
    assert wrong_head.status_code == 400 and "Name one detection head" in wrong_head.json()["error"]["message"]
    assert rev.post(url, {**body, "format": "yolo"}, format="json").status_code == 403
    queued = admin.post(url, {**body, "format": "yolo"}, format="json")
    assert queued.status_code == 202 and queued.json()["params"]["head"] == "container"
