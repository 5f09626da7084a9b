"""Jobs under operator faults, on real processes: a private Redis (started, killed, restarted empty), a real
Celery worker process (killed with SIGKILL mid-training), PostgreSQL.

- an admin action while the broker is down: 503 in the error shape (a page for the browser), nothing left behind;
- a broker restart loses queued messages: the reconciler re-sends the rows whose message is gone;
- a worker killed mid-training: the run is found lost by its heartbeat, requeued and resumed from its checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import TINY_TRAIN
from labeling.models import HealthReport
from pipeline import chain
from tests.workers import use_broker, wait, worker_process
from training import services
from training.models import ModelVersion, TrainingRun
from training.reconcile import jobs_reconcile
from webapp import jobs
from webapp.celery import app

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


@pytest.fixture
def project(shapes_project):
    return shapes_project(6)


def test_admin_actions_while_the_broker_is_down_answer_503_and_leave_nothing(
    broker, project, admin_user, client, trained_version
):
    v1 = trained_version(project)
    run2 = services.training_run_create(project=project, config={**TINY_TRAIN, "epochs": 1}, queue=False)
    v2 = chain.training_run_execute(run_id=run2.id).model_version
    assert v1.is_active and not v2.is_active and v2.index_status == "none"
    broker.kill()
    client.force_login(admin_user)
    runs = TrainingRun.objects.count()

    page = client.post(reverse("training:run-create", args=[project.slug]), follow=False)
    assert page.status_code == 503 and b"broker" in page.content and b"Not started" in page.content
    assert TrainingRun.objects.count() == runs  # no orphan 'queued' row blocking the next retrain

    page = client.post(reverse("labeling:health-scan", args=[project.slug]))
    assert page.status_code == 503 and not HealthReport.objects.exists()

    page = client.post(reverse("training:version-promote", args=[project.slug, v2.number]))
    assert page.status_code == 503
    v2.refresh_from_db()
    assert v2.index_status == "none" and not v2.promote_requested  # the promote did not half-happen

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    response = api.post(f"/api/v1/projects/{project.slug}/health/", {}, format="json")
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "broker_unavailable"
    assert not HealthReport.objects.exists()

    # The broker is back: the same clicks work.
    broker.start()
    assert client.post(reverse("labeling:health-scan", args=[project.slug])).status_code == 302
    report = HealthReport.objects.get()
    assert jobs.broker_waiting(jobs.task_id("health_scan", report.pk)) is True


def test_queued_jobs_lost_by_a_broker_restart_are_sent_again(broker, project, admin_user, client):
    from labeling import health

    scan = health.health_report_create(project=project, user=admin_user)
    run = services.training_run_create(project=project, config=TINY_TRAIN)
    for kind, pk in (("health_scan", scan.pk), ("train_run", run.pk)):
        assert jobs.broker_waiting(jobs.task_id(kind, pk)) is True
    broker.kill()
    broker.start()  # empty: Redis without persistence, as in CI
    assert jobs.broker_waiting(jobs.task_id("health_scan", scan.pk)) is False
    # Within the grace period a queued row is left alone (a worker may be about to claim it).
    assert jobs_reconcile(project=project)["health_scan"]["resent"] == []
    HealthReport.objects.update(created_at=timezone.now() - jobs.QUEUED_GRACE * 2)
    TrainingRun.objects.update(created_at=timezone.now() - jobs.QUEUED_GRACE * 2)
    # The next request for that kind of job reconciles first: the scan is re-sent, the new one refused.
    client.force_login(admin_user)
    client.post(reverse("labeling:health-scan", args=[project.slug]))
    assert HealthReport.objects.count() == 1
    assert jobs.broker_waiting(jobs.task_id("health_scan", scan.pk)) is True
    # The periodic reconciler (Celery beat) re-sends the training run; a second pass sends nothing twice.
    assert jobs_reconcile()["train_run"]["resent"] == [run.pk]
    assert jobs_reconcile()["train_run"]["resent"] == []
    assert jobs.broker_waiting(jobs.task_id("train_run", run.pk)) is True


def test_every_task_has_a_time_limit_under_the_visibility_timeout(settings):
    from django.conf import settings as live

    app.loader.import_default_modules()  # every app's tasks module (autodiscovery is lazy)
    names = [n for n in app.tasks if n.split(".")[0] in ("labeling", "training", "review", "inference")]
    assert len(names) >= 7
    for name in names:
        task = app.tasks[name]
        assert task.time_limit and task.soft_time_limit and task.soft_time_limit < task.time_limit, name
        assert task.time_limit < live.LOUPE_VISIBILITY_TIMEOUT, name
    assert live.CELERY_BEAT_SCHEDULE["reconcile-jobs"]["task"] == "training.tasks.jobs_reconcile"
    # docker-compose runs exactly one beat (two would reconcile twice), and the reconciler's queue has a worker.
    from tests.compose import compose

    services = compose()["services"]
    beats = [name for name, svc in services.items() if "beat" in svc.get("command", [])]
    assert beats == ["beat"] and "replicas" not in services["beat"].get("deploy", {})
    default_workers = [n for n, svc in services.items() if "worker" in svc.get("command", [])]
    assert any("default" in services[n]["command"] for n in default_workers)


def test_heartbeat_thread_keeps_a_busy_job_alive(project, settings):
    settings.LOUPE_HEARTBEAT_SECONDS = 0.2
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timezone.timedelta(hours=1))
    with jobs.heartbeat(TrainingRun, run.pk):
        time.sleep(0.7)  # a step that reports no progress (ONNX export, calibration)
    run.refresh_from_db()
    assert timezone.now() - run.heartbeat_at < timezone.timedelta(seconds=1)


def test_a_worker_killed_mid_training_is_found_lost_and_the_run_resumes(broker, project, settings, tmp_path):
    settings.LOUPE_HEARTBEAT_SECONDS = 0.5
    settings.LOUPE_JOB_LOST_AFTER_SECONDS = 3
    config = {
        **TINY_TRAIN,
        "epochs": 40,
        "image_size": 64,
        "freeze_backbone_epochs": 0,
        "early_stopping": {"metric": "primary", "patience": None},  # all 40 epochs: the preset stops early
    }
    run = services.training_run_create(project=project, config=config)
    first = worker_process(tmp_path, broker.url, "first", settings)
    try:
        wait(
            lambda: TrainingRun.objects.filter(pk=run.pk, status="running", epoch__gte=2).exists(),
            timeout=180,
            what="the run to pass epoch 2 on the worker",
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the worker dies mid-run: no chance to write anything
        first.wait(10)
    run.refresh_from_db()
    assert run.status == "running", (run.status, run.error)
    # While the heartbeat is fresh the run is busy, not lost: a retrain is refused, the reconciler waits.
    assert jobs_reconcile(project=project)["train_run"]["lost"] == []
    with pytest.raises(services.TrainingError, match="already queued or running"):
        services.training_run_create(project=project, config=TINY_TRAIN)
    time.sleep(settings.LOUPE_JOB_LOST_AFTER_SECONDS + 1)
    done = jobs_reconcile(project=project)["train_run"]
    assert done["lost"] == [run.pk] and done["resent"] == [run.pk]
    run.refresh_from_db()
    assert run.status == "queued" and run.attempts == 1 and "Worker lost" in run.error
    second = worker_process(tmp_path, broker.url, "second", settings)
    try:
        wait(
            lambda: TrainingRun.objects.filter(pk=run.pk, status__in=["succeeded", "failed"]).exists(),
            timeout=300,
            what="the resumed run to finish",
        )
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait(10)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error + (tmp_path / "second.log").read_text()[-3000:]
    metrics = json.loads((Path(run.artifact_dir) / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 2 and metrics["epochs_run"] == 40
    assert ModelVersion.objects.filter(run=run).exists()


def test_a_second_delivery_of_a_running_run_does_nothing(project):
    run = services.training_run_create(project=project, config=TINY_TRAIN, queue=False)
    TrainingRun.objects.filter(pk=run.pk).update(status="running", heartbeat_at=timezone.now(), epoch=3)
    again = chain.training_run_execute(run_id=run.pk)
    assert again.status == "running" and again.epoch == 3 and not ModelVersion.objects.exists()


def test_the_embedded_filesystem_broker_is_searched_too(project, tmp_path, settings):
    """`make demo` runs on kombu's filesystem transport: the reconciler finds (or misses) messages there too."""
    settings.CELERY_TASK_ALWAYS_EAGER = False
    folders = {k: tmp_path / "broker" / k for k in ("queue", "processed", "control")}
    for f in folders.values():
        f.mkdir(parents=True)
    old_options = app.conf.broker_transport_options
    app.conf.update(
        broker_transport_options={
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
        }
    )
    use_broker("filesystem://")
    try:
        from labeling import health

        scan = health.health_report_create(project=project)
        assert jobs.broker_waiting(jobs.task_id("health_scan", scan.pk)) is True
        assert jobs.broker_waiting(jobs.task_id("health_scan", scan.pk + 1)) is False
        for path in folders["queue"].iterdir():  # what a wiped var/broker/ looks like
            path.unlink()
        HealthReport.objects.update(created_at=timezone.now() - jobs.QUEUED_GRACE * 2)
        assert health.health_reports_reconcile(project=project)["resent"] == [scan.pk]
        assert jobs.broker_waiting(jobs.task_id("health_scan", scan.pk)) is True
    finally:
        app.conf.update(broker_transport_options=old_options)
        use_broker(None)


