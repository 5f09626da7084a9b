"""Health and dataset-version pages and API: admin only, live progress fragment, actions and undo from the
page, diff and export."""

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from labeling import health, selectors
from labeling.models import DatasetAction, HealthReport, Image, LabelClass

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(shapes_project):
    return shapes_project(4)


def _scan(project):
    report = health.health_report_create(project=project, queue=False)
    return health.health_report_execute(report_id=report.id, workers=1)


def test_reviewers_get_403_on_health_and_versions(client, reviewer, project):
    client.force_login(reviewer)
    for name in ("labeling:health", "labeling:version-list"):
        assert client.get(reverse(name, args=[project.slug])).status_code == 403
    assert client.post(reverse("labeling:health-scan", args=[project.slug])).status_code == 403
    assert client.post(reverse("labeling:version-create", args=[project.slug])).status_code == 403
    api = APIClient()
    api.force_authenticate(reviewer)
    assert api.get(f"/api/v1/projects/{project.slug}/dataset-versions/").status_code == 403
    assert not HealthReport.objects.exists()


def test_scan_button_queues_and_fragment_polls_then_refreshes(
    client, admin_user, project, django_capture_on_commit_callbacks
):
    client.force_login(admin_user)
    page = client.get(reverse("labeling:health", args=[project.slug]))
    assert b'id="run-scan"' in page.content and b"No health scan yet" in page.content
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(reverse("labeling:health-scan", args=[project.slug]), {"max_distance": "6"}, follow=True)
    assert b"queued" in response.content and len(callbacks) == 1
    report = HealthReport.objects.get()
    assert report.params["max_distance"] == 6
    fragment = client.get(reverse("labeling:health", args=[project.slug]), HTTP_HX_REQUEST="true")
    assert b'hx-trigger="every 1s"' in fragment.content and b"<html" not in fragment.content
    response = client.post(reverse("labeling:health-scan", args=[project.slug]), follow=True)
    assert b"already queued or running" in response.content
    health.health_report_execute(report_id=report.id, workers=1)
    fragment = client.get(reverse("labeling:health", args=[project.slug]), HTTP_HX_REQUEST="true")
    assert fragment["HX-Refresh"] == "true"
    response = client.post(reverse("labeling:health-scan", args=[project.slug]), {"min_side": "big"}, follow=True)
    assert b"must be a whole number" in response.content


def test_report_page_actions_and_undo(client, admin_user, project):
    _scan(project)
    client.force_login(admin_user)
    page = client.get(reverse("labeling:health", args=[project.slug]))
    assert page.status_code == 200
    for section in (b'id="summary"', b'id="files"', b'id="clusters"', b'id="classes"', b'class="chart"'):
        assert section in page.content
    red = LabelClass.objects.get(name="red")
    blue = LabelClass.objects.get(name="blue")
    response = client.post(
        reverse("labeling:classes-merge", args=[project.slug]), {"source": red.id, "target": blue.id}, follow=True
    )
    assert b"merged class" in response.content
    action = DatasetAction.objects.get()
    response = client.post(reverse("labeling:action-undo", args=[project.slug, action.id]), follow=True)
    assert b"Undone" in response.content
    red.refresh_from_db()
    assert red.merged_into is None
    response = client.post(
        reverse("labeling:classes-exclude", args=[project.slug]), {"class_id": [red.id]}, follow=True
    )
    assert b"excluded 1 class" in response.content
    response = client.post(
        reverse("labeling:training-options", args=[project.slug]),
        {"class_weighting": "sqrt_inverse", "per_class_cap": "5", "resize": "fit"},
        follow=True,
    )
    assert b"Training options saved" in response.content and b"framing: whole photo, padded" in response.content
    assert b'<option value="fit" selected>' in response.content  # the form shows the saved framing
    project.refresh_from_db()
    assert project.training_options["resize"] == "fit"
    from training.selectors import run_config

    assert run_config(project, {})["resize"] == "fit"  # the project's runs train and serve that way
    response = client.post(reverse("labeling:training-options", args=[project.slug]), {"resize": "squash"}, follow=True)
    assert b"Photo framing must be one of crop, fit" in response.content
    project.refresh_from_db()
    assert project.training_options["resize"] == "fit"  # nothing written
    response = client.post(
        reverse("labeling:training-options", args=[project.slug]), {"per_class_cap": "lots"}, follow=True
    )
    assert b"must be a whole number" in response.content


def test_suggested_merge_button_merges_the_pair_it_names(client, admin_user, project):
    """The health report's "merge arch1x4 into arch_1x4" form (a near-identical pair) posts the pair and the
    chosen direction, not a target: the merge happens as named, as one undoable action."""
    import re

    from labeling.models import Label

    head = project.heads.get()
    good = LabelClass.objects.create(head=head, name="arch_1x4", normalized_name="arch_1x4")
    typo = LabelClass.objects.create(head=head, name="arch1x4", normalized_name="arch1x4")
    labels = list(Label.objects.filter(head=head).order_by("image_id"))
    Label.objects.filter(pk__in=[lb.pk for lb in labels[:3]]).update(label_class=good)
    Label.objects.filter(pk=labels[3].pk).update(label_class=typo)
    _scan(project)
    client.force_login(admin_user)
    page = client.get(reverse("labeling:health", args=[project.slug])).content.decode()
    form = next(f for f in re.findall(r"<form[^>]*merge-form.*?</form>", page, re.S) if "arch1x4" in f)
    source = re.search(r'<option value="(\d+)">merge arch1x4 into arch_1x4</option>', form).group(1)
    pair = re.search(r'name="pair" value="([\d,]+)"', form).group(1)
    response = client.post(
        reverse("labeling:classes-merge", args=[project.slug]), {"source": source, "pair": pair}, follow=True
    )
    text = response.content.decode()
    assert "Choose two classes" not in text and "merged class &#x27;arch1x4&#x27; into &#x27;arch_1x4&#x27;" in text
    typo.refresh_from_db()
    assert typo.merged_into == good and Label.objects.get(pk=labels[3].pk).label_class == good
    assert DatasetAction.objects.get().kind == "merge_classes"
    # a pair that is not this project's pair, or a source outside the pair, changes nothing
    red = LabelClass.objects.get(name="red")
    bad = client.post(
        reverse("labeling:classes-merge", args=[project.slug]), {"source": red.id, "pair": pair}, follow=True
    )
    assert "Choose two classes" in bad.content.decode() and DatasetAction.objects.count() == 1


