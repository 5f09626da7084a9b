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

import datetime as dt
import logging

from django.db.models import Q
from django.utils import timezone

from labeling.models import Project
from webapp import jobs

from .models import ModelVersion, TrainingRun

log = logging.getLogger(__name__)


def jobs_reconcile(*, project: Project | None = None) -> dict:
    """Reconcile the job rows of one project (or all). Returns what was done, per kind of job:
    {"train_run": {"lost": [ids], "failed": [ids], "resent": [ids]}, "health_scan": {...}, "index_build": {...}}."""
    from labeling.health import health_reports_reconcile

    from .services import _mark_cancelled

    runs = TrainingRun.objects.filter(status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING])
    builds = ModelVersion.objects.filter(index_status=ModelVersion.IndexStatus.BUILDING, promote_requested=True)
    if project is not None:
        runs, builds = runs.filter(project=project), builds.filter(project=project)
    # A run cancelled while its worker was lost is not resumed: it is cancelled now.
    stale = timezone.now() - dt.timedelta(seconds=jobs.lost_after_seconds())
    lost_cancelled = runs.filter(
        Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True),
        status=TrainingRun.Status.RUNNING,
        cancel_requested_at__isnull=False,
    )
    for run_id in list(lost_cancelled.values_list("pk", flat=True)):
        _mark_cancelled(run_id)
    out = {
        "train_run": jobs.rows_reconcile(
            TrainingRun,
            runs,
            kind="train_run",
            task="training.tasks.train_run",
            resume="it resumes from its last checkpoint",
        ),
        "health_scan": health_reports_reconcile(project=project),
        "index_build": {"resent": []},
    }
    # An index build has no queued state of its own: building + a stale heartbeat (set when queued, kept fresh
    # while it runs) + no message waiting = lost.
    stale = timezone.now() - dt.timedelta(seconds=jobs.lost_after_seconds())
    for version in builds.filter(Q(index_heartbeat_at__lt=stale) | Q(index_heartbeat_at__isnull=True)):
        if not jobs.message_waiting("index_build", version.pk) and jobs.resend(
            "training.tasks.index_build", version.pk, "index_build"
        ):
            ModelVersion.objects.filter(pk=version.pk).update(index_heartbeat_at=timezone.now())
            out["index_build"]["resent"].append(version.pk)
    return out
