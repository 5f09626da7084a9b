"""Shelf recognition (issue 18 item 5): POST /api/v1/projects/<slug>/shelf with a tiny detector and a tiny SKU model
trained here on generated shelves (labeling.shelf_data), the review side effects, `manage.py recognize_shelf`, and the
pure parts (inference.detector, inference.shelf_core, Recognizer.recognize_each).

Timing on a 2-core CPU: the module's models take about 80 s (the detector: 8 photos of 256 x 192, 30 epochs, as in
training/tests/test_detection.py, + its ONNX export; the SKU classifier: seconds); each request ~0.3 s."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import TINY_DETECTOR
from inference import services
from inference.detector import Detection, Detector
from inference.recognizer import ModelUnavailable, Recognizer
from inference.shelf_core import annotate, crop_boxes, shelf_boxes, shelf_counts
from labeling.models import Box, BoxSet, ProjectMember
from labeling.models import Image as ImageRow
from labeling.shelf_data import CONTAINER_CLASSES, detection_manifest, generate_shelves
from labeling.tests.factories import ProjectFactory
from training.engine import train_model
from training.engine.detection import export_detector_onnx, greedy_match, train_detector
from training.engine.synthetic import TINY_TEST_CONFIG
from training.tests.factories import ModelVersionFactory

DETECTOR = TINY_DETECTOR  # conftest.py


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A generated shelf set, a detector trained and exported on it, and an SKU classifier on its crops."""
    root = tmp_path_factory.mktemp("shelves")
    generate_shelves(root, 8, seed=3, size=(256, 192), rows=(2,), crops=True)
    manifest = detection_manifest(root)
    det = tmp_path_factory.mktemp("detector")
    train_detector(manifest, DETECTOR, det, fresh=True)
    export_detector_onnx(det, images=[manifest["items"][0]["path"]])
    crops = sorted((root / "crops" / "train").glob("*/*.jpg"))
    skus = sorted({p.parent.name for p in crops})
    items = [
        {
            "id": i + 1,
            "path": str(p),
            "labels": {"sku": p.parent.name},
            "group": f"g{i + 1}",
            "source": "synthetic",
            "split": "val" if i % 5 == 4 else "train",
        }
        for i, p in enumerate(crops)
    ]
    sku_dir = tmp_path_factory.mktemp("sku-model")
    train_model(
        {"heads": [{"name": "sku", "classes": skus, "parent": None}], "items": items}, dict(TINY_TEST_CONFIG), sku_dir
    )
    meta = json.loads((root / "shelves.json").read_text())
    test_photo = next(p for p in meta["photos"] if p["split"] == "test")
    return {
        "root": root,
        "detector": det,
        "sku": sku_dir,
        "skus": skus,
        "photo": root / test_photo["image"],
        "truth": test_photo,
    }


