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
    is pretrained, else K fresh models: GPU work), then the project's mislabel queue from them. Queued after every
    successful training run (LOUPE_MISLABEL_AFTER_TRAINING)."""
    from training import services as training_services

    version = ModelVersion.objects.get(pk=version_id)
    training_services.model_version_oof(version=version, k=k, mode=mode)
    version.refresh_from_db()
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
