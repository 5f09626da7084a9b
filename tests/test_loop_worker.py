"""The whole loop through a real Celery worker on Redis and PostgreSQL:
import → train (tiny, queue gpu) → promote (index on queue default) → recognise over REST."""

import base64
import time

import pytest
from django.core.management import call_command
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import TINY_TRAIN, make_photo
from labeling.models import Project
from pipeline import chain
from training import services
from training.models import ModelVersion, TrainingRun
from webapp.celery import app

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def _wait(predicate, timeout=240, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_import_train_promote_recognise_through_worker(worker, photo_folder, admin_user, settings):
    assert app.conf.broker_url.startswith("redis://"), "make test runs the worker on Redis"
    settings.LOUPE_MISLABEL_AFTER_PROMOTE = True  # as in production: OOF + mislabel queue after each promote
    call_command("import_images", "shapes", str(photo_folder(groups=8)), "--create", "retrieval")
    project = Project.objects.get(slug="shapes")
    Project.objects.filter(pk=project.pk).update(min_image_side=32)  # the test photos are 64 px
    project.refresh_from_db()

    run = services.training_run_create(project=project, user=admin_user, config=TINY_TRAIN)
    run = _wait(
        lambda: TrainingRun.objects.filter(pk=run.pk, status__in=["succeeded", "failed"]).first(), what="training"
    )
    assert run.status == "succeeded", run.error
    assert run.heartbeat_at is not None and run.history
    v1 = _wait(lambda: ModelVersion.objects.filter(project=project, is_active=True).first(), what="auto-promote")
    assert v1.index_status == "ready" and v1.index_size > 0

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    url = reverse("inference:recognize", args=[project.slug])
    payload = {
        "images": [{"data": base64.b64encode(make_photo("green", seed=777)).decode(), "media_type": "image/jpeg"}]
    }
    body = client.post(url, payload, format="json").json()
    assert body["model_version"] == 1 and "class" in body["heads"]
    # Once v1 was active the worker computed out-of-fold predictions and rebuilt the mislabel queue from them.
    queued = _wait(lambda: ModelVersion.objects.get(pk=v1.pk).metrics.get("mislabel_queue"), what="mislabel queue")
    assert set(queued) == {"class"}
    assert ModelVersion.objects.get(pk=v1.pk).metrics["oof"]["k"] == 5

    # A second model waits for the admin; promoting it builds its index on the worker and switches.
    run2 = services.training_run_create(project=project, user=admin_user, config={**TINY_TRAIN, "epochs": 1})
    _wait(lambda: TrainingRun.objects.filter(pk=run2.pk, status="succeeded").exists(), what="second training")
    v2 = ModelVersion.objects.get(run=run2)
    assert not v2.is_active
    # The review queues follow the active model: a run nobody promoted does not rebuild them.
    time.sleep(2)
    assert "oof" not in ModelVersion.objects.get(pk=v2.pk).metrics
    chain.model_version_promote(version=v2, user=admin_user, confirm_drop=True)  # one epoch: maybe worse
    _wait(lambda: ModelVersion.objects.filter(pk=v2.pk, is_active=True).exists(), what="promote v2")
    _wait(lambda: ModelVersion.objects.get(pk=v2.pk).metrics.get("mislabel_queue"), what="v2's mislabel queue")
    from django.test import override_settings

    with override_settings(LOUPE_ACTIVE_MODEL_TTL=0):
        assert client.post(url, payload, format="json").json()["model_version"] == 2
