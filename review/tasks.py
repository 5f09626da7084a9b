from celery import shared_task

from training.models import ModelVersion
from webapp.jobs import limits

from . import services


@shared_task(
    name="review.tasks.mislabel_refresh",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("review.tasks.mislabel_refresh"),
)
def mislabel_refresh(version_id: int, k: int = 5, mode: str = "auto") -> dict:
    """Out-of-fold predictions of the version's frozen dataset (heads on cached frozen features when the backbone
    is pretrained, else K fresh models: GPU work; reused when the version already has them, e.g. a rollback), then
    the project's mislabel queue from them. Queued when a version becomes active (LOUPE_MISLABEL_AFTER_PROMOTE) or
    by an admin; a version that is no longer the active one when the task runs leaves the queue alone."""
    from training import services as training_services

    version = ModelVersion.objects.get(pk=version_id)
    if not version.is_active:
        return {"skipped": f"v{version.number} is not the active version"}
    if not training_services.model_version_has_oof(version=version, k=k):
        training_services.model_version_oof(version=version, k=k, mode=mode)
    version.refresh_from_db()
    if not version.is_active:  # promoted away while the fold models trained
        return {"skipped": f"v{version.number} is not the active version"}
    return services.mislabel_refresh(version=version)


@shared_task(
    name="review.tasks.uncertain_refresh",
    acks_late=True,
    reject_on_worker_lost=True,
    **limits("review.tasks.uncertain_refresh"),
)
def uncertain_refresh(project_id: int) -> dict:
    """The low-confidence queue, ranked by the active model (every unlabeled photo is predicted)."""
    from labeling.models import Project

    return services.uncertain_refresh(project=Project.objects.get(pk=project_id))
