"""Every step of the loop is a row (training.models.Job): promote -> index build, activation -> queue refreshes;
one active job of a kind per project, coalescing, cancel, lost and resumed through the one reconciler, and where
a job stands (queue, jobs ahead, ETA) for the pages."""

import datetime as dt
import re

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from labeling import health, selectors
from labeling.models import HealthReport
from pipeline import chain
from training import jobs as job_services
from training.models import Job, ModelVersion
from training.reconcile import jobs_reconcile
from webapp import jobs

pytestmark = pytest.mark.django_db


@pytest.fixture
def version(shapes_project, trained_version, settings):
    settings.LOUPE_MISLABEL_AFTER_PROMOTE = settings.LOUPE_UNCERTAIN_AFTER_PROMOTE = True  # rows only: nothing runs
    return trained_version(shapes_project(4))


def _stale(job: Job, seconds: float = 3600) -> None:
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.RUNNING, heartbeat_at=timezone.now() - dt.timedelta(seconds=seconds)
    )


def test_activation_queues_one_row_per_queue_refresh_and_asking_again_coalesces(version):
    # trained_version promoted the first model inline: its activation queued both refreshes as rows.
    rows = Job.objects.filter(project=version.project, status="queued")
    assert sorted(rows.values_list("kind", flat=True)) == ["mislabel_refresh", "uncertain_refresh"]
    mislabel = rows.get(kind="mislabel_refresh")
    assert mislabel.version == version
    # Asking again while one waits changes nothing: the waiting one runs with the newest active model anyway.
    again = job_services.job_enqueue(
        project=version.project, kind=Job.Kind.MISLABEL_REFRESH, version=version, what="again"
    )
    assert again.pk == mislabel.pk and Job.objects.filter(kind="mislabel_refresh").count() == 1
    # Asking while it runs marks it: it queues one more when it ends.
    Job.objects.filter(pk=mislabel.pk).update(status=Job.Status.RUNNING, heartbeat_at=timezone.now())
    running = job_services.job_enqueue(project=version.project, kind="mislabel_refresh", version=version, what="x")
    assert running.pk == mislabel.pk and running.rerun_requested


def test_the_constraint_holds_one_active_job_of_a_kind_per_project(version):
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.create(project=version.project, kind="uncertain_refresh")
    # Index builds: one per version, not per project.
    Job.objects.create(project=version.project, kind="index_build", version=version)
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.create(project=version.project, kind="index_build", version=version)


def test_a_refresh_job_runs_records_its_result_and_reruns_when_asked_during_the_run(version):
    job = Job.objects.get(project=version.project, kind="uncertain_refresh")
    Job.objects.filter(pk=job.pk).update(rerun_requested=True)
    done = chain.job_execute(job_id=job.pk)
    assert done.status == "succeeded", done.error
    assert done.result["model_version"] == version.number and done.result["queued"] >= 0
    assert done.started_at and done.finished_at and done.step.startswith("predicting")
    follow_up = Job.objects.get(project=version.project, kind="uncertain_refresh", status="queued")
    assert follow_up.pk != job.pk
    # A second delivery of the finished job does nothing.
    assert chain.job_execute(job_id=job.pk).finished_at == done.finished_at


def test_the_mislabel_job_reports_its_folds_and_fills_the_queue(version):
    job = Job.objects.get(project=version.project, kind="mislabel_refresh")
    done = chain.job_execute(job_id=job.pk)
    assert done.status == "succeeded", done.error
    assert done.step.startswith("ranking") and done.total == 5 and done.done == 5
    assert set(done.result) == {h.name for h in version.project.heads.all()}


def test_a_promote_is_an_index_build_row_and_a_failed_build_says_why(shapes_project, trained_version, settings):
    settings.LOUPE_AUTO_PROMOTE = "first"
    project = shapes_project(4)
    trained_version(project)
    second = trained_version(project)
    assert not second.is_active
    chain.model_version_promote(version=second, confirm_drop=True)
    job = Job.objects.get(kind="index_build", version=second)
    assert job.status == "queued" and ModelVersion.objects.get(pk=second.pk).index_status == "building"
    done = chain.job_execute(job_id=job.pk)
    assert done.status == "succeeded", done.error
    second.refresh_from_db()
    assert second.is_active and second.index_status == "ready" and done.result["activated"] is True

    # A build that fails (its artifact folder is gone) fails its row and the version's promote, with the reason.
    third = trained_version(project)
    chain.model_version_promote(version=third, confirm_drop=True)
    ModelVersion.objects.filter(pk=third.pk).update(artifact_dir=str(settings.ARTIFACT_ROOT) + "/gone")
    failed = chain.job_execute(job_id=Job.objects.get(kind="index_build", version=third).pk)
    third.refresh_from_db()
    assert failed.status == "failed" and "manifest.json" in failed.error
    assert third.index_status == "failed" and not third.is_active