def test_a_short_job_runs_while_a_long_one_holds_the_gpu_worker(broker, project, settings, tmp_path):
    """Issue 16.3, as make demo and docker-compose run it: a worker per queue. A health scan (queue default) queued
    while a training run (queue gpu) is in progress finishes before the run does, instead of waiting behind it."""
    from labeling import health
    from webapp.jobs import describe

    settings.LOUPE_HEARTBEAT_SECONDS = 0.5
    config = {
        **TINY_TRAIN,
        "epochs": 400,  # far longer than the test: it is killed at the end
        "image_size": 64,
        "freeze_backbone_epochs": 0,
        "early_stopping": {"metric": "primary", "patience": None},
    }
    run = services.training_run_create(project=project, config=config)
    gpu = worker_process(tmp_path, broker.url, "gpu", settings, queues="gpu")
    default = None
    try:
        wait(
            lambda: TrainingRun.objects.filter(pk=run.pk, status="running", epoch__gte=1).exists(),
            timeout=180,
            what="the run to start on the gpu worker",
        )
        scan = health.health_report_create(project=project)
        assert describe(scan)["queue"] == "default" and describe(scan)["ahead"] == 0  # the run is on another queue
        default = worker_process(tmp_path, broker.url, "default", settings, queues="default")
        wait(
            lambda: HealthReport.objects.filter(pk=scan.pk, status__in=["succeeded", "failed"]).exists(),
            timeout=120,
            what="the scan to finish on the default worker",
        )
        scan.refresh_from_db()
        run.refresh_from_db()
        assert scan.status == "succeeded", scan.error
        assert run.status == "running" and run.epoch < 400, (run.status, run.epoch)  # the long job is still going
    finally:
        for proc in (gpu, default):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_an_import_whose_worker_is_killed_is_rolled_back_and_done_once(broker, settings, tmp_path):
    """Issue 17.3: a worker killed mid-import leaves a half-written import; the reconciler finds it lost, the next
    worker removes that half and imports again: every photo once, all carrying the one job."""
    from conftest import make_photo
    from labeling import import_jobs
    from labeling.models import Image, ImportRun
    from labeling.services import project_create

    settings.LOUPE_HEARTBEAT_SECONDS = 0.5
    settings.LOUPE_JOB_LOST_AFTER_SECONDS = 3
    project = project_create(name="Big", preset="retrieval")
    folder = tmp_path / "photos" / "red"
    folder.mkdir(parents=True)
    for i in range(120):
        (folder / f"R{i:03d}_0.jpg").write_bytes(make_photo("red", seed=i, size=64))
    run = import_jobs.import_run_create(project=project, mode="folder", params={"folder": str(folder.parent)})
    slow = {"LOUPE_IMPORT_BATCH": "1", "MEDIA_ROOT": str(settings.MEDIA_ROOT)}
    first = worker_process(tmp_path, broker.url, "first", settings, env=slow)
    try:
        wait(lambda: ImportRun.objects.filter(pk=run.pk, done__gte=10).exists(), timeout=120, what="10 photos in")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    half = Image.objects.filter(project=project).count()
    assert 10 <= half < 120 and ImportRun.objects.get(pk=run.pk).status == "running"
    time.sleep(settings.LOUPE_JOB_LOST_AFTER_SECONDS + 1)
    assert jobs_reconcile(project=project)["import_run"]["lost"] == [run.pk]
    second = worker_process(tmp_path, broker.url, "second", settings, env=slow)
    try:
        wait(
            lambda: ImportRun.objects.filter(pk=run.pk, status__in=["succeeded", "failed"]).exists(),
            timeout=180,
            what="the import to finish on the second worker",
        )
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait(10)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error + (tmp_path / "second.log").read_text()[-2000:]
    assert Image.objects.filter(project=project).count() == 120 == Image.objects.filter(import_run=run).count()
    assert run.attempts == 1 and run.report["created"] == 120
