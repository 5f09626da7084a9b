"""Cancelling a training run: a queued run at once, a running one on a real Celery worker at its next progress
report (checkpoints kept, resumable), from the Runs page, the API and the command line; a run cancelled while its
worker was lost is not resumed."""

import datetime as dt
import time

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from conftest import TINY_TRAIN
from pipeline import chain
from training import services
from training.models import ModelVersion, TrainingRun
from training.reconcile import jobs_reconcile


@pytest.fixture
def project(shapes_project):
    return shapes_project(6)


def _wait(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.django_db
def test_a_queued_run_is_cancelled_at_once_and_never_trains(project, client, admin_user, reviewer):
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    client.force_login(reviewer)
    assert client.post(reverse("training:run-cancel", args=[project.slug, run.id])).status_code == 403
    client.force_login(admin_user)
    page = client.get(reverse("training:run-list", args=[project.slug])).content.decode()
    assert "run-cancel" in page
    response = client.post(reverse("training:run-cancel", args=[project.slug, run.id]), follow=True)
    assert f"Training run {run.id} cancelled." in response.content.decode()
    run.refresh_from_db()
    assert run.status == "cancelled" and run.error == "Cancelled by admin before it started." and run.finished_at
    # Its message may still be delivered: the worker finds nothing to claim.
    assert chain.training_run_execute(run_id=run.id, inline=True).status == "cancelled"
    assert not ModelVersion.objects.exists()
    with pytest.raises(services.TrainingError, match="already cancelled"):
        services.training_run_cancel(run=run)
    body = client.post(f"/api/v1/projects/{project.slug}/runs/{run.id}/cancel/").json()
    assert body["error"]["code"] == "not_active"
    # A cancelled run does not block the next one; --run ID makes it runnable again.
    assert services.training_run_reopen(project=project, run_id=run.id).status == "queued"
    with pytest.raises(CommandError, match="no training run 999"):
        call_command("train", project.slug, "--cancel", "999")
    call_command("train", project.slug, "--cancel", str(run.id))
    assert TrainingRun.objects.get(pk=run.id).status == "cancelled"


@pytest.mark.django_db
def test_a_run_cancelled_while_its_worker_was_lost_is_not_resumed(project, admin_user):
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    TrainingRun.objects.filter(pk=run.pk).update(status="running", heartbeat_at=timezone.now())
    run = services.training_run_cancel(run=run, user=admin_user)
    assert run.status == "running" and run.cancel_requested_at is not None  # asked; the worker stops it
    TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - dt.timedelta(hours=1))
    out = jobs_reconcile(project=project)
    run.refresh_from_db()
    assert run.status == "cancelled" and run.id not in out["train_run"]["lost"]
    assert run.error.startswith("Cancelled by admin") and f"--run {run.id} resumes it" in run.error


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_a_running_run_stops_at_its_next_progress_report_on_a_real_worker(worker, project, admin_user, client):
    config = {**TINY_TRAIN, "epochs": 5000, "progress_every": 1, "checkpoint_every": 0}
    run = services.training_run_create(project=project, user=admin_user, config=config)
    _wait(lambda: TrainingRun.objects.filter(pk=run.pk, epoch__gte=2).exists(), what="two epochs on the worker")
    client.force_login(admin_user)
    body = client.post(f"/api/v1/projects/{project.slug}/runs/{run.id}/cancel/").json()
    assert body == {"id": run.id, "status": "running", "cancel_requested": True}
    run = _wait(lambda: TrainingRun.objects.filter(pk=run.pk, status="cancelled").first(), what="the cancel")
    assert run.error.startswith("Cancelled by admin at epoch ") and run.epoch < 5000
    assert (services.Path(run.artifact_dir) / "checkpoints" / "latest.pt").is_file()  # resumable
    assert not ModelVersion.objects.filter(run=run).exists()