def test_cancel_a_queued_job_at_once_and_a_running_one_at_its_next_report(shapes_project, trained_version, settings):
    settings.LOUPE_UNCERTAIN_AFTER_PROMOTE = True
    project = shapes_project(4)
    trained_version(project)
    second = trained_version(project)
    chain.model_version_promote(version=second, confirm_drop=True)
    build = Job.objects.get(kind="index_build", version=second)
    cancelled = job_services.job_cancel(job=build)
    second.refresh_from_db()
    assert cancelled.status == "cancelled" and "Cancelled by the command line" in cancelled.error
    assert second.index_status == "none" and not second.promote_requested  # the promote is withdrawn
    assert chain.job_execute(job_id=build.pk).status == "cancelled"  # its message, delivered later, does nothing
    with pytest.raises(job_services.JobError, match="already cancelled"):
        job_services.job_cancel(job=build)

    refresh = Job.objects.get(project=project, kind="uncertain_refresh")
    Job.objects.filter(pk=refresh.pk).update(status=Job.Status.RUNNING, heartbeat_at=timezone.now())
    job_services.job_cancel(job=refresh)
    report = job_services.job_report(refresh.pk)
    with pytest.raises(jobs.JobCancelled):
        report(step="next step")
    # The worker's side: job_execute claims a queued row, so run it on a fresh one cancelled mid-step.
    Job.objects.filter(pk=refresh.pk).update(status=Job.Status.CANCELLED)
    fresh = job_services.job_enqueue(project=project, kind="uncertain_refresh", what="x")

    def step_cancelled_midway(job, report):
        job_services.job_cancel(job=job)
        report(step="predicting")
        raise AssertionError("not reached")

    chain.JOB_STEPS[Job.Kind.UNCERTAIN_REFRESH], saved = step_cancelled_midway, chain.JOB_STEPS["uncertain_refresh"]
    try:
        done = chain.job_execute(job_id=fresh.pk)
    finally:
        chain.JOB_STEPS[Job.Kind.UNCERTAIN_REFRESH] = saved
    assert done.status == "cancelled" and done.finished_at


def test_a_lost_job_is_requeued_by_the_reconciler_resumed_and_failed_after_too_many_losses(version, settings):
    settings.LOUPE_JOB_LOST_AFTER_SECONDS = 60
    job = Job.objects.get(project=version.project, kind="uncertain_refresh")
    _stale(job)
    out = jobs_reconcile(project=version.project)["job"]
    job.refresh_from_db()
    assert out["lost"] == [job.pk] and job.status == "queued" and job.attempts == 1 and "Worker lost" in job.error
    assert chain.job_execute(job_id=job.pk).status == "succeeded"

    # A fresh heartbeat is a busy worker, not a lost one.
    other = Job.objects.get(project=version.project, kind="mislabel_refresh")
    Job.objects.filter(pk=other.pk).update(status=Job.Status.RUNNING, heartbeat_at=timezone.now())
    assert jobs_reconcile(project=version.project)["job"]["lost"] == []
    # Lost once too often: failed, with the reason.
    Job.objects.filter(pk=other.pk).update(attempts=settings.LOUPE_JOB_MAX_ATTEMPTS - 1)
    _stale(other)
    assert jobs_reconcile(project=version.project)["job"]["failed"] == [other.pk]
    other.refresh_from_db()
    assert other.status == "failed" and "lost 3 times" in other.error
    # A lost job whose cancel was asked for is cancelled, not resumed.
    third = job_services.job_enqueue(project=version.project, kind="mislabel_refresh", version=version, what="x")
    _stale(third)
    Job.objects.filter(pk=third.pk).update(cancel_requested_at=timezone.now())
    jobs_reconcile(project=version.project)
    third.refresh_from_db()
    assert third.status == "cancelled"


