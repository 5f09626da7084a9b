"""The car seed's endpoint, same contract: POST /api/ai/detect-car-vision with 4-10 base64 photos answers
{"make", "model", "confidence", "error"}; a field is null below 0.6; every error keeps that shape with a 4xx."""

import base64
import io

import pytest
from PIL import Image as PILImage
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import make_photo
from labeling.models import LabelClass

pytestmark = pytest.mark.django_db
URL = "/api/ai/detect-car-vision"


@pytest.fixture
def api(admin_user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    return client


@pytest.fixture
def cars(car_project, settings):
    """The configured car project: 3 models x 6 groups x 2 photos, each model its own colour and shape."""
    settings.LOUPE_CAR_PROJECT = "cars"
    return car_project(groups=6, per_group=2)


def _photos(n, color="red", shape="square", fmt="JPEG", media_type="image/jpeg"):
    out = []
    for i in range(n):
        data = make_photo(color, shape, seed=500 + i, fmt=fmt)
        out.append({"data": base64.b64encode(data).decode(), "media_type": media_type})
    return {"images": out}


def _contract_error(response, status):
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"make", "model", "confidence", "error"}
    assert body["make"] is None and body["model"] is None and body["confidence"] is None
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


def test_contract_field_by_field(api, cars, settings, trained_version):
    _contract_error(api.post(URL, _photos(4), format="json"), 409)  # no promoted model yet
    trained_version(cars, epochs=3)
    for n in (4, 10):
        response = api.post(URL, _photos(n), format="json")
        body = response.json()
        assert response.status_code == 200, body
        assert set(body) == {"make", "model", "confidence", "error"} and body["error"] is None
        assert isinstance(body["confidence"], float) and 0 <= body["confidence"] <= 1
        if body["model"] is not None:  # a model always comes with its own make
            assert body["make"] == LabelClass.objects.get(head__name="model", name=body["model"]).parent.name
    # Below the threshold a field is null, and confidence still says how sure the model was.
    settings.LOUPE_CAR_THRESHOLD = 1.01
    body = api.post(URL, _photos(4), format="json").json()
    assert body["make"] is None and body["model"] is None and isinstance(body["confidence"], float)
    assert body["error"] is None


def test_bad_requests_keep_the_contract_shape(api, cars, client, trained_version):
    trained_version(cars, epochs=3)
    assert "4 to 10" in _contract_error(api.post(URL, _photos(3), format="json"), 400)
    assert "4 to 10" in _contract_error(api.post(URL, _photos(11), format="json"), 400)
    assert "4 to 10" in _contract_error(api.post(URL, {"pictures": []}, format="json"), 400)
    bad = _photos(4)
    bad["images"][2]["data"] = "not base64 at all!"
    assert "base64" in _contract_error(api.post(URL, bad, format="json"), 400)
    wrong = _photos(4)
    wrong["images"][0]["media_type"] = "text/plain"
    assert "media_type" in _contract_error(api.post(URL, wrong, format="json"), 400)
    mismatch = _photos(4, fmt="PNG", media_type="image/jpeg")
    assert "image/png" in _contract_error(api.post(URL, mismatch, format="json"), 400)
    broken = _photos(4)
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buf, "JPEG")
    broken["images"][1]["data"] = base64.b64encode(buf.getvalue()[:40]).decode()
    assert "image 2" in _contract_error(api.post(URL, broken, format="json"), 400)
    anonymous = APIClient().post(URL, _photos(4), format="json")
    _contract_error(anonymous, 401)


def test_misconfigured_project_is_a_503_in_the_contract_shape(api, settings, db):
    settings.LOUPE_CAR_PROJECT = "no-such-project"
    assert "LOUPE_CAR_PROJECT" in _contract_error(api.post(URL, _photos(4), format="json"), 503)


def test_an_operator_can_serve_the_car_contract_without_a_token_throttled_per_client_ip(
    cars, settings, trained_version
):
    """LOUPE_CAR_ENDPOINT_PUBLIC: the seed's frontend needs no token; each client IP has its own budget
    (LOUPE_CAR_PUBLIC_RATE), answered in the contract's shape when used up; token clients keep their own."""
    from django.core.cache import cache

    trained_version(cars, epochs=3)
    anonymous = APIClient()
    _contract_error(anonymous.post(URL, _photos(4), format="json"), 401)  # off by default
    settings.LOUPE_CAR_ENDPOINT_PUBLIC = True
    settings.LOUPE_CAR_PUBLIC_RATE = "2/min"
    cache.clear()
    for _ in range(2):
        ok = anonymous.post(URL, _photos(4), format="json", REMOTE_ADDR="203.0.113.7")
        assert ok.status_code == 200 and ok.json()["error"] is None, ok.json()
    limited = anonymous.post(URL, _photos(4), format="json", REMOTE_ADDR="203.0.113.7")
    assert "throttled" in _contract_error(limited, 429).lower() and limited.headers.get("Retry-After")
    other = anonymous.post(URL, _photos(4), format="json", REMOTE_ADDR="198.51.100.9")  # another client
    assert other.status_code == 200
    # Behind nginx (NUM_PROXIES = 1) the client is X-Forwarded-For, which nginx sets: not the proxy's address.
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}  # DRF reloads on setting_changed
    proxy = {"REMOTE_ADDR": "10.0.0.2", "format": "json"}
    for _ in range(2):
        assert anonymous.post(URL, _photos(4), HTTP_X_FORWARDED_FOR="192.0.2.1", **proxy).status_code == 200
    _contract_error(anonymous.post(URL, _photos(4), HTTP_X_FORWARDED_FOR="192.0.2.1", **proxy), 429)
    assert anonymous.post(URL, _photos(4), HTTP_X_FORWARDED_FOR="192.0.2.2", **proxy).status_code == 200
