"""The recognition endpoint: contract, auth, bad input, hot swap after a promote."""

import base64
import io
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse
from PIL import Image as PILImage
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import make_photo
from pipeline import chain
from training.models import ModelVersion

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(admin_user):
    client = APIClient()
    token = Token.objects.create(user=admin_user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def project(shapes_project):
    return shapes_project(8)


def _b64(data: bytes, media_type="image/jpeg") -> dict:
    return {"data": base64.b64encode(data).decode(), "media_type": media_type}


def _set_thresholds(project, value: float) -> None:
    for head in project.heads.all():  # save(), as the admin pages do: it drops the cached serving settings
        head.threshold = value
        head.save()


def _url(project):
    return reverse("inference:recognize", args=[project.slug])


def test_recognize_json_and_multipart_then_hot_swap(api, project, trained_version):
    v1 = trained_version(project)
    v1.refresh_from_db()
    assert v1.is_active and v1.index_status == "ready" and v1.index_size > 0
    photos = [make_photo("red", seed=900 + i) for i in range(3)]
    response = api.post(_url(project) + "?neighbours=5", {"images": [_b64(p) for p in photos]}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["model_version"] == v1.number and body["n_images"] == 3
    assert body["runtime"] in ("onnxruntime/CPUExecutionProvider", "torch/cpu")  # LOUPE_SERVING_DEVICE = cpu
    head = body["heads"]["class"]
    assert set(head) == {"label", "confidence", "top_k", "threshold", "reason"} and head["threshold"] == 0.6
    assert len(head["top_k"]) == 4 and head["top_k"][0]["confidence"] == pytest.approx(head["confidence"], abs=1e-6)
    assert head["label"] == (head["top_k"][0]["label"] if head["confidence"] >= 0.6 else None)
    assert 1 <= len(body["neighbours"]) <= 5
    assert {"image_id", "score", "labels", "thumbnail_url"} <= set(body["neighbours"][0])

    files = [io.BytesIO(p) for p in photos[:2]]
    for i, f in enumerate(files):
        f.name = f"p{i}.jpg"
    response = api.post(_url(project), {"images": files}, format="multipart")
    assert response.status_code == 200 and response.json()["n_images"] == 2

    # A threshold above 1 always answers null, with the confidence still reported.
    # Saving a head takes effect at once in this process (the cached serving settings are dropped).
    _set_thresholds(project, 1.0)
    body = api.post(_url(project), {"images": [_b64(photos[0])]}, format="json").json()
    assert body["heads"]["class"]["threshold"] == 1.0 and body["neighbours"] == []  # no neighbours unless asked
    if body["heads"]["class"]["confidence"] < 1.0:
        assert body["heads"]["class"]["label"] is None and body["heads"]["class"]["reason"] == "low_confidence"
    _err(
        api.post(_url(project) + "?neighbours=21", {"images": [_b64(photos[0])]}, format="json"), 400, "bad_neighbours"
    )
    _err(api.post(_url(project) + "?neighbours=x", {"images": [_b64(photos[0])]}, format="json"), 400, "bad_neighbours")

    # Promote a second model: the running server serves it without a restart.
    v2 = trained_version(project, epochs=1)
    assert not v2.is_active  # later models wait for an admin (conftest: LOUPE_AUTO_PROMOTE "first")
    chain.model_version_promote(version=v2, inline=True, confirm_drop=True)  # one epoch: maybe worse
    from django.test import override_settings

    with override_settings(LOUPE_ACTIVE_MODEL_TTL=0):
        body = api.post(_url(project), {"images": [_b64(photos[0])]}, format="json").json()
    assert body["model_version"] == v2.number
    # Roll back: v1's index is ready, so the switch is immediate.
    chain.model_version_promote(version=v1)
    assert ModelVersion.objects.get(pk=v1.pk).is_active and not ModelVersion.objects.get(pk=v2.pk).is_active


def _err(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]["message"]


def test_bad_input_gives_clear_errors(api, project):
    url = _url(project)
    msg = _err(
        api.post(url, {"images": [{"data": "@@not-base64@@", "media_type": "image/jpeg"}]}, format="json"),
        400,
        "bad_base64",
    )
    assert "image 1" in msg
    many = [_b64(make_photo("red", seed=i)) for i in range(11)]
    assert "at most 10" in _err(api.post(url, {"images": many}, format="json"), 400, "too_many_images")
    _err(api.post(url, {"images": []}, format="json"), 400, "no_images")
    msg = _err(api.post(url, {"images": [_b64(b"hello, I am text")]}, format="json"), 400, "bad_image")
    assert "not a" in msg.lower() or "image" in msg.lower()
    jpeg = make_photo("blue", seed=5, size=128)
    msg = _err(api.post(url, {"images": [_b64(jpeg[: len(jpeg) // 2])]}, format="json"), 400, "bad_image")
    assert "truncated" in msg.lower()
    png = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(png, "PNG")
    assert "media_type says image/jpeg" in _err(
        api.post(url, {"images": [_b64(png.getvalue(), "image/jpeg")]}, format="json"), 400, "media_type_mismatch"
    )
    _err(api.post(url, {"images": [{"data": "abc", "media_type": "text/html"}]}, format="json"), 400, "invalid")
    text = io.BytesIO(b"not an image")
    text.name = "x.jpg"
    _err(api.post(url, {"images": [text]}, format="multipart"), 400, "bad_image")
    _err(
        api.post(reverse("inference:recognize", args=["nope"]), {"images": [_b64(jpeg)]}, format="json"),
        404,
        "not_found",
    )
    # No model yet: a clear 409, not a 500.
    assert "no promoted model" in _err(api.post(url, {"images": [_b64(jpeg)]}, format="json"), 409, "no_active_model")


def test_pixel_bomb_refused(api, project, settings):
    settings.LOUPE_MAX_IMAGE_PIXELS = 100 * 100
    big = io.BytesIO()
    PILImage.new("RGB", (200, 200)).save(big, "PNG")
    msg = _err(
        api.post(_url(project), {"images": [_b64(big.getvalue(), "image/png")]}, format="json"), 400, "bad_image"
    )
    assert "pixels" in msg


def test_token_required(project):
    response = APIClient().post(_url(project), {"images": []}, format="json")
    _err(response, 401, "not_authenticated")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token wrong")
    _err(client.post(_url(project), {"images": []}, format="json"), 401, "authentication_failed")


def test_cached_tokens_are_dropped_when_revoked_or_the_user_is_deactivated(project, admin_user, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.authtoken.models import Token

    settings.LOUPE_TOKEN_CACHE_TTL = 60
    client = APIClient()
    token = Token.objects.create(user=admin_user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    _err(client.post(_url(project), {"images": []}, format="json"), 400, "no_images")  # authenticated
    with CaptureQueriesContext(connection) as queries:
        _err(client.post(_url(project), {"images": []}, format="json"), 400, "no_images")
    assert not any("authtoken_token" in q["sql"] for q in queries.captured_queries)  # served from the cache
    token.delete()
    _err(client.post(_url(project), {"images": []}, format="json"), 401, "authentication_failed")
    token = Token.objects.create(user=admin_user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    _err(client.post(_url(project), {"images": []}, format="json"), 400, "no_images")
    admin_user.is_active = False
    admin_user.save()
    _err(client.post(_url(project), {"images": []}, format="json"), 401, "authentication_failed")


def test_openapi_schema_and_docs(api):
    schema = api.get(reverse("schema"), {"format": "json"})
    assert schema.status_code == 200 and "/api/v1/projects/{slug}/recognize" in schema.json()["paths"]
    assert api.get(reverse("api-docs")).status_code == 200


def test_openapi_schema_is_valid_without_warnings(tmp_path):
    from django.core.management import call_command

    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for path in (
        "/api/ai/detect-car-vision",
        "/api/v1/projects/{slug}/dataset-versions/",
        "/api/v1/projects/{slug}/health/",
    ):
        assert path in text


def test_recognize_and_export_onnx_commands(project, tmp_path, capsys, trained_version):
    import json

    from django.core.management import CommandError, call_command

    version = trained_version(project)
    photo = tmp_path / "p.jpg"
    photo.write_bytes(make_photo("green", seed=3))
    call_command("recognize", project.slug, str(photo), str(photo))
    body = json.loads(capsys.readouterr().out)
    assert body["model_version"] == version.number and body["backend"] == "onnx" and "class" in body["heads"]
    call_command("export_onnx", project.slug)
    assert "max |onnx - torch|" in capsys.readouterr().out
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(CommandError, match="bad.jpg"):
        call_command("recognize", project.slug, str(bad))
    with pytest.raises(CommandError, match="No such model version"):
        call_command("export_onnx", project.slug, "--model-version", "42")


def test_combine_modes(api, project, trained_version):
    trained_version(project)
    url = reverse("inference:recognize", args=[project.slug])
    payload = {"images": [_b64(make_photo(c, seed=i)) for i, c in enumerate(["red", "red", "blue"])]}
    for mode in ("mean", "vote", "geometric"):
        body = api.post(f"{url}?combine={mode}", payload, format="json").json()
        head = body["heads"]["class"]
        assert len(head["top_k"]) == 4  # all four classes: the combined scores are a distribution
        assert abs(sum(t["confidence"] for t in head["top_k"]) - 1) < 1e-3, (mode, head)
    bad = api.post(f"{url}?combine=median", payload, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_combine"


def test_retrieval_and_fusion_modes_with_calibrated_rejection(api, project, trained_version):
    import json
    from pathlib import Path

    from inference import services as inference_services

    version = trained_version(project)
    art = Path(version.artifact_dir)
    cal = json.loads((art / "calibration.json").read_text())
    assert cal["temperature"]["class"] > 0 and "class" in cal["retrieval"]
    assert set(cal["retrieval"]["class"]) >= {"max_distance", "min_margin", "precision", "coverage"}
    assert (art / "gallery_labels.json").exists()
    url = reverse("inference:recognize", args=[project.slug])
    payload = {"images": [_b64(make_photo("red", seed=11)), _b64(make_photo("red", seed=12))]}
    for mode in ("retrieval", "fusion", "softmax"):
        body = api.post(f"{url}?mode={mode}", payload, format="json").json()
        head = body["heads"]["class"]
        assert body["mode"] == mode and head["reason"] in (None, "low_confidence", "too_far", "ambiguous")
        assert (head["label"] is None) == (head["reason"] is not None)
        assert abs(sum(t["confidence"] for t in head["top_k"]) - 1) < 1e-3
        assert body["unclassifiable"] == (head["label"] is None)
    # A photo nothing in the gallery resembles, with a strict calibration: "unclassifiable", reason "reshoot".
    served = inference_services.active_model(project_id=project.id)
    served.recognizer.calibration["retrieval"]["class"] = {"max_distance": -1.0, "min_margin": 1.0}
    body = api.post(f"{url}?mode=retrieval", payload, format="json").json()
    assert body["unclassifiable"] is True and body["reason"] == "reshoot"
    assert body["heads"]["class"]["reason"] == "too_far" and body["heads"]["class"]["label"] is None
    bad = api.post(f"{url}?mode=magic", payload, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_mode"


def test_low_confidence_recognitions_keep_their_photos_when_the_project_opts_in(api, project, trained_version):
    import datetime as dt

    from django.core.management import call_command
    from django.utils import timezone

    from inference.models import Recognition
    from labeling.models import Image, Label

    trained_version(project)
    url = reverse("inference:recognize", args=[project.slug])
    photos = [make_photo("yellow", seed=971), make_photo("yellow", seed=972)]  # not among the training photos
    payload = {"images": [_b64(p) for p in photos]}
    _set_thresholds(project, 1.0)  # nothing is sure enough: every answer is low-confidence
    api.post(url, payload, format="json")
    assert not Recognition.objects.exists()  # not opted in: nothing is kept
    project.keep_low_confidence_photos = True
    project.save()
    body = api.post(url, payload, format="json").json()
    rec = Recognition.objects.get()
    assert rec.unclassifiable == body["unclassifiable"] and rec.result["heads"]["class"]["label"] is None
    kept = list(rec.images.order_by("id"))
    assert len(kept) == 2 and {im.source for im in kept} == {"production"}
    assert {im.group_key for im in kept} == {f"recognition-{rec.id}"}  # one object = one group
    assert all(Label.objects.filter(image=im, label_class__isnull=True).exists() for im in kept)
    # Confident answers are not kept.
    _set_thresholds(project, 0.0)
    api.post(url, {"images": [_b64(make_photo("red", seed=99))]}, format="json")
    assert Recognition.objects.count() == 1
    # Retention: old unlabeled production photos go, labeled ones stay as training data.
    first, second = kept
    label = Label.objects.get(image=second)
    label.label_class = project.heads.get().classes.get(name="yellow")
    label.save()
    Image.objects.filter(pk__in=[first.pk, second.pk]).update(created_at=timezone.now() - dt.timedelta(days=40))
    Recognition.objects.update(created_at=timezone.now() - dt.timedelta(days=40))
    call_command("purge_production_photos", project.slug)
    assert not Image.objects.filter(pk=first.pk).exists() and Image.objects.filter(pk=second.pk).exists()
    assert not Recognition.objects.exists()


def test_throttling_is_per_token_in_the_error_shape(project, admin_user, reviewer, monkeypatch):
    from django.core.cache import cache

    from webapp.throttling import TokenRateThrottle

    monkeypatch.setattr(TokenRateThrottle, "THROTTLE_RATES", {"token": "2/min"})
    cache.clear()
    url = reverse("inference:recognize", args=[project.slug])
    first, second = APIClient(), APIClient()
    first.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    second.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=reviewer).key}")
    codes = [first.post(url, {"images": []}, format="json").status_code for _ in range(3)]
    assert codes[:2] == [400, 400] and codes[2] == 429
    limited = first.post(url, {"images": []}, format="json")
    assert limited.json()["error"]["code"] == "throttled" and "Retry-After" in limited
    assert second.post(url, {"images": []}, format="json").status_code == 400  # its own budget
    cache.clear()


def test_a_photos_prediction_by_the_active_model_over_rest(shapes_project, trained_version, reviewer, token_client):
    from labeling.models import Image, Project

    project = shapes_project(4)
    image = Image.objects.filter(project=project).order_by("id").first()
    api = token_client(reviewer)
    url = f"/api/v1/projects/{project.slug}/images/{image.id}/prediction/"
    none_yet = api.get(url)
    assert none_yet.status_code == 409 and none_yet.json()["error"]["code"] == "no_active_model"
    version = trained_version(project)
    body = api.get(url).json()
    assert body["model_version"] == version.number and set(body["heads"]) == {"class"}
    assert len(body["heads"]["class"]["top_k"]) == 4 and body["n_images"] == 1
    other = Project.objects.create(name="Other", slug="other", preset="sku")
    assert api.get(f"/api/v1/projects/{other.slug}/images/{image.id}/prediction/").status_code == 404
    (Path(settings.MEDIA_ROOT) / image.file).write_bytes(b"gone")
    broken = api.get(url)
    assert broken.status_code == 409 and broken.json()["error"]["code"] == "unreadable"
