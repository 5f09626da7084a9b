"""Celery tasks for the labeling domain: thin wrappers that take ids and call one service."""

from celery import shared_task

from webapp.jobs import limits

from . import health, import_jobs


@shared_task(
    name="labeling.tasks.health_scan",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("labeling.tasks.health_scan"),
)
def health_scan(report_id: int) -> str:
    report = health.health_report_execute(report_id=report_id)
    return report.status


@shared_task(
    name="labeling.tasks.import_run",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("labeling.tasks.import_run"),
)
def import_run(run_id: int) -> str:
    return import_jobs.import_run_execute(run_id=run_id).status
