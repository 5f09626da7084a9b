"""The model page (one version's evaluation, config and files), its allow-listed file view and the API download."""

import json
from pathlib import Path

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from labeling.models import Project
from training import selectors

pytestmark = pytest.mark.django_db


@pytest.fixture
def version(shapes_project, trained_version):
    return trained_version(shapes_project(4))


def _file(version, name):
    return reverse("training:version-file", args=[version.project.slug, version.number, name])


def test_model_page_shows_evaluation_config_and_files(client, admin_user, version):
    client.force_login(admin_user)
    slug = version.project.slug
    listing = client.get(reverse("training:version-list", args=[slug])).text
    url = reverse("training:version-detail", args=[slug, version.number])
    assert f'href="{url}"' in listing  # the version number links to its page
    page = client.get(url).text
    for text in (
        "Head “class”",
        "Recall@1",
        "mAP",
        "Per class",
        "Most-confused pairs",
        "test_resnet",
        "Dataset version",
        "pretrained: none — random init",
        "confusion_class.png",
        "curves.png",
        "reliability_class.png",
        "model.onnx",
        "label_maps.json",
        "report.md",
        'class="table sortable',
    ):
        assert text in page, text
    # the pairs' photos are validation mistakes kept by the calibration: each links to an image of this project
    cal = json.loads((Path(version.artifact_dir) / "calibration.json").read_text())
    if version.metrics["heads"]["class"]["most_confused"]:
        assert "predicted as the other" in page
        first = cal["mistakes"]["class"][0][0]
        assert reverse("labeling:image-file", args=[slug, first, "thumb"]) in page
    # the reliability diagram is drawn on first request from the calibration's bins
    assert not (Path(version.artifact_dir) / "reliability_class.png").exists()
    png = client.get(_file(version, "reliability_class.png"))
    assert png.status_code == 200 and png["Content-Type"] == "image/png"
    assert b"".join(png.streaming_content).startswith(b"\x89PNG")
    assert (Path(version.artifact_dir) / "reliability_class.png").is_file()


def test_model_files_are_an_allow_list(client, admin_user, version):
    client.force_login(admin_user)
    art = Path(version.artifact_dir)
    onnx = client.get(_file(version, "model.onnx"))
    assert onnx.status_code == 200 and onnx["Content-Type"] == "application/octet-stream"
    assert onnx["Content-Disposition"].startswith("attachment;")
    assert b"".join(onnx.streaming_content) == (art / "model.onnx").read_bytes()
    maps = client.get(_file(version, "label_maps.json"))
    assert maps["Content-Type"] == "application/json" and "attachment" in maps["Content-Disposition"]
    assert client.get(_file(version, "report.md"))["Content-Type"].startswith("text/markdown")
    confusion = client.get(_file(version, "confusion_class.png"))
    assert confusion["Content-Type"] == "image/png" and "attachment" not in confusion.get("Content-Disposition", "")
    # files that exist in the folder but are not on the list, unknown heads, traversal: all 404
    for name in (
        "model.pt",
        "config.json",
        "calibration.json",
        "manifest.json",
        "confusion_nope.png",
        "..",
        "...",
        "%2e%2e%2fmodel.pt",
        "..%2Fmodel.pt",
        "model.onnx.tmp",
    ):
        assert client.get(_file(version, name)).status_code == 404, name
    base = reverse("training:version-detail", args=[version.project.slug, version.number])
    assert client.get(base + "files/../model.pt").status_code == 404
    assert client.get(base + "files/..%2F..%2Fmetrics.json").status_code == 404
    # an allowed name whose file is missing is a 404 too (not a 500)
    (art / "report.md").unlink()
    assert client.get(_file(version, "report.md")).status_code == 404
    assert client.get(reverse("training:version-detail", args=[version.project.slug, 99])).status_code == 404


def test_model_page_and_files_are_for_admins_only(client, reviewer, django_user_model, version):
    slug = version.project.slug
    urls = [reverse("training:version-detail", args=[slug, version.number]), _file(version, "model.onnx")]
    client.force_login(reviewer)
    for url in urls:
        assert client.get(url).status_code == 403
    # a members-only project is invisible (404) to a logged-in non-member
    Project.objects.filter(pk=version.project_id).update(members_only=True)
    outsider = django_user_model.objects.create_user("outsider", password="outsider-pass-123")
    client.force_login(outsider)
    for url in urls:
        assert client.get(url).status_code == 404
    client.logout()
    assert client.get(urls[0]).status_code == 302  # to the login page


def test_model_files_over_the_api(admin_user, reviewer, version):
    api = APIClient()
    url = f"/api/v1/projects/{version.project.slug}/models/{version.number}/files/"
    api.force_authenticate(reviewer)
    assert api.get(url + "model.onnx").status_code == 403
    api.force_authenticate(admin_user)
    art = Path(version.artifact_dir)
    for name in ("model.onnx", "label_maps.json", "report.md"):
        response = api.get(url + name, HTTP_ACCEPT="application/octet-stream")
        assert response.status_code == 200 and "attachment" in response["Content-Disposition"], name
        assert b"".join(response.streaming_content) == (art / name).read_bytes()
    missing = api.get(url + "model.pt")
    assert missing.status_code == 404 and "model.onnx" in missing.json()["error"]["message"]
    assert api.get(url + "..%2Fmodel.pt").status_code == 404
    assert api.get(f"/api/v1/projects/{version.project.slug}/models/9/files/model.onnx").status_code == 404
    schema = api.get("/api/schema/").content.decode()
    assert "/files/{name}" in schema


def test_runs_page_shows_the_recipe_it_will_run(client, admin_user, shapes_project):
    project = shapes_project(2)
    client.force_login(admin_user)
    page = client.get(reverse("training:run-list", args=[project.slug])).text
    assert "The recipe a Retrain with an empty form runs" in page
    config = selectors.run_config(project, {})
    for key in ("backbone", "image_size", "epochs", "lr", "freeze_backbone_epochs", "early_stopping", "augment"):
        assert f"{key} = <code>" in page, key
    assert str(config["backbone"]) in page and "pretrained weights:" in page
