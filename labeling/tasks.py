"""Celery tasks for the labeling domain: thin wrappers that take ids and call one service."""

from celery import shared_task

from webapp.jobs import limits

from . import health


@shared_task(
    name="labeling.tasks.health_scan",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("labeling.tasks.health_scan"),
)
def health_scan(report_id: int) -> str:
    report = health.health_report_execute(report_id=report_id)
    return report.status
