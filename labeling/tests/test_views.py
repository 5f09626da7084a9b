import pytest
from django.urls import reverse

from conftest import make_photo
from labeling.models import Image, Label

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(shapes_project):
    return shapes_project(2)


def test_pages_require_login(client, project):
    for url in [reverse("labeling:project-list"), reverse("labeling:image-grid", args=[project.slug])]:
        response = client.get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_grid_filters_by_class_and_unlabeled(client, reviewer, project, django_assert_max_num_queries):
    client.force_login(reviewer)
    url = reverse("labeling:image-grid", args=[project.slug])
    with django_assert_max_num_queries(12):
        response = client.get(url)
    assert response.status_code == 200 and response.context["page"].paginator.count == 16
    red = project.heads.get().classes.get(name="red")
    response = client.get(url, {"class": red.id})
    assert response.context["page"].paginator.count == 4
    Label.objects.filter(image__original_name="R000_0.jpg").update(label_class=None)
    response = client.get(url, {"unlabeled": "1", "head": project.heads.get().id})
    assert [im.original_name for im in response.context["page"]] == ["R000_0.jpg"]
    # htmx asks for the fragment only
    response = client.get(url, {"class": red.id}, HTTP_HX_REQUEST="true")
    assert b"<html" not in response.content and b"R000_0.jpg" not in response.content


