"""Issue 14 (hardening) on the recognition endpoints: hostile bodies, request-wide pixel budget, broken
artifacts, and the small contract fixes. Every answer is in the one error shape (the car shape on the car
endpoint), never an HTML page or a 500."""

import base64
import io
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from django.test import override_settings
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import make_photo
from inference import services
from training.models import ModelVersion

pytestmark = pytest.mark.django_db
CAR_URL = "/api/ai/detect-car-vision"


@pytest.fixture
def api(admin_user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    return client


@pytest.fixture
def project(shapes_project):
    return shapes_project(8)


def _url(project):
    return reverse("inference:recognize", args=[project.slug])


def _b64(data: bytes, media_type="image/jpeg") -> dict:
    return {"data": base64.b64encode(data).decode(), "media_type": media_type}


def _err(response, status, code):
    assert response.status_code == status, response.content[:500]
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]["message"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data (decoding it would fail)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# ------------------------------------------------------------------------------------ 3: deeply nested JSON
def _nested(depth: int) -> str:
    return '{"images": ' + "[" * depth + "]" * depth + "}"


def test_deeply_nested_json_is_a_400_in_the_error_shape(api, project):
    response = api.post(_url(project), data=_nested(200_000), content_type="application/json")
    msg = _err(response, 400, "json_too_deep")
    assert "nested" in msg.lower()


def test_deeply_nested_json_on_the_car_endpoint_keeps_the_car_shape(api, settings):
    from labeling.services import project_create

    settings.LOUPE_CAR_PROJECT = "cars"
    project_create(name="Cars", preset="car", slug="cars")
    response = api.post(CAR_URL, data=_nested(200_000), content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    body = response.json()
    assert set(body) == {"make", "model", "confidence", "error"} and "nested" in body["error"].lower()


# ---------------------------------------------------------------------------------- 4: too many multipart files
def test_more_multipart_files_than_django_accepts_is_a_json_400_naming_the_limit(api, project, settings, caplog):
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 50
    files = []
    for i in range(51):
        f = io.BytesIO(b"x")
        f.name = f"p{i}.jpg"
        files.append(f)
    with caplog.at_level("ERROR"):
        response = api.post(_url(project), {"images": files}, format="multipart")
    msg = _err(response, 400, "too_many_files")
    assert "50" in msg
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# ------------------------------------------------------------------------------ 5: pixel budget per request
def test_decoded_pixels_per_request_are_capped_from_the_headers(api, project, settings):
    settings.LOUPE_MAX_REQUEST_PIXELS = 120_000_000
    ten_36mp = [_b64(_png_header_only(6000, 6000), "image/png") for _ in range(10)]
    msg = _err(api.post(_url(project), {"images": ten_36mp}, format="json"), 413, "too_many_pixels")
    assert "360.0 megapixels" in msg and "120 megapixels" in msg and "LOUPE_MAX_REQUEST_PIXELS" in msg
    # JPEGs count at the reduced size they are decoded at: many large JPEGs fit the same budget.
    settings.LOUPE_MAX_REQUEST_PIXELS = 2_000_000
    jpegs = [_b64(make_photo("red", seed=i, size=1600)) for i in range(3)]  # 2.56 MP each, decoded at 0.64 MP
    _err(api.post(_url(project), {"images": jpegs}, format="json"), 409, "no_active_model")  # past the decoding


# ----------------------------------------------------------------------------------- 9: broken model files
def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a model")


def test_missing_or_corrupt_model_pt_is_served_from_model_onnx(api, project, trained_version):
    version = trained_version(project)
    art = Path(version.artifact_dir)
    assert (art / "model.onnx").is_file()
    photo = [_b64(make_photo("red", seed=901))]
    good = api.post(_url(project), {"images": photo}, format="json").json()
    services.forget_all()
    (art / "model.pt").unlink()
    response = api.post(_url(project), {"images": photo}, format="json")
    assert response.status_code == 200, response.content[:500]
    assert response.json()["heads"]["class"]["top_k"][0]["label"] == good["heads"]["class"]["top_k"][0]["label"]
    services.forget_all()
    _corrupt(art / "model.pt")
    assert api.post(_url(project), {"images": photo}, format="json").status_code == 200


def test_nothing_valid_is_a_503_naming_the_problem(api, project, trained_version):
    version = trained_version(project)
    art = Path(version.artifact_dir)
    services.forget_all()
    _corrupt(art / "model.pt")
    _corrupt(art / "model.onnx")
    photo = [_b64(make_photo("red", seed=902))]
    msg = _err(api.post(_url(project), {"images": photo}, format="json"), 503, "model_file_corrupt")
    assert "model.pt" in msg and "model.onnx" in msg and f"v{version.number}" in msg
    services.forget_all()
    (art / "model.pt").unlink()
    (art / "model.onnx").unlink()
    _err(api.post(_url(project), {"images": photo}, format="json"), 503, "model_file_missing")


def test_a_broken_new_version_keeps_the_previous_one_serving(api, project, caplog, trained_version):
    v1 = trained_version(project)
    photo = [_b64(make_photo("red", seed=903))]
    assert api.post(_url(project), {"images": photo}, format="json").json()["model_version"] == v1.number
    v2 = trained_version(project, epochs=1)
    art2 = Path(v2.artifact_dir)
    _corrupt(art2 / "model.pt")
    shutil.copy(art2 / "model.pt", art2 / "model.onnx")
    ModelVersion.objects.filter(project=project).update(is_active=False)
    ModelVersion.objects.filter(pk=v2.pk).update(is_active=True)
    with override_settings(LOUPE_ACTIVE_MODEL_TTL=0), caplog.at_level("ERROR", logger="inference"):
        response = api.post(_url(project), {"images": photo}, format="json")
    assert response.status_code == 200, response.content[:500]
    assert response.json()["model_version"] == v1.number
    assert any(f"v{v2.number}" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ 11: small ones
def test_vote_with_fewer_than_three_photos_falls_back_to_mean_and_wrapped_base64_is_accepted(
    api, project, trained_version
):
    trained_version(project)
    url = _url(project)
    for n in (1, 2):
        payload = {"images": [_b64(make_photo("red", seed=910 + i)) for i in range(n)]}
        vote = api.post(url + "?combine=vote", payload, format="json").json()["heads"]["class"]
        mean = api.post(url + "?combine=mean", payload, format="json").json()["heads"]["class"]
        assert vote["confidence"] == pytest.approx(mean["confidence"], abs=1e-6), n
        assert vote["confidence"] < 0.999
    # base64 wrapped at 76 columns (the `base64` tool's default), with CRLF too
    data = base64.encodebytes(make_photo("blue", seed=920, size=200)).decode()
    assert "\n" in data
    for text in (data, data.replace("\n", "\r\n"), " " + data):
        response = api.post(url, {"images": [{"data": text, "media_type": "image/jpeg"}]}, format="json")
        assert response.status_code == 200, response.content[:300]


def test_size_messages_use_the_real_limit_in_mib(api, project, settings):
    settings.LOUPE_MAX_IMAGE_BYTES = 15 * 1024 * 1024
    big = io.BytesIO(b"\xff\xd8\xff" + b"\x00" * (15_800_000 - 3))
    big.name = "big.jpg"
    msg = _err(api.post(_url(project), {"images": [big]}, format="multipart"), 413, "image_too_large")
    assert "the limit is 15 MiB" in msg and "15.1 MiB" in msg and "16 MB" not in msg
    payload = {"images": [_b64(b"\xff\xd8\xff" + b"\x00" * (15_800_000 - 3))]}
    msg = _err(api.post(_url(project), payload, format="json"), 413, "image_too_large")
    assert "the limit is 15 MiB" in msg and "16 MB" not in msg


def test_bad_base64_says_what_is_accepted(api, project):
    msg = _err(
        api.post(_url(project), {"images": [{"data": "ab$cd", "media_type": "image/jpeg"}]}, format="json"),
        400,
        "bad_base64",
    )
    assert "image 1" in msg and "whitespace" in msg


# ----------------------------------------------------------------------- 10: ONNX parity figures on the model page
def test_model_page_shows_the_onnx_parity_figures(project, client, admin_user, trained_version):
    version = trained_version(project)
    onnx = version.metrics["onnx"]
    assert onnx["exporter"] and onnx["top1_agreement"] == 1.0
    assert onnx["max_rel_diff"] is not None and onnx["atol"] and onnx["rtol"]
    client.force_login(admin_user)
    page = client.get(reverse("training:version-list", args=[project.slug])).content.decode()
    assert "Serving" in page and "same top-1 100 %" in page and "relative" in page
