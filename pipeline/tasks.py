"""Celery tasks: thin wrappers that take ids and call one step of pipeline/chain.py (or one service). Job rows
(training.models.Job) run through pipeline.job.<kind>; the tasks under the names earlier releases registered
(training.tasks.*, review.tasks.*) stay so that messages those releases queued still run."""

from celery import shared_task

from labeling.models import Project
from review import services as review_services
from training import services as training_services
from training.jobs import TASKS
from training.models import Job, ModelVersion
from webapp.jobs import limits

from . import chain


@shared_task(
    name="training.tasks.train_run", acks_late=True, reject_on_worker_lost=True, **limits("training.tasks.train_run")
)
def train_run(run_id: int) -> str:
    return chain.training_run_execute(run_id=run_id).status


@shared_task(name="training.tasks.index_build", acks_late=True, **limits("training.tasks.index_build"))
def index_build(version_id: int) -> str:
    return chain.model_version_index_build(version_id=version_id).index_status


@shared_task(
    name="training.tasks.oof_predict",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("training.tasks.oof_predict"),
)
def oof_predict(version_id: int, k: int = 5, mode: str = "cheap") -> dict:
    version = ModelVersion.objects.get(pk=version_id)
    return training_services.model_version_oof(version=version, k=k, mode=mode)


@shared_task(name="training.tasks.jobs_reconcile", **limits("training.tasks.jobs_reconcile"))
def jobs_reconcile() -> dict:
    """Periodic (Celery beat): requeue jobs whose worker was lost, re-send those a restarted broker lost."""
    from training.reconcile import jobs_reconcile as reconcile

    return reconcile()


@shared_task(
    name="review.tasks.mislabel_refresh",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("review.tasks.mislabel_refresh"),
)
def mislabel_refresh(version_id: int, k: int = 5, mode: str = "auto") -> dict:
    return chain.mislabel_refresh(version_id=version_id, k=k, mode=mode)


@shared_task(
    name="review.tasks.uncertain_refresh",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("review.tasks.uncertain_refresh"),
)
def uncertain_refresh(project_id: int) -> dict:
    """The low-confidence queue, ranked by the active model (every unlabeled photo is predicted)."""
    return review_services.uncertain_refresh(project=Project.objects.get(pk=project_id))


# -------------------------------------------------------------------- job rows (training.models.Job), one per kind
# One task per kind so that each has its queue and time limit (settings: CELERY_TASK_ROUTES,
# LOUPE_TASK_TIME_LIMITS); all of them run pipeline.chain.job_execute on the row.
def _job_task(kind: str):
    name = TASKS[kind]

    @shared_task(name=name, acks_late=True, reject_on_worker_lost=True, **limits(name))
    def run(job_id: int) -> str:
        return chain.job_execute(job_id=job_id).status

    return run


job_index_build = _job_task(Job.Kind.INDEX_BUILD)
job_oof = _job_task(Job.Kind.OOF)
job_mislabel_refresh = _job_task(Job.Kind.MISLABEL_REFRESH)
job_uncertain_refresh = _job_task(Job.Kind.UNCERTAIN_REFRESH)
job_mobile_export = _job_task(Job.Kind.MOBILE_EXPORT)