def test_label_edit_and_stale_edit_conflict(client, reviewer, admin_user, project):
    image = Image.objects.get(original_name="R000_1.jpg")
    head = project.heads.get()
    label = Label.objects.get(image=image, head=head)
    loaded_version = label.version
    blue = head.classes.get(name="blue")
    green = head.classes.get(name="green")
    url = reverse("labeling:label-update", args=[project.slug, image.id, head.id])
    client.force_login(reviewer)
    response = client.post(url, {"label_class": blue.id, "version": label.version}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and b"Saved." in response.content
    # The same stale version again (another tab): refused, current value shown, nothing overwritten.
    response = client.post(url, {"label_class": green.id, "version": label.version}, HTTP_HX_REQUEST="true")
    assert response.status_code == 409
    assert b"Someone else changed" in response.content and b"<strong>blue</strong>" in response.content
    label.refresh_from_db()
    assert label.label_class == blue and label.version == loaded_version + 1
    response = client.post(url, {"label_class": "abc", "version": str(label.version)}, HTTP_HX_REQUEST="true")
    assert response.status_code == 400


def test_image_files_served_to_logged_in_users_only(client, reviewer, project):
    image = Image.objects.first()
    url = reverse("labeling:image-file", args=[project.slug, image.id, "thumb"])
    assert client.get(url).status_code == 302
    client.force_login(reviewer)
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "image/jpeg"
    assert client.get(reverse("labeling:image-file", args=[project.slug, image.id, "other"])).status_code == 404


def test_import_page_admin_only_and_reports(client, reviewer, admin_user, project, photo_folder, tmp_path):
    url = reverse("labeling:import", args=[project.slug])
    client.force_login(reviewer)
    assert client.get(url).status_code == 403
    client.force_login(admin_user)
    response = client.post(url, {"mode": "folder", "folder": str(tmp_path / "nowhere-else")})
    assert b"outside the import folders" in response.content
    root = photo_folder(colors=("red",), groups=1, root=tmp_path / "import" / "more")
    (root / "red" / "Z9_1.jpg").write_bytes((root / "red" / "R000_0.jpg").read_bytes()[:300])
    response = client.post(url, {"mode": "folder", "folder": str(root)})
    assert response.status_code == 200 and b"Import done" in response.content
    assert b"imported as unreadable" in response.content
    assert b"Group by" in client.get(url).content


def test_import_page_groups_by_the_admins_choice(client, admin_user, project, photo_folder, tmp_path):
    client.force_login(admin_user)
    url = reverse("labeling:import", args=[project.slug])
    root = tmp_path / "import" / "ids"
    for color in ("red", "blue"):
        (root / color).mkdir(parents=True)
        for g in range(2):
            for i in range(2):
                photo = make_photo(color, "circle", seed=g * 10 + i)
                (root / color / f"{color[0].upper()}C{g}_{i}.jpg").write_bytes(photo)
    response = client.post(url, {"mode": "folder", "folder": str(root), "group_by": "image"})
    assert b"Import done" in response.content
    keys = set(
        Image.objects.filter(project=project, original_name__regex=r"^[RB]C").values_list("group_key", flat=True)
    )
    assert len(keys) == 8 and all(k.startswith("img:") for k in keys)


def test_class_create_is_for_admins_and_keeps_the_hierarchy(client, reviewer, admin_user):
    from labeling.models import LabelClass
    from labeling.services import label_class_get_or_create, project_create

    project = project_create(name="Cars", preset="car", slug="cars")
    make, model = project.heads.get(name="make"), project.heads.get(name="model")
    honda, _ = label_class_get_or_create(head=make, raw_name="Honda")
    url = reverse("labeling:class-create", args=[project.slug, model.id])
    client.force_login(reviewer)
    assert client.post(url, {"name": "Accord", "parent": honda.id}).status_code == 403
    client.force_login(admin_user)
    assert "Choose the make first" in client.post(url, {"name": "Accord", "confirm": "1"}).json()["error"]
    assert client.post(url, {"name": "", "parent": honda.id, "confirm": "1"}).status_code == 400
    body = client.post(url, {"name": "Accord", "parent": honda.id, "confirm": "1"}).json()
    assert body["name"] == "Accord" and body["parent"] == honda.id and body["created"] is True
    same = client.post(url, {"name": "accord", "parent": honda.id, "confirm": "1"}).json()
    assert same["created"] is False  # same class
    toyota, _ = label_class_get_or_create(head=make, raw_name="Toyota")
    clash = client.post(url, {"name": "Accord", "parent": toyota.id, "confirm": "1"})
    assert clash.status_code == 400 and "belongs to make 'Honda'" in clash.json()["error"]
    assert LabelClass.objects.filter(head=model).count() == 1


def test_bulk_relabel_has_no_default_target_and_asks_first(client, reviewer, project):
    """The grid's bulk relabel starts with no class chosen (clearing labels is an explicit "unlabeled" choice),
    and its button opens a confirm page naming the images and the class; only the confirmed post changes labels,
    as one undoable action, and that post replayed changes nothing (the label versions moved on)."""
    from labeling.models import DatasetAction

    head = project.heads.get()
    red = head.classes.get(name="red")
    client.force_login(reviewer)
    grid = reverse("labeling:image-grid", args=[project.slug])
    page = client.get(grid, {"head": head.id}).content.decode()
    assert 'required><option value="">— choose the new class —</option>' in page
    assert '<option value="none">unlabeled (clear the label)</option>' in page
    labels = list(Label.objects.filter(head=head).exclude(label_class=red).order_by("image_id")[:3])
    before = {lb.image_id: lb.label_class_id for lb in labels}
    form = {"head": head.id, "item": [f"{lb.image_id}:{lb.version}" for lb in labels], "next": grid}
    url = reverse("labeling:bulk-relabel", args=[project.slug])
    blank = client.post(url, {**form, "label_class": ""}, follow=True).content.decode()
    assert "Choose the new class" in blank
    ask = client.post(url, {**form, "label_class": red.id})
    text = ask.content.decode()
    assert ask.status_code == 200 and "Set class of 3 images to “red”?" in text and "Yes, relabel 3 images" in text
    assert "3 of the 3 selected labels change" in text and text.count('name="item"') == 3
    assert (
        dict(Label.objects.filter(image_id__in=before, head=head).values_list("image_id", "label_class_id")) == before
    )
    assert not DatasetAction.objects.exists()
    done = client.post(url, {**form, "label_class": red.id, "confirm": "1"}, follow=True).content.decode()
    assert "class: 3 image(s) -&gt; red" in done
    assert set(Label.objects.filter(image_id__in=before, head=head).values_list("label_class_id", flat=True)) == {
        red.id
    }
    replay = client.post(url, {**form, "label_class": red.id, "confirm": "1"}, follow=True).content.decode()
    assert "changed by someone else" in replay and DatasetAction.objects.count() == 1
    # clearing is a choice of its own, confirmed the same way
    fresh = Label.objects.filter(image_id__in=before, head=head).order_by("image_id")
    form["item"] = [f"{lb.image_id}:{lb.version}" for lb in fresh]
    assert "to unlabeled?" in client.post(url, {**form, "label_class": "none"}).content.decode()
    client.post(url, {**form, "label_class": "none", "confirm": "1"})
    assert set(Label.objects.filter(image_id__in=before, head=head).values_list("label_class_id", flat=True)) == {None}


def test_class_create_refuses_a_post_the_admin_did_not_confirm(client, admin_user):
    """The picker asks before it creates a class; the endpoint refuses a post without that confirmation (a typo
    sent by a bare Enter, or a replayed request), and creates nothing."""
    from labeling.models import LabelClass
    from labeling.services import project_create

    project = project_create(name="Bricks", preset="retrieval", slug="bricks")
    head = project.heads.get()
    url = reverse("labeling:class-create", args=[project.slug, head.id])
    client.force_login(admin_user)
    bare = client.post(url, {"name": "arch1x4"})
    assert bare.status_code == 400 and "Confirm creating the new class 'arch1x4'" in bare.json()["error"]
    assert not LabelClass.objects.filter(head=head).exists()
    assert client.post(url, {"name": "arch1x4", "confirm": "1"}).json()["created"] is True