@pytest.fixture
def api(admin_user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    return client


@pytest.fixture
def shelf(models):
    """A shelf project (detector v1 active) whose SKU project has the SKU model v1 active; SKU threshold 0 (every box
    gets a SKU) unless a test changes it."""
    sku = ProjectFactory(name="Skus", slug="skus", preset="sku")
    sku.heads.filter(name="sku").update(threshold=0.0)
    project = ProjectFactory(name="Shelf", slug="shelf", preset="shelf", sku_project=sku)
    ModelVersionFactory(project=project, artifact_dir=str(models["detector"]), is_active=True)
    ModelVersionFactory(project=sku, artifact_dir=str(models["sku"]), is_active=True)
    return project


def post(api, slug: str, data: bytes, *, query: str = "", name: str = "shelf.jpg"):
    return api.post(f"/api/v1/projects/{slug}/shelf{query}", {"image": _file(data, name)}, format="multipart")


def _file(data: bytes, name: str):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="image/jpeg")


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.django_db
def test_shelf_contract_and_counts(api, shelf, models):
    r = post(api, "shelf", models["photo"].read_bytes())
    assert r.status_code == 200, r.content
    body = r.json()
    assert set(body) == {
        "detector",
        "sku_model",
        "note",
        "image",
        "n_boxes",
        "boxes",
        "counts",
        "unknown",
        "containers",
    }
    assert body["detector"] == {
        "model_version": 1,
        "runtime": "onnxruntime/CPUExecutionProvider",
        "score_threshold": DETECTOR["score_threshold"],
    }
    assert body["sku_model"] == {
        "project": "skus",
        "model_version": 1,
        "runtime": body["sku_model"]["runtime"],
        "head": "sku",
        "mode": "softmax",
    }
    assert body["note"] is None
    assert body["image"] == {"width": 256, "height": 192}
    boxes = body["boxes"]
    assert body["n_boxes"] == len(boxes) > 0
    for b in boxes:
        assert set(b) == {"box", "container", "sku"}
        x, y, w, h = (b["box"][k] for k in ("x", "y", "w", "h"))
        assert all(isinstance(v, float | int) for v in (x, y, w, h))
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 256.01 and y + h <= 192.01
        assert b["container"]["label"] in CONTAINER_CLASSES
        assert DETECTOR["score_threshold"] <= b["container"]["confidence"] <= 1
        assert set(b["sku"]) == {"label", "confidence", "reason"}
        assert b["sku"]["label"] in models["skus"] and b["sku"]["reason"] is None  # threshold 0: always a SKU
    # counts are the boxes per SKU; unknown the boxes without one; containers the boxes per class
    assert body["counts"] == dict(Counter(b["sku"]["label"] for b in boxes))
    assert body["unknown"] == 0 and sum(body["counts"].values()) == len(boxes)
    assert body["containers"] == dict(Counter(b["container"]["label"] for b in boxes))
    # the boxes are the photo's containers: the tiny detector finds most planted boxes (class-agnostic, IoU 0.5)
    truth = models["truth"]["boxes"]
    pred = np.array(
        [[b["box"]["x"], b["box"]["y"], b["box"]["x"] + b["box"]["w"], b["box"]["y"] + b["box"]["h"]] for b in boxes]
    )
    gt = np.array([[x, y, x + w, y + h] for x, y, w, h in (t["box"] for t in truth)])
    found = greedy_match(pred, np.zeros(len(pred)), gt, np.zeros(len(gt)), iou=0.5, class_aware=False)
    assert found.sum() >= 0.7 * len(truth), (found.sum(), len(truth))
    # the same photo as JSON base64 ({"image": ...} or {"images": [one]}) gets the same answer
    data = base64.b64encode(models["photo"].read_bytes()).decode()
    for payload in (
        {"image": {"data": data, "media_type": "image/jpeg"}},
        {"images": [{"data": data, "media_type": "image/jpeg"}]},
    ):
        again = api.post("/api/v1/projects/shelf/shelf", payload, format="json")
        assert again.status_code == 200, again.content
        assert again.json()["boxes"] == boxes and again.json()["counts"] == body["counts"]
    assert ImageRow.objects.count() == 0  # the projects keep no photos: nothing stored


