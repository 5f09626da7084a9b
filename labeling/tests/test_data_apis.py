"""The labeling side of the loop over REST (issue 17.1): projects, settings, classes, images, labels — happy paths,
bad input, other projects' ids, stale versions, reviewers on admin endpoints, pagination."""

import pytest

from labeling.models import DatasetAction, Image, ImageEvent, Label, LabelEvent, Project, ProjectMember

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin(admin_user, token_client):
    return token_client(admin_user)


@pytest.fixture
def rev(reviewer, token_client):
    return token_client(reviewer)


def test_projects_are_created_read_and_configured_over_rest(admin, rev):
    body = {
        "name": "Guitars",
        "preset": "sku",
        "heads": [{"name": "brand"}, {"name": "model", "parent": "brand"}, {"name": "finish", "optional": True}],
        "classes": [{"head": "brand", "name": "Fender"}, {"head": "model", "name": "Telecaster", "parent": "Fender"}],
    }
    created = admin.post("/api/v1/projects/", body, format="json")
    assert created.status_code == 201, created.json()
    data = created.json()
    assert data["slug"] == "guitars" and [h["name"] for h in data["heads"]] == ["brand", "model", "finish"]
    assert data["heads"][1]["parent"] == "brand" and data["heads"][0]["classes"] == 1 and data["min_image_side"] == 224
    # Bad input: every problem named, nothing created; reviewers may not create projects.
    bad = admin.post(
        "/api/v1/projects/", {**body, "slug": "g2", "heads": [{"name": "x", "parent": "y"}]}, format="json"
    )
    assert bad.status_code == 400 and "parent 'y'" in bad.json()["error"]["message"]
    assert admin.post("/api/v1/projects/", {"name": "x", "preset": "nope"}, format="json").status_code == 400
    assert rev.post("/api/v1/projects/", body, format="json").status_code == 403
    assert not Project.objects.filter(slug="g2").exists()
    # Reviewers read; only project admins change settings.
    assert rev.get("/api/v1/projects/guitars/").json()["name"] == "Guitars"
    assert rev.patch("/api/v1/projects/guitars/", {"min_image_side": 64}, format="json").status_code == 403
    patched = admin.patch(
        "/api/v1/projects/guitars/", {"min_image_side": 64, "heads": {"model": {"threshold": 0.8}}}, format="json"
    )
    assert patched.status_code == 200 and patched.json()["min_image_side"] == 64
    assert patched.json()["heads"][1]["threshold"] == 0.8
    assert DatasetAction.objects.filter(project__slug="guitars", kind="project_settings").count() == 1
    wrong = admin.patch("/api/v1/projects/guitars/", {"min_image_side": "big", "slug": "x"}, format="json")
    assert wrong.status_code == 400 and "unknown setting 'slug'" in wrong.json()["error"]["message"]
    # A members-only project is a 404 to an outsider, and missing from their list.
    Project.objects.filter(slug="guitars").update(members_only=True)
    assert rev.get("/api/v1/projects/guitars/").status_code == 404
    assert "guitars" not in [p["slug"] for p in rev.get("/api/v1/projects/").json()["results"]]
    assert "guitars" in [p["slug"] for p in admin.get("/api/v1/projects/").json()["results"]]


