"""Job rows (training.models.Job) for the loop's steps that are not training runs or health scans: index builds,
out-of-fold predictions, the mislabel and low-confidence queue refreshes. Writes only; pipeline.chain runs them.

- `job_enqueue` creates the row and publishes its task (by name: this layer does not import the pipeline). One
  queued or running job of a kind per project (per version for index builds) is a database constraint: asking
  again while one waits changes nothing (it runs with the newest active model anyway); asking while one runs
  marks it `rerun_requested`, and the pipeline queues one more when it ends.
- `job_claim` / `job_report` / `job_finish` / `job_fail` / `job_mark_cancelled` are the worker's side: claim
  the row (queued, or running with a stale heartbeat: its worker is gone), report the step and progress (raises
  JobCancelled once an admin asked to cancel), end it.
- `job_cancel` is the admin's: a queued job is cancelled at once, a running one at its next progress report.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from labeling.models import Project
from webapp import jobs
from webapp.jobs import JobCancelled

from .models import Job, ModelVersion

log = logging.getLogger(__name__)

# The Celery task of each kind (pipeline/tasks.py); their queues and time limits are in settings.
TASKS = {kind: Job(kind=kind).task_name for kind in Job.Kind}
MESSAGE_KIND = "job"  # the broker message of job N is task_id("job", N)


class JobError(Exception):
    """A job request or cancel that cannot be done; the message says why and what to do."""


PER_VERSION = (Job.Kind.INDEX_BUILD, Job.Kind.MOBILE_EXPORT)  # one active job per model version, not per project


def _active(project: Project, kind: str, version: ModelVersion | None):
    qs = Job.objects.select_for_update().filter(status__in=jobs.ACTIVE_STATUSES, kind=kind)
    return qs.filter(version=version) if kind in PER_VERSION else qs.filter(project=project)


def job_enqueue(
    *,
    project: Project,
    kind: str,
    version: ModelVersion | None = None,
    user=None,
    params: dict | None = None,
    what: str,
    undo_on_broker_error: bool = True,
    undo: Callable[[], None] | None = None,
) -> Job:
    """Queue a job of `kind`, or return the one of that kind already queued or running (see the module doc). Run
    inside the caller's transaction: the task is published when it commits. With `undo_on_broker_error`, a broker
    that refuses the message removes the new row and BrokerUnavailable (503) reaches the caller; without, the row
    stays queued for the reconciler to send when the broker is back. `undo` reverts the caller's own change then."""
    with transaction.atomic():
        existing = _active(project, kind, version).first()
        if existing is None:
            try:
                with transaction.atomic():
                    job = Job.objects.create(
                        project=project, kind=kind, version=version, created_by=user, params=params or {}
                    )
            except IntegrityError:  # another process queued one between our read and our insert
                existing = _active(project, kind, version).first()
                if existing is None:
                    raise
            else:
                jid = job.id

                def revert() -> None:
                    Job.objects.filter(pk=jid).delete()
                    if undo is not None:
                        undo()

                jobs.send_on_commit(
                    TASKS[kind],
                    jid,
                    kind=MESSAGE_KIND,
                    pk=jid,
                    what=what,
                    undo=revert if undo_on_broker_error else None,
                )
                return job
        if existing.status == Job.Status.QUEUED:
            Job.objects.filter(pk=existing.pk).update(
                version=version or existing.version, params=params or existing.params
            )
        else:
            Job.objects.filter(pk=existing.pk).update(rerun_requested=True)
        existing.refresh_from_db()
        return existing


def job_claim(*, job_id: int) -> Job | None:
    """Claim the job for this process: queued, or running with a stale heartbeat (its worker is gone). None when
    another delivery holds it, it has ended, or it was cancelled (a lost job with a cancel request is cancelled)."""
    now = timezone.now()
    stale = now - dt.timedelta(seconds=jobs.lost_after_seconds())
    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        return None
    if job.status == Job.Status.RUNNING and job.cancel_requested_at and _stale(job, stale):
        job_mark_cancelled(job_id=job_id)
        return None
    claimed = (
        Job.objects.filter(pk=job_id)
        .filter(
            Q(status=Job.Status.QUEUED)
            | Q(status=Job.Status.RUNNING, heartbeat_at__lt=stale)
            | Q(status=Job.Status.RUNNING, heartbeat_at__isnull=True)
        )
        .update(status=Job.Status.RUNNING, started_at=now, heartbeat_at=now, finished_at=None)
    )
    if not claimed:
        return None
    return Job.objects.select_related("project", "version").get(pk=job_id)


def _stale(job: Job, stale) -> bool:
    return job.heartbeat_at is None or job.heartbeat_at < stale


def job_report(job_id: int) -> Callable[..., None]:
    """A progress reporter for the job: report(step=..., done=..., total=...) writes what it is given and the
    heartbeat; raises JobCancelled once an admin asked to cancel."""

    def report(step: str | None = None, done: int | None = None, total: int | None = None) -> None:
        fields: dict = {"heartbeat_at": timezone.now()}
        if step is not None:
            fields["step"] = step[:80]
        if done is not None:
            fields["done"] = max(0, int(done))
        if total is not None:
            fields["total"] = max(0, int(total))
        if not Job.objects.filter(pk=job_id, cancel_requested_at__isnull=True).update(**fields):
            raise JobCancelled(job_id)

    return report


def job_finish(*, job_id: int, result: dict) -> Job:
    Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).update(
        status=Job.Status.SUCCEEDED, finished_at=timezone.now(), result=_jsonable(result), error=""
    )
    return Job.objects.get(pk=job_id)


def job_fail(*, job_id: int, error: str) -> Job:
    Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).update(
        status=Job.Status.FAILED, finished_at=timezone.now(), error=error[:5000]
    )
    return Job.objects.get(pk=job_id)


def _canceller(job: Job) -> str:
    return job.cancel_requested_by.get_username() if job.cancel_requested_by_id else "the command line"


def job_mark_cancelled(*, job_id: int) -> Job:
    job = Job.objects.select_related("cancel_requested_by").get(pk=job_id)
    Job.objects.filter(pk=job_id, status__in=jobs.ACTIVE_STATUSES).update(
        status=Job.Status.CANCELLED,
        finished_at=timezone.now(),
        error=f"Cancelled by {_canceller(job)}{f' during {job.step}' if job.step else ''}.",
        rerun_requested=False,
    )
    if job.kind == Job.Kind.INDEX_BUILD and job.version_id:  # the promote it served is withdrawn
        ModelVersion.objects.filter(pk=job.version_id, index_status=ModelVersion.IndexStatus.BUILDING).update(
            index_status=ModelVersion.IndexStatus.NONE, promote_requested=False
        )
    job.refresh_from_db()
    return job


def job_cancel(*, job: Job, user=None) -> Job:
    """Cancel a queued job at once, or ask a running one to stop at its next progress report. JobError for a job
    that already ended."""
    job, queued = jobs.cancel_request(Job, job.pk, user=user, error=JobError, what="Job")
    return job_mark_cancelled(job_id=job.id) if queued else job


def _jsonable(value):
    """Results are small dicts of numbers and strings; numpy scalars and tuples become plain JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
