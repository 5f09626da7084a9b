"""The reconciler: job rows whose work was lost are put back on the queue.

- A row `running` whose heartbeat is older than LOUPE_JOB_LOST_AFTER_SECONDS lost its worker (killed, OOM,
  machine gone): it is marked so (the error text says when), requeued and its message re-sent; a training run
  resumes from its last checkpoint, a health scan starts again. After LOUPE_JOB_MAX_ATTEMPTS losses it fails.
- A row `queued` (older than a grace period) whose message no longer waits in the broker was lost by a broker
  restart (Redis without persistence) or a worker that died before claiming it: the message is re-sent.

Re-sending is safe because every execution claims its row first (queued, or running with a stale heartbeat) and
a duplicate delivery of a claimed or finished row does nothing. Runs from the periodic task
`training.tasks.jobs_reconcile` (Celery beat; defined in pipeline/tasks.py, like every task it re-sends, by name),
and for one project before a new job of that project starts.
"""

from __future__ import annotations

import logging

from labeling.models import Project
from webapp import jobs

from .models import Job, ModelVersion, TrainingRun

log = logging.getLogger(__name__)


def jobs_reconcile(*, project: Project | None = None) -> dict:
    """Reconcile the job rows of one project (or all): training runs, health scans and the pipeline's job rows, one
    mechanism (webapp.jobs.rows_reconcile). Returns what was done, per kind of job:
    {"train_run": {"lost": [ids], "failed": [ids], "resent": [ids]}, "health_scan": {...}, "job": {...}}."""
    from labeling.health import health_reports_reconcile
    from labeling.import_jobs import import_runs_reconcile

    from .jobs import MESSAGE_KIND, TASKS, job_mark_cancelled
    from .services import _mark_cancelled

    runs = TrainingRun.objects.filter(status__in=jobs.ACTIVE_STATUSES)
    rows = Job.objects.filter(status__in=jobs.ACTIVE_STATUSES)
    if project is not None:
        runs, rows = runs.filter(project=project), rows.filter(project=project)
    out = {
        "train_run": jobs.rows_reconcile(
            TrainingRun,
            runs,
            kind="train_run",
            task="training.tasks.train_run",
            resume="it resumes from its last checkpoint",
            cancel=_mark_cancelled,
        ),
        "health_scan": health_reports_reconcile(project=project),
        "import_run": import_runs_reconcile(project=project),
        "job": {"lost": [], "failed": [], "resent": []},
    }
    for kind, task in TASKS.items():
        done = jobs.rows_reconcile(
            Job,
            rows.filter(kind=kind),
            kind=MESSAGE_KIND,
            task=task,
            resume="its step starts again",
            cancel=lambda pk: job_mark_cancelled(job_id=pk),
            on_failed=_index_build_failed if kind == Job.Kind.INDEX_BUILD else None,
        )
        for key, ids in done.items():
            out["job"][key] += ids
    return out


def _index_build_failed(job_id: int) -> None:
    """An index build lost too often: its version's promote fails with the job's reason."""
    job = Job.objects.get(pk=job_id)
    ModelVersion.objects.filter(pk=job.version_id, index_status=ModelVersion.IndexStatus.BUILDING).update(
        index_status=ModelVersion.IndexStatus.FAILED, index_error=job.error, promote_requested=False
    )
