"""Self-hosting basics: the API docs need no internet, and errors have styled pages (JSON under /api/)."""

import json
import re
from urllib.parse import urlsplit

import pytest
from django.test import RequestFactory
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_api_docs_load_every_asset_from_this_server(client, settings):
    settings.DEBUG = False
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "cdn" not in html.lower(), "Swagger UI must not come from a CDN (blank page on an offline network)"
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assets = [r for r in refs if r.endswith((".js", ".css", ".png"))]
    assert any("swagger-ui-bundle" in a for a in assets) and any(a.endswith(".css") for a in assets), refs
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.netloc and parts.scheme in ("", "data"), f"external reference in /api/docs/: {ref}"
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert b"".join(served.streaming_content if served.streaming else [served.content]), asset


def test_reviewer_on_an_admin_page_gets_the_styled_403_with_the_reason(client, settings, reviewer, shapes_project):
    settings.DEBUG = False
    project = shapes_project(1)
    client.force_login(reviewer)
    response = client.get(reverse("labeling:import", args=[project.slug]))
    assert response.status_code == 403
    html = response.content.decode()
    assert "Only admins can do this." in html
    assert "loupe/app.css" in html and 'class="brand"' in html, "not the site's styled page: " + html[:200]
    assert "reviewer" in html  # the site's header, with the logged-in account


def test_unknown_page_gets_the_styled_404(client, settings, reviewer):
    settings.DEBUG = False
    client.force_login(reviewer)
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    html = response.content.decode()
    assert "loupe/app.css" in html and "Not found" in html and "/no-such-page/" in html
    assert "Resolver404" not in html


def test_api_path_that_does_not_exist_answers_json_in_the_error_shape(client, settings, admin_user):
    settings.DEBUG = False
    client.force_login(admin_user)
    response = client.post("/api/ai/detect-car-vision/", {}, content_type="application/json")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "not_found" and error["details"] is None
    assert "Did you mean /api/ai/detect-car-vision?" in error["message"]
    response = client.get("/api/v1/no-such-thing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert "Did you mean" not in response.json()["error"]["message"]


def test_server_error_pages_need_no_request_context_or_database(settings, django_assert_num_queries):
    from webapp import urls
    from webapp.errors import server_error

    settings.DEBUG = False
    assert urls.handler500 == "webapp.errors.server_error"
    with django_assert_num_queries(0):
        page = server_error(RequestFactory().get("/p/cars/"))
        api = server_error(RequestFactory().post("/api/v1/projects/cars/recognize"))
    assert page.status_code == 500 and b"Server error" in page.content and b"<style>" in page.content
    assert api.status_code == 500 and api["Content-Type"] == "application/json"
    assert json.loads(api.content) == {
        "error": {"code": "server_error", "message": "Server error; it has been logged.", "details": None}
    }


def test_unhandled_exception_in_a_page_renders_the_500_page(client, settings, reviewer, monkeypatch):
    from labeling import views

    def boom(*_args, **_kwargs):
        raise RuntimeError("a bug")

    settings.DEBUG = False
    monkeypatch.setattr(views.selectors, "project_list_with_counts", boom)
    client.raise_request_exception = False
    client.force_login(reviewer)
    response = client.get(reverse("labeling:project-list"))
    assert response.status_code == 500 and b"Server error (500)" in response.content
