"""Every kind of job of a project in one list (training runs, health scans, the pipeline's job rows), and one
cancel for all of them: the Jobs page, its API and `manage.py jobs` use these."""

from __future__ import annotations

from labeling import health, import_jobs
from labeling.models import HealthReport, ImportRun, Project
from labeling.services import LabelingError
from training import jobs as job_services
from training import services as training_services
from training.models import Job, TrainingRun
from webapp import jobs

# The type names the URLs, the API and the command line use for each kind of row.
TYPES = {"trainingrun": TrainingRun, "healthreport": HealthReport, "importrun": ImportRun, "job": Job}


class JobNotFound(LookupError):
    pass


def project_jobs(*, project: Project, limit: int = 30) -> list[dict]:
    """The project's active jobs (all) and its latest ended ones, newest first, each as webapp.jobs.describe
    gives it."""
    rows = []
    for model in TYPES.values():
        qs = model.objects.filter(project=project)
        rows += list(qs.filter(status__in=jobs.ACTIVE_STATUSES))
        rows += list(qs.exclude(status__in=jobs.ACTIVE_STATUSES).order_by("-created_at", "-id")[:limit])
    rows.sort(key=lambda r: (r.is_active, r.created_at), reverse=True)
    return [jobs.describe(r) for r in rows[: max(limit, sum(r.is_active for r in rows))]]


def job_get(*, project: Project, type_: str, pk: int):
    model = TYPES.get(type_)
    row = model.objects.filter(project=project, pk=pk).first() if model else None
    if row is None:
        raise JobNotFound(f"Project {project.slug!r} has no job {type_}/{pk} (types: {', '.join(TYPES)}).")
    return row


def job_cancel_any(*, project: Project, type_: str, pk: int, user=None):
    """Cancel any kind of job: queued ones at once, running ones at their next progress report. Raises
    JobNotFound, or job_services.JobError when the job already ended."""
    row = job_get(project=project, type_=type_, pk=pk)
    try:
        if isinstance(row, TrainingRun):
            return training_services.training_run_cancel(run=row, user=user)
        if isinstance(row, HealthReport):
            return health.health_report_cancel(report=row, user=user)
        if isinstance(row, ImportRun):
            return import_jobs.import_run_cancel(run=row, user=user)
        return job_services.job_cancel(job=row, user=user)
    except (training_services.TrainingError, LabelingError) as exc:
        raise job_services.JobError(str(exc)) from None