@pytest.mark.django_db
def test_rejected_skus_count_as_unknown_and_go_to_review(api, shelf, models):
    sku = shelf.sku_project
    sku.heads.filter(name="sku").update(threshold=1.0)  # nothing is sure enough: every SKU is rejected
    shelf.heads.filter(name="container").update(threshold=1.0)  # every box is below the review threshold
    type(shelf).objects.filter(pk__in=[shelf.pk, sku.pk]).update(keep_low_confidence_photos=True)
    services.forget_project()
    body = post(api, "shelf", models["photo"].read_bytes()).json()
    n = body["n_boxes"]
    assert n > 0 and body["counts"] == {} and body["unknown"] == n
    assert all(b["sku"]["label"] is None and b["sku"]["reason"] == "low_confidence" for b in body["boxes"])
    # the rejected crops are production photos of the SKU project (at most 20 per shelf photo) ...
    crops = ImageRow.objects.filter(project=sku, source=ImageRow.Source.PRODUCTION)
    assert crops.count() == min(n, 20)
    assert all(im.recognitions.count() == 1 for im in crops)
    # ... and the shelf photo one of the shelf project, with the detector's boxes as suggestions (never set: v0)
    photo = ImageRow.objects.get(project=shelf, source=ImageRow.Source.PRODUCTION)
    assert (photo.width, photo.height) == (256, 192)
    box_set = BoxSet.objects.get(image=photo)
    assert box_set.version == 0 and box_set.head.name == "container"
    saved = list(box_set.boxes.order_by("order"))
    assert len(saved) == n and {b.source for b in saved} == {Box.Source.MODEL}
    for b, got in zip(saved, body["boxes"], strict=True):
        assert b.score == pytest.approx(got["container"]["confidence"], abs=1e-4)
        assert b.label_class.name == got["container"]["label"]
        assert (b.x, b.y, b.w, b.h) == pytest.approx(tuple(got["box"][k] for k in "xywh"), abs=0.01)
    # ... and an item of the shelf box queue, the least sure photo first (review.box_queue)
    item = photo.review_items.get(project=shelf, queue="boxes")
    assert item.head.name == "container" and item.status == "open" and item.model_version == 1
    assert item.score == pytest.approx(min(b.score for b in saved), abs=1e-6)
    # the box editor's API shows them as suggestions of a set nobody saved; a save (version 0) replaces them
    url = f"/api/v1/projects/shelf/images/{photo.id}/boxes/container/"
    shown = api.get(url).json()
    assert shown["version"] == 0 and len(shown["boxes"]) == n
    assert {b["source"] for b in shown["boxes"]} == {"model"}
    first = shown["boxes"][0]
    keep = [{k: first[k] for k in ("x", "y", "w", "h", "class_id")}]
    r = api.put(url, {"version": 0, "boxes": keep}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["version"] == 1 and [b["source"] for b in r.json()["boxes"]] == ["human"]


@pytest.mark.django_db
def test_review_keep_is_all_or_nothing(api, shelf, models, monkeypatch, settings):
    sku = shelf.sku_project
    sku.heads.filter(name="sku").update(threshold=1.0)
    shelf.heads.filter(name="container").update(threshold=1.0)
    type(shelf).objects.filter(pk__in=[shelf.pk, sku.pk]).update(keep_low_confidence_photos=True)
    services.forget_project()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Box.objects, "bulk_create", broken)
    api.raise_request_exception = False
    r = post(api, "shelf", models["photo"].read_bytes())
    assert r.status_code == 500
    assert ImageRow.objects.count() == 0  # neither the crops nor the shelf photo
    media = Path(settings.MEDIA_ROOT)
    assert not media.exists() or not [p for p in media.rglob("*") if p.is_file()]  # their files removed too


