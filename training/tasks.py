"""Celery tasks: thin wrappers that take ids and call one service."""

from celery import shared_task

from . import services


@shared_task(name="training.tasks.train_run", acks_late=True, reject_on_worker_lost=True, time_limit=24 * 3600)
def train_run(run_id: int) -> str:
    run = services.training_run_execute(run_id=run_id)
    return run.status


@shared_task(name="training.tasks.index_build", acks_late=True, time_limit=6 * 3600)
def index_build(version_id: int) -> str:
    version = services.model_version_index_build(version_id=version_id)
    return version.index_status


@shared_task(name="training.tasks.oof_predict", acks_late=True, reject_on_worker_lost=True, time_limit=48 * 3600)
def oof_predict(version_id: int, k: int = 5, mode: str = "cheap") -> dict:
    version = services.ModelVersion.objects.get(pk=version_id)
    return services.model_version_oof(version=version, k=k, mode=mode)
