import pytest
from django.urls import reverse

from inference import evaluation
from pipeline import chain
from training.models import ModelVersion, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(shapes_project):
    return shapes_project(4)


def test_reviewers_cannot_retrain_or_promote(client, reviewer, project):
    client.force_login(reviewer)
    assert client.get(reverse("training:run-list", args=[project.slug])).status_code == 403
    assert client.post(reverse("training:run-create", args=[project.slug])).status_code == 403
    assert client.get(reverse("training:version-list", args=[project.slug])).status_code == 403
    assert not TrainingRun.objects.exists()


def test_retrain_button_queues_a_run_and_page_polls(client, admin_user, project, django_capture_on_commit_callbacks):
    client.force_login(admin_user)
    page = client.get(reverse("training:run-list", args=[project.slug]))
    assert b'id="retrain"' in page.content
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(reverse("training:run-create", args=[project.slug]), {"epochs": "3"}, follow=True)
    assert b"queued" in response.content and len(callbacks) == 1  # the Celery task is sent after commit
    run = TrainingRun.objects.get()
    assert run.config == {"epochs": 3} and run.status == "queued"
    fragment = client.get(reverse("training:run-list", args=[project.slug]), HTTP_HX_REQUEST="true")
    assert b'hx-trigger="every 2s"' in fragment.content and b"<html" not in fragment.content
    response = client.post(reverse("training:run-create", args=[project.slug]), {"epochs": "many"}, follow=True)
    assert b"epochs must be an integer" in response.content
    TrainingRun.objects.all().delete()
    more = 'head_type = arcface\nscheduler = cosine_restarts\nearly_stopping = {"metric": "val_loss"}'
    with django_capture_on_commit_callbacks(execute=False):
        client.post(reverse("training:run-create", args=[project.slug]), {"more": more})
    assert TrainingRun.objects.get().config == {
        "head_type": "arcface",
        "scheduler": "cosine_restarts",
        "early_stopping": {"metric": "val_loss"},
    }
    TrainingRun.objects.all().delete()
    response = client.post(reverse("training:run-create", args=[project.slug]), {"more": "head_type: x"}, follow=True)
    assert b"expected key = value" in response.content
    response = client.post(reverse("training:run-create", args=[project.slug]), {"more": "warp = 9"}, follow=True)
    assert b"unknown config key" in response.content and not TrainingRun.objects.exists()


def test_models_page_shows_metrics_and_promote_switches(client, admin_user, project, trained_version):
    v1 = trained_version(project)
    v2 = trained_version(project)
    v2.refresh_from_db()
    assert v1.is_active is True and not v2.is_active
    client.force_login(admin_user)
    page = client.get(reverse("training:version-list", args=[project.slug]))
    assert b"v2" in page.content and b"Promote" in page.content and b"class" in page.content
    # v2 has no index yet: promote builds it (inline here via the service), then v1 is a one-click rollback.
    chain.model_version_promote(version=v2, user=admin_user, inline=True)
    assert ModelVersion.objects.get(is_active=True) == v2
    response = client.post(reverse("training:version-promote", args=[project.slug, v1.number]), follow=True)
    assert b"Model v1 is now active" in response.content
    assert ModelVersion.objects.get(is_active=True) == v1
    # Compare page: both versions on v2's test split, the same numbers as the API
    url = reverse("training:version-compare", args=[project.slug])
    assert "on the same test split" in client.get(reverse("training:version-list", args=[project.slug])).text
    page = client.get(url, {"a": 1, "b": 2}).content.decode()
    result = evaluation.model_versions_compare(a=v1, b=v2)
    assert result["test_split_of"] == 2 and f"{result['n_test']} images" in page
    row = result["versions"]["2"]["class"]
    assert f"{row['top1']:.3f} / {row['top5']:.3f}" in page
    assert "Pick two different versions" in client.get(url, {"a": 1, "b": 1}, follow=True).content.decode()
    assert "No version 9" in client.get(url, {"a": 1, "b": 9}, follow=True).content.decode()


def test_models_page_shows_calibration_and_applies_the_suggested_thresholds(
    client, admin_user, project, trained_version
):
    from labeling.models import Head

    v1 = trained_version(project)
    v1.refresh_from_db()
    suggested = v1.suggested_thresholds
    assert set(suggested) == {"class"} and 0.0 <= suggested["class"] <= 1.0
    assert v1.index_meta["kind"] == "flat" and v1.index_meta["size"] == v1.index_size
    client.force_login(admin_user)
    page = client.get(reverse("training:version-list", args=[project.slug])).content.decode()
    assert "Calibration" in page and f"suggested {suggested['class']:.2f}" in page and "(now 0.60)" in page
    assert "Use suggested thresholds" in page and "flat" in page
    url = reverse("training:version-thresholds-apply", args=[project.slug, v1.number])
    response = client.post(url, {"confirm": client.get(url).context["token"]}, follow=True)
    head = Head.objects.get(project=project, name="class")
    assert head.threshold == pytest.approx(round(suggested["class"], 4))
    if head.threshold != 0.6:
        assert "Thresholds set from v1" in response.content.decode()
    again = client.post(url, {"confirm": client.get(url).context["token"]}, follow=True).content.decode()
    assert "already are v1" in again
    # an uncalibrated version is refused with a clear message, nothing changes
    v1.metrics = {**v1.metrics, "calibration": {}}
    v1.save(update_fields=["metrics"])
    assert "has no calibrated thresholds" in client.post(url, follow=True).content.decode()
    assert Head.objects.get(pk=head.pk).threshold == head.threshold