def test_pages_are_told_the_queue_the_jobs_ahead_and_the_eta(version):
    project = version.project
    uncertain = Job.objects.get(project=project, kind="uncertain_refresh")
    mislabel = Job.objects.get(project=project, kind="mislabel_refresh")
    scan = HealthReport.objects.create(project=project)  # queued after both
    # Short steps on "default", long ones on "gpu": the scan waits behind the low-confidence re-rank only.
    assert jobs.describe(mislabel)["queue"] == "gpu"
    assert jobs.describe(uncertain)["queue"] == "default"
    info = jobs.describe(scan)
    assert info["queue"] == "default" and info["ahead"] == 1 and info["status"] == "queued"
    # Running at half way for 10 s: about 10 s left.
    Job.objects.filter(pk=uncertain.pk).update(
        status="running", started_at=timezone.now() - dt.timedelta(seconds=10), done=5, total=10
    )
    uncertain.refresh_from_db()
    assert 8 <= jobs.describe(uncertain)["eta_s"] <= 12
    assert 8 <= jobs.describe(scan)["wait_s"] <= 12


def test_a_health_scan_can_be_cancelled_and_the_last_good_report_stays(shapes_project):
    project = shapes_project(3)
    first = health.health_report_create(project=project)
    health.health_report_execute(report_id=first.pk)
    second = health.health_report_create(project=project)
    assert selectors.health_report_last_good(project) == HealthReport.objects.get(pk=first.pk)
    # Cancelled while running: the next progress write stops it.
    HealthReport.objects.filter(pk=second.pk).update(cancel_requested_at=timezone.now())
    done = health.health_report_execute(report_id=second.pk)
    assert done.status == "cancelled", done.error
    assert selectors.health_report_last_good(project).pk == first.pk
    third = health.health_report_create(project=project)
    assert health.health_report_cancel(report=third).status == "cancelled"  # queued: at once
    with pytest.raises(health.LabelingError, match="already cancelled"):
        health.health_report_cancel(report=third)


def test_jobs_page_api_and_command_list_and_cancel_every_kind(version, client, admin_user, reviewer, settings):
    from django.core.management import call_command

    project = version.project
    scan = health.health_report_create(project=project)
    job = Job.objects.get(project=project, kind="mislabel_refresh")
    client.force_login(admin_user)
    page = client.get(f"/p/{project.slug}/jobs/")
    assert page.status_code == 200
    body = page.content.decode()
    assert f'data-job="job/{job.pk}"' in body and f'data-job="healthreport/{scan.pk}"' in body
    assert f'data-job="trainingrun/{version.run_id}"' in body and "Mislabel queue refresh" in body

    listed = client.get(f"/api/v1/projects/{project.slug}/jobs/").json()
    by_ref = {(j["type"], j["id"]): j for j in listed}
    assert by_ref[("job", job.pk)]["queue"] == "gpu" and by_ref[("job", job.pk)]["status"] == "queued"
    assert by_ref[("healthreport", scan.pk)]["queue"] == "default"
    assert by_ref[("trainingrun", version.run_id)]["status"] == "succeeded"

    # Cancel over the API: 200 with the row, then 409 (already cancelled), 404 for another project's or no row.
    out = client.post(f"/api/v1/projects/{project.slug}/jobs/healthreport/{scan.pk}/cancel/")
    assert out.status_code == 200 and out.json()["status"] == "cancelled"
    again = client.post(f"/api/v1/projects/{project.slug}/jobs/healthreport/{scan.pk}/cancel/")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]
    assert client.post(f"/api/v1/projects/{project.slug}/jobs/job/999999/cancel/").status_code == 404
    assert client.post(f"/api/v1/projects/{project.slug}/jobs/nosuchtype/{job.pk}/cancel/").status_code == 404

    # The page's cancel button; a reviewer may do neither.
    client.force_login(reviewer)
    assert client.post(f"/p/{project.slug}/jobs/job/{job.pk}/cancel").status_code in (302, 403)
    assert Job.objects.get(pk=job.pk).status == "queued"
    assert client.get(f"/api/v1/projects/{project.slug}/jobs/").status_code == 403
    client.force_login(admin_user)
    resp = client.post(f"/p/{project.slug}/jobs/job/{job.pk}/cancel", {"next": f"/p/{project.slug}/review/"})
    assert resp.status_code == 302 and Job.objects.get(pk=job.pk).status == "cancelled"

    # The command line lists and cancels too.
    uncertain = Job.objects.get(project=project, kind="uncertain_refresh")
    from io import StringIO

    out = StringIO()
    call_command("jobs", project.slug, stdout=out)
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith(f"job/{uncertain.pk} "))
    assert re.search(r"low-confidence queue refresh\s+queued\s+\[default\], 0 ahead", line), line
    call_command("jobs", project.slug, "--cancel", f"job/{uncertain.pk}", stdout=out)
    assert Job.objects.get(pk=uncertain.pk).status == "cancelled"


