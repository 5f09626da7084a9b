"""A promote under concurrent requests: every request succeeds and is answered wholly by one version — the old
one before the switch, the new one after — never a failure and never a mix."""

import base64
import threading
import time

import pytest
from django.db import connection
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import make_photo
from pipeline import chain

pytestmark = pytest.mark.django_db(transaction=True)


def test_promote_under_concurrent_requests(shapes_project, admin_user, settings, monkeypatch, trained_version):
    from webapp.throttling import TokenRateThrottle

    monkeypatch.setattr(TokenRateThrottle, "THROTTLE_RATES", {"token": "1000000/min"})  # not what this tests
    settings.LOUPE_ACTIVE_MODEL_TTL = 0  # every request asks which version is active
    project = shapes_project(6)
    v1 = trained_version(project)
    v2 = trained_version(project, epochs=3, seed=7)
    token = Token.objects.create(user=admin_user).key
    url = reverse("inference:recognize", args=[project.slug])
    payload = {"images": [{"data": base64.b64encode(make_photo("green", seed=5)).decode(), "media_type": "image/jpeg"}]}

    def answer(client):
        response = client.post(url, payload, format="json")
        return response.status_code, response.json()

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    status, expected_v1 = answer(client)
    assert status == 200 and expected_v1["model_version"] == 1

    results: list[tuple[int, dict]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker():
        c = APIClient()
        c.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        try:
            while not stop.is_set():
                results.append(answer(c))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()  # this thread's own database connection

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    chain.model_version_promote(version=v2, user=admin_user, inline=True)  # index build + switch
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(b["model_version"] == 2 for _, b in results[-8:]):
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    status, expected_v2 = answer(client)
    assert status == 200 and expected_v2["model_version"] == 2

    assert results and all(s == 200 for s, _ in results), [b for s, b in results if s != 200][:3]
    versions = [b["model_version"] for _, b in results]
    assert set(versions) == {1, 2}
    for _, body in results:  # each answer is exactly what its version answers alone: no mixed model
        expected = expected_v1 if body["model_version"] == 1 else expected_v2
        assert body["heads"] == expected["heads"]
    v1.refresh_from_db()
    assert not v1.is_active