def test_cluster_resolution_from_the_page(client, admin_user, project):
    # Detection is tested in test_health; here a cluster row drives the page flow.
    a, b = Image.objects.filter(project=project).order_by("id")[:2]
    report = _scan(project)
    cluster = report.clusters.create(kind="near", image_ids=[a.id, b.id], conflicting=True, max_distance=3)
    client.force_login(admin_user)
    page = client.get(reverse("labeling:health", args=[project.slug]))
    assert f'id="cluster-{cluster.id}"'.encode() in page.content
    response = client.post(
        reverse("labeling:cluster-resolve", args=[project.slug, cluster.id]),
        {"mode": "keep_one", "keep": str(cluster.image_ids[0])},
        follow=True,
    )
    assert b"excluded" in response.content
    assert Image.objects.filter(pk__in=cluster.image_ids[1:], status="excluded").count() == len(cluster.image_ids) - 1
    detail = client.get(reverse("labeling:image-detail", args=[project.slug, cluster.image_ids[1]]))
    assert b"status: ok \xe2\x86\x92 excluded" in detail.content and b"duplicate of image" in detail.content


def test_versions_pages_diff_export_and_api(client, admin_user, project):
    client.force_login(admin_user)
    response = client.post(reverse("labeling:version-create", args=[project.slug]), {"note": "first"}, follow=True)
    assert b"Dataset version 1 frozen" in response.content
    response = client.post(reverse("labeling:version-create", args=[project.slug]), follow=True)
    assert b"Nothing changed" in response.content
    Image.objects.filter(project=project).order_by("id").first().labels.update(label_class=None)
    client.post(reverse("labeling:version-create", args=[project.slug]))
    page = client.get(reverse("labeling:version-list", args=[project.slug]))
    assert b"v2" in page.content and b"diff with v1" in page.content
    diff = client.get(reverse("labeling:version-diff", args=[project.slug, 1, 2]))
    assert b"1 removed" in diff.content
    as_json = client.get(reverse("labeling:version-diff", args=[project.slug, 1, 2]) + "?format=json").json()
    assert as_json["summary"]["removed"] == 1
    response = client.post(reverse("labeling:version-export", args=[project.slug, 2]), follow=True)
    assert b"Exported to" in response.content
    download = client.get(reverse("labeling:version-download", args=[project.slug, 2]))
    assert download.status_code == 200 and download["Content-Disposition"].endswith('.zip"')
    assert client.get(reverse("labeling:version-download", args=[project.slug, 1])).status_code == 404

    api = APIClient()
    api.force_authenticate(admin_user)
    listing = api.get(f"/api/v1/projects/{project.slug}/dataset-versions/").json()["results"]
    assert [v["number"] for v in listing] == [2, 1] and listing[0]["parent"] == 1
    assert api.post(f"/api/v1/projects/{project.slug}/dataset-versions/", {"note": "x"}).status_code == 200
    api_diff = api.get(f"/api/v1/projects/{project.slug}/dataset-versions/1/diff/2/").json()
    assert api_diff["summary"]["removed"] == 1
    gone = api.get(f"/api/v1/projects/{project.slug}/dataset-versions/99/")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"  # found by schemathesis: was a 500
    missing = api.get(f"/api/v1/projects/{project.slug}/health/")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_report"
    bad = api.post(f"/api/v1/projects/{project.slug}/health/", {"max_distance": 999}, format="json")
    assert bad.status_code == 400 and "max_distance" in bad.json()["error"]["message"]
    assert selectors.dataset_version_list(project).count() == 2


def test_a_dataset_version_downloads_as_the_seeds_zip_over_rest(admin_user, reviewer, project):
    import io
    import json
    import zipfile

    from labeling import versions

    version, _ = versions.dataset_version_create(project=project, user=admin_user)
    api = APIClient()
    api.force_authenticate(admin_user)
    url = f"/api/v1/projects/{project.slug}/dataset-versions/{version.number}/export/"
    response = api.get(url, HTTP_ACCEPT="application/json")  # a file whatever the Accept header says
    assert response.status_code == 200 and response["Content-Disposition"].endswith('-v1.zip"')
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    names = set(archive.namelist())
    assert {"splits.json", "label_maps.json", "metadata.csv"} <= names
    splits = json.loads(archive.read("splits.json"))
    n = sum(len(v) for v in splits.values())
    assert n == version.counts["splits"]["train"] + version.counts["splits"].get("val", 0) + version.counts[
        "splits"
    ].get("test", 0)
    again = api.get(url)
    assert again.status_code == 200  # the same file, not rewritten
    assert api.get(f"/api/v1/projects/{project.slug}/dataset-versions/9/export/").status_code == 404
    api.force_authenticate(reviewer)
    assert api.get(url).status_code == 403