def test_pages_name_the_job_their_content_waits_for(version, client, admin_user):
    project = version.project
    client.force_login(admin_user)
    # The grid's model sorts: no queue item yet, so the grid says which job computes the scores.
    grid = client.get(f"/p/{project.slug}/?sort=quality").content.decode()
    job = Job.objects.get(project=project, kind="mislabel_refresh")
    assert 'id="sort-note"' in grid and f'data-job="job/{job.pk}"' in grid and "being computed" in grid
    assert 'id="sort-note"' not in client.get(f"/p/{project.slug}/?sort=id").content.decode()
    # The review queue page names its rebuild.
    page = client.get(f"/p/{project.slug}/review/mislabel/").content.decode()
    assert f'data-job="job/{job.pk}"' in page and "waiting on the <code>gpu</code> queue" in page
    # Once it ran, the grid sorts by it and the note is gone.
    chain.job_execute(job_id=job.pk)
    grid = client.get(f"/p/{project.slug}/?sort=quality").content.decode()
    assert 'id="sort-note"' not in grid
    # Health: a new scan waits, the last finished one stays on the page.
    first = health.health_report_create(project=project)
    health.health_report_execute(report_id=first.pk)
    second = health.health_report_create(project=project)
    page = client.get(f"/p/{project.slug}/health/").content.decode()
    assert f"Showing scan {first.pk} until a newer one finishes" in page
    assert f'data-job="healthreport/{second.pk}"' in page and 'id="summary"' in page


def test_oof_predictions_can_be_queued_as_a_job_and_run_from_its_row(version):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("oof_predictions", version.project.slug, "--queue", "--k", "3", stdout=out)
    job = Job.objects.get(project=version.project, kind="oof")
    assert f"job {job.id} queued" in out.getvalue() and job.params == {"k": 3, "mode": "auto"}
    call_command("jobs", version.project.slug, "--run", f"job/{job.id}", stdout=out)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert job.result["k"] == 3 and job.done == job.total == 3
    version.refresh_from_db()
    assert version.metrics["oof"]["k"] == 3


def test_training_runs_over_rest_start_list_detail_cancel(shapes_project, admin_user, reviewer, settings):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    from training.models import TrainingRun

    project = shapes_project(4)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    base = f"/api/v1/projects/{project.slug}/runs/"
    started = api.post(base, {"config": {"epochs": 1}}, format="json")
    assert started.status_code == 202, started.json()
    run = started.json()
    assert run["status"] == "queued" and run["dataset_version"] == 1 and run["config"] == {"epochs": 1}
    assert run["queue"]["queue"] == "gpu" and run["created_by"] == "admin"
    busy = api.post(base, {}, format="json")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "busy"
    listed = api.get(base).json()
    assert [r["id"] for r in listed["results"]] == [run["id"]]
    assert api.get(f"{base}{run['id']}/").json()["status"] == "queued"
    assert api.post(f"{base}{run['id']}/cancel/").json()["status"] == "cancelled"
    # Bad input and the wrong people.
    assert api.post(base, {"config": {"epochs": "many"}}, format="json").status_code == 400
    assert api.post(base, {"dataset_version": 99}, format="json").status_code == 404
    assert api.post(base, {"config": "x"}, format="json").status_code == 400
    assert api.get(f"{base}999999/").status_code == 404
    rev = APIClient()
    rev.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=reviewer).key}")
    assert rev.get(base).status_code == 403 and rev.post(base, {}, format="json").status_code == 403
    # Quick retrain asked without pretrained weights (the tests' override): a clear 400.
    quick = api.post(base, {"quick": True}, format="json")
    assert quick.status_code == 400 and "pretrained" in quick.json()["error"]["message"]
    assert TrainingRun.objects.filter(project=project).count() == 1