@pytest.mark.django_db
def test_annotate_returns_the_photo_as_jpeg(api, shelf, models):
    r = post(api, "shelf", models["photo"].read_bytes(), query="?annotate=1")
    assert r.status_code == 200 and r["Content-Type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and img.size == (256, 192)
    assert post(api, "shelf", models["photo"].read_bytes(), query="?annotate=maybe").json()["error"]["code"] == (
        "bad_annotate"
    )


def test_annotate_caps_the_size_and_draws_the_boxes():
    photo = Image.new("RGB", (3200, 2400), (128, 128, 128))
    boxes = shelf_boxes(
        [Detection(100, 100, 400, 800, "bottle", 0.9), Detection(2000, 1000, 300, 600, "can", 0.5)],
        [{"label": "cola", "confidence": 0.95, "reason": None}, None],
        scale=(1.0, 1.0),
    )
    out = Image.open(io.BytesIO(annotate(photo, boxes, max_side=1600)))
    assert out.size == (1600, 1200)
    assert out.getpixel((50, 250)) != (128, 128, 128)  # the first box's left edge, at half scale
    small = Image.open(io.BytesIO(annotate(Image.new("RGB", (200, 100)), [])))
    assert small.size == (200, 100)  # never enlarged


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.django_db
def test_bad_input(api, shelf, models, settings):
    r = post(api, "shelf", b"<html>not a photo</html>", name="x.jpg")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"
    assert "not a JPEG/PNG/WebP" in r.json()["error"]["message"]
    r = api.post("/api/v1/projects/shelf/shelf", {}, format="multipart")
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_images"
    two = [{"data": base64.b64encode(models["photo"].read_bytes()).decode(), "media_type": "image/jpeg"}] * 2
    r = api.post("/api/v1/projects/shelf/shelf", {"images": two}, format="json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
    settings.LOUPE_MAX_IMAGE_PIXELS = 40_000  # the photo has 49,152
    r = post(api, "shelf", models["photo"].read_bytes())
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"
    assert "too large" in r.json()["error"]["message"]
    settings.LOUPE_MAX_IMAGE_BYTES = 1000
    r = post(api, "shelf", models["photo"].read_bytes())
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"


@pytest.mark.django_db
def test_a_photo_with_no_container_has_no_boxes(api, shelf):
    r = post(api, "shelf", jpeg(Image.new("RGB", (256, 192), (128, 128, 128))))
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["boxes"] == [] and body["n_boxes"] == 0
    assert body["counts"] == {} and body["unknown"] == 0 and body["containers"] == {}


@pytest.mark.django_db
def test_not_a_shelf_project_and_no_detector(api, shelf):
    ProjectFactory(name="Plain", slug="plain", preset="sku")
    r = post(api, "plain", jpeg(Image.new("RGB", (64, 64))))
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_shelf_project"
    assert "'plain' has no detection head" in r.json()["error"]["message"]
    ProjectFactory(name="Empty shelf", slug="empty-shelf", preset="shelf")
    r = post(api, "empty-shelf", jpeg(Image.new("RGB", (64, 64))))
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_active_model"
    assert "no promoted detector" in r.json()["error"]["message"]
    assert post(api, "nope", jpeg(Image.new("RGB", (64, 64)))).status_code == 404
    # and the single-object endpoint sends a shelf project's photos here
    r = api.post("/api/v1/projects/shelf/recognize", {"images": [_file(jpeg(Image.new("RGB", (64, 64))), "a.jpg")]})
    assert (
        r.status_code == 400
        and r.json()["error"]["code"] == "shelf_project"
        and "/shelf" in r.json()["error"]["message"]
    )


@pytest.mark.django_db
def test_without_sku_model_boxes_have_no_sku_and_a_note(api, shelf, models):
    sku = shelf.sku_project
    sku.model_versions.update(is_active=False)
    body = post(api, "shelf", models["photo"].read_bytes()).json()
    assert "'skus' has no promoted model" in body["note"] and body["sku_model"] is None
    assert body["n_boxes"] > 0 and all(b["sku"] is None for b in body["boxes"])
    assert body["counts"] == {} and body["unknown"] == body["n_boxes"]
    shelf.sku_project = None
    shelf.save(update_fields=["sku_project"])
    services.forget_project()
    body = post(api, "shelf", models["photo"].read_bytes()).json()
    assert "'shelf' has no SKU project" in body["note"]


@pytest.mark.django_db
def test_members_only_shelf_is_hidden_from_other_reviewers(shelf, models, reviewer, token_client):
    type(shelf).objects.filter(pk=shelf.pk).update(members_only=True)
    services.forget_project()
    client = token_client(reviewer)
    r = post(client, "shelf", models["photo"].read_bytes())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    ProjectMember.objects.create(project=shelf, user=reviewer)
    assert post(client, "shelf", models["photo"].read_bytes()).status_code == 200
    assert APIClient().post("/api/v1/projects/shelf/shelf", {}, format="multipart").status_code in (401, 403)


# ------------------------------------------------------------------------------------------------ command
@pytest.mark.django_db
def test_recognize_shelf_command(shelf, models, tmp_path):
    out = io.StringIO()
    call_command(
        "recognize_shelf", "shelf", str(models["photo"]), "--json", "--annotate", str(tmp_path / "a.jpg"), stdout=out
    )
    body = json.loads(out.getvalue())
    assert body["n_boxes"] > 0 and sum(body["counts"].values()) + body["unknown"] == body["n_boxes"]
    assert Image.open(tmp_path / "a.jpg").size == (256, 192)
    text = io.StringIO()
    call_command("recognize_shelf", "shelf", str(models["photo"]), stdout=text)
    assert f"{body['n_boxes']} boxes (detector v1" in text.getvalue()
    with pytest.raises(CommandError, match="no detection head"):
        call_command("recognize_shelf", "skus", str(models["photo"]))
    with pytest.raises(CommandError, match="not a JPEG"):
        call_command("recognize_shelf", "shelf", __file__)


# ------------------------------------------------------------------------------------------------ pure parts
def test_detector_torch_and_onnx_agree(models):
    photo = Image.open(models["photo"]).convert("RGB")
    onnx = Detector.load(models["detector"])
    torch_ = Detector.load(models["detector"], backend="torch")
    assert onnx.runtime == "onnxruntime/CPUExecutionProvider" and torch_.runtime == "torch/cpu"
    assert onnx.classes == CONTAINER_CLASSES and onnx.score_threshold == DETECTOR["score_threshold"]
    a, b = onnx.detect(photo), torch_.detect(photo)
    assert a and [d.label for d in a] == [d.label for d in b]
    for x, y in zip(a, b, strict=True):
        assert (x.x, x.y, x.w, x.h) == pytest.approx((y.x, y.y, y.w, y.h), abs=0.5)
        assert x.score == pytest.approx(y.score, abs=1e-3)
    assert all(d.score >= DETECTOR["score_threshold"] for d in a)
    assert [d.score for d in a] == sorted((d.score for d in a), reverse=True)


def test_detector_load_errors(models, tmp_path):
    with pytest.raises(ModelUnavailable) as missing:
        Detector.load(tmp_path)
    assert missing.value.code == "model_file_missing"
    with pytest.raises(ModelUnavailable) as wrong:  # a classifier's folder is not a detector
        Detector.load(models["sku"], backend="torch")
    assert wrong.value.code == "model_file_corrupt" and "not a Loupe detector" in str(wrong.value)


def test_crops_and_counts():
    photo = Image.new("RGB", (100, 80))
    crops = crop_boxes(photo, [Detection(10, 10, 50, 50, "can", 0.9), Detection(90, 70, 10, 10, "can", 0.9)])
    assert crops[0].size == (54, 54)  # 4 % margin on each side
    assert crops[1].size == (12, 12)  # at least 2 px of margin, clipped at the photo's edge
    boxes = [
        {"container": {"label": "can"}, "sku": {"label": "cola"}},
        {"container": {"label": "can"}, "sku": {"label": "cola"}},
        {"container": {"label": "bottle"}, "sku": {"label": None}},
        {"container": {"label": "glass"}, "sku": None},
    ]
    assert shelf_counts(boxes) == {
        "counts": {"cola": 2},
        "unknown": 2,
        "containers": {"bottle": 1, "can": 2, "glass": 1},
    }
    assert shelf_counts([]) == {"counts": {}, "unknown": 0, "containers": {}}


def test_recognize_each_is_recognize_per_photo(models):
    rec = Recognizer.load(models["sku"])
    crops = [Image.open(p).convert("RGB") for p in sorted((models["root"] / "crops" / "val").glob("*/*.jpg"))[:3]]
    each = rec.recognize_each(crops, thresholds={"sku": 0.2}, top_k=2, batch_size=2)
    assert len(each) == 3
    for crop, got in zip(crops, each, strict=True):
        one = rec.recognize([crop], thresholds={"sku": 0.2}, top_k=2, neighbours=0)
        assert got["heads"]["sku"]["label"] == one["heads"]["sku"]["label"]
        assert got["heads"]["sku"]["confidence"] == pytest.approx(one["heads"]["sku"]["confidence"], abs=1e-5)
    assert rec.recognize_each([]) == []