def test_classes_over_rest(admin, rev, car_project):
    project = car_project(groups=1, per_group=1)
    listed = rev.get(f"/api/v1/projects/{project.slug}/heads/model/classes/").json()["results"]
    assert {c["name"]: c["parent"] for c in listed} == {"Corolla": "Toyota", "Yaris": "Toyota", "Civic": "Honda"}
    assert all(c["images"] == 1 for c in listed)
    assert rev.post(f"/api/v1/projects/{project.slug}/heads/make/classes/", {"name": "Kia"}).status_code == 403
    made = admin.post(f"/api/v1/projects/{project.slug}/heads/make/classes/", {"name": "Kia"}, format="json")
    assert made.status_code == 201 and made.json()["name"] == "Kia"
    again = admin.post(f"/api/v1/projects/{project.slug}/heads/make/classes/", {"name": " kia "}, format="json")
    assert again.status_code == 200 and again.json()["id"] == made.json()["id"]  # the same class, not a second
    no_parent = admin.post(f"/api/v1/projects/{project.slug}/heads/model/classes/", {"name": "Rio"}, format="json")
    assert no_parent.status_code == 400 and "make it belongs to" in no_parent.json()["error"]["message"]
    ok = admin.post(
        f"/api/v1/projects/{project.slug}/heads/model/classes/", {"name": "Rio", "parent": "Kia"}, format="json"
    )
    assert ok.status_code == 201 and ok.json()["parent"] == "Kia"
    assert admin.get(f"/api/v1/projects/{project.slug}/heads/trim/classes/").status_code == 404


def test_images_list_with_filters_and_cursor_pages(rev, car_project):
    project = car_project(groups=3, per_group=2)  # 18 photos
    url = f"/api/v1/projects/{project.slug}/images/"
    page = rev.get(url, {"page_size": 5}).json()
    assert len(page["results"]) == 5 and page["next"] and page["previous"] is None
    seen = [im["id"] for im in page["results"]]
    while page["next"]:
        page = rev.get(page["next"]).json()
        seen += [im["id"] for im in page["results"]]
    assert seen == sorted(Image.objects.filter(project=project).values_list("id", flat=True))
    first = rev.get(url).json()["results"][0]
    assert {lb["head"] for lb in first["labels"]} == {"make", "model"} and first["thumbnail_url"].endswith("/thumb")
    corolla = project.heads.get(name="model").classes.get(name="Corolla")
    assert len(rev.get(url, {"class_id": corolla.id}).json()["results"]) == 6
    Label.objects.filter(image_id=seen[0], head__name="model").update(label_class=None)
    unl = rev.get(url, {"unlabeled": "true", "head": "model"}).json()["results"]
    assert [im["id"] for im in unl] == [seen[0]]
    assert rev.get(url, {"unlabeled": "true", "head": "make"}).json()["results"] == []
    assert rev.get(url, {"status": "bogus"}).status_code == 400
    assert rev.get("/api/v1/projects/no-such/images/").status_code == 404


def test_labels_are_set_with_the_version_seen_and_stale_edits_get_409(admin, rev, reviewer, car_project):
    project = car_project(groups=1, per_group=1)
    image = Image.objects.filter(project=project).order_by("id").first()
    url = f"/api/v1/projects/{project.slug}/images/{image.id}/"
    detail = rev.get(url).json()
    model = next(lb for lb in detail["labels"] if lb["head"] == "model")
    yaris = project.heads.get(name="model").classes.get(name="Yaris")
    out = rev.put(f"{url}labels/model/", {"class_id": yaris.id, "version": model["version"]}, format="json")
    assert out.status_code == 200 and out.json()["label"] == "Yaris" and out.json()["updated_by"] == "reviewer"
    stale = admin.put(f"{url}labels/model/", {"label": "Corolla", "version": model["version"]}, format="json")
    assert stale.status_code == 409
    assert stale.json()["error"]["details"]["current"]["label"] == "Yaris"  # the current value, nothing overwritten
    by_name = admin.put(f"{url}labels/model/", {"label": "Corolla", "version": model["version"] + 1}, format="json")
    assert by_name.status_code == 200 and by_name.json()["label"] == "Corolla"
    assert LabelEvent.objects.filter(image=image, head__name="model").count() == 2
    history = rev.get(url).json()["history"]
    assert [h["new"] for h in history if "new" in h][:2] == ["Corolla", "Yaris"]
    # Bad input: a class of another head, an unknown name, wrong types, another project's image.
    civic_make = project.heads.get(name="make").classes.get(name="Honda")
    v = model["version"] + 2
    assert admin.put(f"{url}labels/model/", {"class_id": civic_make.id, "version": v}, format="json").status_code == 400
    assert admin.put(f"{url}labels/model/", {"label": "Zonda", "version": v}, format="json").status_code == 400
    assert admin.put(f"{url}labels/model/", {"class_id": "x", "version": "y"}, format="json").status_code == 400
    assert admin.put(f"{url}labels/trim/", {"class_id": None, "version": v}, format="json").status_code == 404
    other = Project.objects.create(name="Other", slug="other", preset="sku")
    assert admin.get(f"/api/v1/projects/{other.slug}/images/{image.id}/").status_code == 404
    # Exclude and bring back, with the photo's history.
    gone = rev.patch(url, {"excluded": True, "reason": "blurred"}, format="json")
    assert gone.status_code == 200 and gone.json()["status"] == "excluded"
    back = rev.patch(url, {"excluded": False}, format="json").json()
    assert back["status"] == "ok" and ImageEvent.objects.filter(image=image).count() == 2
    assert rev.patch(url, {"excluded": "maybe"}, format="json").status_code == 400


