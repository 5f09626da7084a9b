"""A shelf project's model is a detector, trained through the same pipeline as a classifier (issue 18 item 4):
its frozen boxes become the detector's manifest, the run trains on the gpu queue's task, is evaluated on the
frozen test split, exported to ONNX with a parity check, registered and (the first) promoted — no gallery index."""

from pathlib import Path

import pytest
from django.utils.html import escape

from labeling import boxes
from labeling.services import LabelingError, project_create
from labeling.shelf_data import generate_shelves
from labeling.versions import dataset_version_create, version_detection_manifest
from pipeline import chain
from training import services
from training.errors import TrainingError
from training.models import ModelVersion

pytestmark = pytest.mark.django_db
TINY_DETECTOR = {"min_size": 128, "max_size": 192, "epochs": 2, "batch_size": 2, "warmup_steps": 2, "device": "cpu"}


@pytest.fixture
def shelf_project(tmp_path, settings):
    root = tmp_path / "import" / "shelves"
    generate_shelves(root, 9, seed=5, size=(192, 144), rows=(2,), crops=False)
    project = project_create(name="Shelf", preset="shelf")
    project.min_image_side = 64
    project.save(update_fields=["min_image_side"])
    report = boxes.boxes_import(project=project, folder=root, format="yolo")
    assert report.written, report.lines()
    return project


def test_a_shelf_project_trains_a_detector_through_the_pipeline(shelf_project):
    version, _ = dataset_version_create(project=shelf_project)
    manifest = version_detection_manifest(version=version)
    assert manifest["head"] == "container" and set(manifest["classes"]) <= {
        "bottle",
        "can",
        "glass",
        "unknown_container",
    }
    assert {it["split"] for it in manifest["items"]} == {"train", "val", "test"}  # the YOLO folders' sticky splits
    n_boxes = sum(len(it["boxes"]) for it in manifest["items"])
    assert n_boxes > 20 and sum(c["train"] for c in version.counts["classes"]["container"].values()) > 0

    run = services.training_run_create(project=shelf_project, config=TINY_DETECTOR, queue=False)
    run = chain.training_run_execute(run_id=run.id, inline=True)
    assert run.status == "succeeded", run.error
    assert run.history and run.n_train == sum(1 for it in manifest["items"] if it["split"] == "train")
    v1 = ModelVersion.objects.get(run=run)
    assert v1.is_active and v1.index_status == "ready"  # nothing to index: the first detector is served at once
    metrics = v1.metrics
    assert metrics["task"] == "detection" and metrics["metrics_on"] == "test"
    for key in ("map_50", "map", "recall", "precision", "count_mae", "per_class"):
        assert key in metrics["test"], key
    assert metrics["onnx"].get("max_box_diff") is not None, metrics["onnx"]
    art = Path(v1.artifact_dir)
    for name in ("model.pt", "detector.onnx", "manifest.json", "metrics.json", "label_maps.json"):
        assert (art / name).is_file(), name

    # A second detector is not promoted over the first by itself: an admin decides (no shared test split yet).
    run2 = services.training_run_create(project=shelf_project, config={**TINY_DETECTOR, "seed": 1}, queue=False)
    run2 = chain.training_run_execute(run_id=run2.id, inline=True)
    v2 = ModelVersion.objects.get(run=run2)
    assert not v2.is_active and "promoted by an admin" in v2.metrics["gate"]["reason"]
    chain.model_version_promote(version=v2, user=None, inline=True)
    v2.refresh_from_db()
    assert v2.is_active


def test_a_detector_run_refuses_what_it_cannot_use(shelf_project, tmp_path):
    with pytest.raises(TrainingError, match="unknown detector config key 'tail_from_blok'"):
        services.training_run_create(project=shelf_project, config={"tail_from_blok": 2}, queue=False)
    with pytest.raises(TrainingError, match="no quick retrain"):
        services.training_run_create(project=shelf_project, config={"quick": True}, queue=False)
    empty = project_create(name="Empty shelf", preset="shelf")
    with pytest.raises(TrainingError, match="no usable labeled images"):
        services.training_run_create(project=empty, config=TINY_DETECTOR, queue=False)
    with pytest.raises(LabelingError, match="detection heads only"):
        from labeling.versions import version_manifest

        version_manifest(version=dataset_version_create(project=shelf_project)[0])


def test_the_models_pages_show_a_detector(shelf_project, admin_client):
    from django.urls import reverse

    run = services.training_run_create(project=shelf_project, config=TINY_DETECTOR, queue=False)
    run = chain.training_run_execute(run_id=run.id, inline=True)
    assert run.status == "succeeded", run.error
    slug = shelf_project.slug
    for url in (
        reverse("training:version-list", args=[slug]),
        reverse("training:version-detail", args=[slug, 1]),
        reverse("training:run-list", args=[slug]),
    ):
        response = admin_client.get(url)
        assert response.status_code == 200, url
    page = admin_client.get(reverse("training:version-detail", args=[slug, 1])).content.decode()
    assert "mAP@50" in page and "count MAE" in page
    metrics = ModelVersion.objects.get(run=run).metrics
    test = metrics["test"]
    assert f"{test['map_50']:.3f}" in page and f"{test['count_mae']:.3f}" in page  # the test split's figures
    assert "detector.onnx" in page  # downloadable
    by = metrics["threshold"]["by"]  # how the operating threshold was chosen
    assert by.startswith(("count MAE", "highest val recall")) and escape(by) in page

    # Mobile: the export job converts the detector to detector.tflite, checked on the run's own photos.
    import os

    from training.engine.mobile import mobile_python

    if mobile_python() is None and not os.environ.get("CI"):
        return  # no .venv-mobile here (make test builds it); the export is tested in training/tests/test_detection.py
    version = ModelVersion.objects.get(run=run)
    job = chain.model_version_mobile_export(version=version, user=None)
    job = chain.job_execute(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert job.result["reference"].startswith("torch (model.pt) on ") and job.result["reference"].endswith("photos")
    page = admin_client.get(reverse("training:version-detail", args=[slug, 1])).content.decode()
    assert 'id="mobile-check"' in page and "detector.tflite" in page and "letterboxed" in page
    got = admin_client.get(reverse("training:version-file", args=[slug, 1, "detector.tflite"]))
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == (Path(version.artifact_dir) / "detector.tflite").read_bytes()