def test_model_registry_api_list_compare_promote(project, admin_user, reviewer, trained_version):
    from rest_framework.test import APIClient

    trained_version(project)
    trained_version(project, epochs=1)
    api = APIClient()
    api.force_authenticate(reviewer)
    assert api.get(f"/api/v1/projects/{project.slug}/models/").status_code == 403
    api.force_authenticate(admin_user)
    listing = api.get(f"/api/v1/projects/{project.slug}/models/").json()["results"]
    assert [v["number"] for v in listing] == [2, 1] and listing[1]["is_active"] and not listing[0]["is_active"]
    assert listing[0]["dataset_version"] == 1 and "class" in listing[0]["heads"] and listing[0]["test"]["heads"]
    cmp = api.get(f"/api/v1/projects/{project.slug}/models/compare/?a=1&b=2").json()
    assert cmp["test_split_of"] == 2 and set(cmp["versions"]) == {"1", "2"}
    assert cmp["versions"]["1"]["class"]["n"] == cmp["versions"]["2"]["class"]["n"] == cmp["n_test"]
    bad = api.get(f"/api/v1/projects/{project.slug}/models/compare/?a=1")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    promoted = api.post(f"/api/v1/projects/{project.slug}/models/2/promote/")
    assert promoted.status_code == 202  # its index builds on the worker first
    ModelVersion.objects.filter(number=2).update(index_status="ready")
    assert api.post(f"/api/v1/projects/{project.slug}/models/2/promote/").json()["is_active"] is True
    assert api.post(f"/api/v1/projects/{project.slug}/models/1/promote/").status_code == 200  # rollback
    assert ModelVersion.objects.get(is_active=True).number == 1


def test_suggested_thresholds_ask_first_refuse_a_bare_post_and_undo_from_the_action_log(
    client, admin_user, project, trained_version
):
    """ "Use suggested thresholds" shows head: now -> new and changes nothing until confirmed; a post without the
    page's token (or a replayed one, after the thresholds moved) is refused; the change is one DatasetAction the
    Health page's Undo reverts, and undo leaves a threshold someone changed since as it is."""
    from labeling.health import action_undo
    from labeling.models import DatasetAction, Head

    v1 = trained_version(project)
    suggested = round(v1.suggested_thresholds["class"], 4)
    start = 0.01 if suggested != 0.01 else 0.02
    Head.objects.filter(project=project).update(threshold=start)
    client.force_login(admin_user)
    url = reverse("training:version-thresholds-apply", args=[project.slug, v1.number])
    listing = client.get(reverse("training:version-list", args=[project.slug])).content.decode()
    assert f'<form method="get" action="{url}">' in listing  # the button opens the confirm page, it posts nothing
    page = client.get(url)
    text = page.content.decode()
    assert page.status_code == 200 and f"<td>class</td><td>{start:.2f}</td><td><strong>{suggested:.2f}</strong>" in text
    assert "Change 1 serving threshold" in text and Head.objects.get(project=project).threshold == start
    bare = client.post(url)
    assert bare.status_code == 400 and "confirm the new thresholds first" in bare.content.decode()
    assert Head.objects.get(project=project).threshold == start and not DatasetAction.objects.exists()
    token = page.context["token"]
    done = client.post(url, {"confirm": token}, follow=True).content.decode()
    assert "Undo it from the Health page" in done and Head.objects.get(project=project).threshold == suggested
    action = DatasetAction.objects.get(kind="serving_thresholds")
    assert action.changes["thresholds"] == [
        {"head_id": Head.objects.get(project=project).id, "head": "class", "old": start, "new": suggested}
    ]
    health = client.get(reverse("labeling:health", args=[project.slug])).content.decode()
    assert (
        "serving thresholds from v1" in health
        and reverse("labeling:action-undo", args=[project.slug, action.id]) in health
    )
    undone = client.post(reverse("labeling:action-undo", args=[project.slug, action.id]), follow=True)
    assert "Undone" in undone.content.decode() and Head.objects.get(project=project).threshold == start
    # the confirmed form replayed after the thresholds moved (here: back by the undo, then edited) is refused
    Head.objects.filter(project=project).update(threshold=0.33)
    replay = client.post(url, {"confirm": token})
    assert replay.status_code == 400 and "changed since you confirmed" in replay.content.decode()
    assert Head.objects.get(project=project).threshold == 0.33
    # undo never overwrites a later edit
    client.post(url, {"confirm": client.get(url).context["token"]})
    second = DatasetAction.objects.filter(kind="serving_thresholds", undone_at__isnull=True).get()
    head = Head.objects.get(project=project)
    head.threshold = 0.77
    head.save(update_fields=["threshold"])
    assert action_undo(action=second, user=admin_user) == {"skipped": 1}
    assert Head.objects.get(project=project).threshold == 0.77