def test_a_members_only_project_is_invisible_to_non_members(rev, reviewer, car_project):
    project = car_project(groups=1, per_group=1)
    Project.objects.filter(pk=project.pk).update(members_only=True)
    image = Image.objects.filter(project=project).first()
    assert rev.get(f"/api/v1/projects/{project.slug}/images/").status_code == 404
    assert rev.get(f"/api/v1/projects/{project.slug}/images/{image.id}/").status_code == 404
    ProjectMember.objects.create(project=project, user=reviewer, role="reviewer")
    assert rev.get(f"/api/v1/projects/{project.slug}/images/").status_code == 200


def test_photos_are_uploaded_with_the_recognition_checks_and_nothing_half_written(admin, rev, car_project, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from conftest import make_photo

    project = car_project(groups=0)
    url = f"/api/v1/projects/{project.slug}/images/upload/"

    def photo(name, color="red", fmt="JPEG"):
        return SimpleUploadedFile(name, make_photo(color, fmt=fmt, size=64), content_type="image/jpeg")

    ok = admin.post(
        url,
        {
            "images": [photo("Corolla9_0.jpg"), photo("Corolla9_1.jpg", "blue")],
            "label.make": "Toyota",
            "label.model": "Corolla",
        },
        format="multipart",
    )
    assert ok.status_code == 201, ok.json()
    created = ok.json()["created"]
    assert len(created) == 2 and ok.json()["existing"] == []
    image = Image.objects.get(pk=created[0])
    assert image.group_key == "Corolla9" and image.original_name == "Corolla9_0.jpg"
    assert {lb.head.name: lb.label_class.name for lb in image.labels.select_related("head", "label_class")} == {
        "make": "Toyota",
        "model": "Corolla",
    }
    again = admin.post(url, {"images": [photo("Corolla9_0.jpg")]}, format="multipart").json()
    assert again["created"] == [] and again["existing"] == [created[0]]  # the same bytes are the same photo
    # One bad file refuses the whole request: nothing is written.
    n = Image.objects.count()
    text = SimpleUploadedFile("notes.jpg", b"not an image at all", content_type="image/jpeg")
    bad = admin.post(url, {"images": [photo("Yaris1_0.jpg", "green"), text]}, format="multipart")
    assert bad.status_code == 400 and "notes.jpg: not a JPEG, PNG, WEBP image" in bad.json()["error"]["message"]
    settings.LOUPE_MAX_IMAGE_PIXELS = 1000
    big = admin.post(url, {"images": [photo("Yaris1_1.jpg", "green")]}, format="multipart")
    assert big.status_code == 400 and "more than 1,000 pixels" in big.json()["error"]["message"]
    assert Image.objects.count() == n
    assert admin.post(url, {"images": [photo("a.jpg")], "label.trim": "GT"}, format="multipart").status_code == 400
    assert admin.post(url, {}, format="multipart").status_code == 400
    assert rev.post(url, {"images": [photo("b.jpg")]}, format="multipart").status_code == 403


def test_bulk_labels_preview_then_apply_as_one_undoable_action(admin, rev, car_project):
    project = car_project(groups=2, per_group=1)
    url = f"/api/v1/projects/{project.slug}/labels/bulk/"
    labels = list(Label.objects.filter(image__project=project, head__name="model").order_by("image_id"))
    images = [{"id": lb.image_id, "version": lb.version} for lb in labels]
    Label.objects.filter(pk=labels[0].pk).update(version=labels[0].version + 1)  # someone edited it meanwhile
    yaris_before = sum(1 for lb in labels if lb.label_class.name == "Yaris")
    preview = rev.post(url, {"head": "model", "label": "Yaris", "images": images, "preview": True}, format="json")
    assert preview.status_code == 200, preview.json()
    body = preview.json()
    assert body["stale"] == [labels[0].image_id] and body["unchanged"] == yaris_before
    assert body["would_change"] == len(labels) - 1 - yaris_before
    assert (
        not Label.objects.filter(pk=labels[1].pk, label_class__name="Yaris").exists()
        or labels[1].label_class.name == "Yaris"
    )
    done = rev.post(url, {"head": "model", "label": "Yaris", "images": images}, format="json").json()
    assert done["changed"] == body["would_change"] and done["stale"] == body["stale"] and done["action"]
    assert DatasetAction.objects.get(pk=done["action"]).kind == "bulk_relabel"
    # Bad input: another head's class, an unknown name, no class, another project's image.
    honda = project.heads.get(name="make").classes.get(name="Honda")
    assert rev.post(url, {"head": "model", "class_id": honda.id, "images": images}, format="json").status_code == 400
    assert rev.post(url, {"head": "model", "label": "Zonda", "images": images}, format="json").status_code == 400
    assert rev.post(url, {"head": "model", "images": images}, format="json").status_code == 400
    assert rev.post(url, {"head": "model", "label": "Yaris", "images": []}, format="json").status_code == 400
    far = rev.post(url, {"head": "model", "label": "Yaris", "images": [{"id": 10**9, "version": 1}]}, format="json")
    assert far.status_code == 404


def test_classes_are_renamed_aliased_and_merged_over_rest(admin, rev, car_project):
    project = car_project(groups=1, per_group=1)
    make = project.heads.get(name="make")
    toyota, honda = make.classes.get(name="Toyota"), make.classes.get(name="Honda")
    url = f"/api/v1/projects/{project.slug}/heads/make/classes/"
    assert rev.patch(f"{url}{toyota.id}/", {"name": "TOYOTA"}, format="json").status_code == 403
    renamed = admin.patch(f"{url}{toyota.id}/", {"name": "Toyota Motor", "add_aliases": ["TMC"]}, format="json")
    assert renamed.status_code == 200, renamed.json()
    assert renamed.json()["name"] == "Toyota Motor" and set(renamed.json()["aliases"]) >= {"Toyota", "TMC"}
    clash = admin.patch(f"{url}{toyota.id}/", {"name": "honda"}, format="json")
    assert clash.status_code == 400 and "merge the two instead" in clash.json()["error"]["message"]
    taken = admin.patch(f"{url}{honda.id}/", {"add_aliases": ["TMC"]}, format="json")
    assert taken.status_code == 400 and "already means 'Toyota Motor'" in taken.json()["error"]["message"]
    merged = admin.patch(f"{url}{honda.id}/", {"merge_into": toyota.id}, format="json")
    assert merged.status_code == 200 and "Honda" in merged.json()["aliases"]
    assert not Label.objects.filter(label_class=honda).exists()
    assert DatasetAction.objects.filter(project=project, kind="merge_classes").count() == 1
    assert admin.patch(f"{url}{honda.id}/", {"name": "x"}, format="json").status_code == 400  # merged away
    assert admin.patch(f"{url}999999/", {"name": "x"}, format="json").status_code == 404
    model = project.heads.get(name="model").classes.first()
    assert admin.patch(f"{url}{model.id}/", {"name": "x"}, format="json").status_code == 404  # another head's
