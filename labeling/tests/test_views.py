import pytest
from django.urls import reverse

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
    assert "Choose the make first" in client.post(url, {"name": "Accord"}).json()["error"]
    assert client.post(url, {"name": "", "parent": honda.id}).status_code == 400
    body = client.post(url, {"name": "Accord", "parent": honda.id}).json()
    assert body["name"] == "Accord" and body["parent"] == honda.id and body["created"] is True
    assert client.post(url, {"name": "accord", "parent": honda.id}).json()["created"] is False  # same class
    toyota, _ = label_class_get_or_create(head=make, raw_name="Toyota")
    clash = client.post(url, {"name": "Accord", "parent": toyota.id})
    assert clash.status_code == 400 and "belongs to make 'Honda'" in clash.json()["error"]
    assert LabelClass.objects.filter(head=model).count() == 1
