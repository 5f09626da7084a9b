"""Celery tasks: thin wrappers that take ids and call one service."""

from celery import shared_task

from webapp.jobs import limits

from . import services


@shared_task(
    name="training.tasks.train_run", acks_late=True, reject_on_worker_lost=True, **limits("training.tasks.train_run")
)
def train_run(run_id: int) -> str:
    run = services.training_run_execute(run_id=run_id)
    return run.status


@shared_task(name="training.tasks.index_build", acks_late=True, **limits("training.tasks.index_build"))
def index_build(version_id: int) -> str:
    version = services.model_version_index_build(version_id=version_id)
    return version.index_status


@shared_task(
    name="training.tasks.oof_predict",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("training.tasks.oof_predict"),
)
def oof_predict(version_id: int, k: int = 5, mode: str = "cheap") -> dict:
    version = services.ModelVersion.objects.get(pk=version_id)
    return services.model_version_oof(version=version, k=k, mode=mode)


@shared_task(name="training.tasks.jobs_reconcile", **limits("training.tasks.jobs_reconcile"))
def jobs_reconcile() -> dict:
    """Periodic (Celery beat): requeue jobs whose worker was lost, re-send those a restarted broker lost."""
    from .reconcile import jobs_reconcile as reconcile

    return reconcile()
