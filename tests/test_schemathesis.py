"""Property-based API fuzzing: schemathesis generates requests from our OpenAPI schema (valid and invalid) and
no operation may answer with a server error."""

import hypothesis
import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck
from rest_framework.authtoken.models import Token

from labeling.services import project_create
from webapp.wsgi import application

pytestmark = pytest.mark.django_db


@pytest.fixture
def keep_db_connection():
    """Like Django's test client: requests must not close the test transaction's connection."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def test_no_operation_answers_5xx(admin_user, shapes_project, monkeypatch, keep_db_connection):
    from webapp.throttling import TokenRateThrottle

    monkeypatch.setattr(TokenRateThrottle, "THROTTLE_RATES", {"token": "100000/min"})
    shapes_project(2)
    project_create(name="Cars", preset="car", slug="cars")  # the car endpoint's configured project
    raw = SchemaGenerator().get_schema(request=None, public=True)
    schema = schemathesis.openapi.from_dict(raw)
    schema.app = application
    token = Token.objects.create(user=admin_user).key
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(
            max_examples=12,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy())
        def call(case):
            if case.path_parameters and "slug" in case.path_parameters and hash(str(case.query)) % 2:
                case.path_parameters["slug"] = "shapes"  # also reach real objects, not only 404s
            response = case.call(headers={"Authorization": f"Token {token}"})
            assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)

        call()
        checked.append(operation.label)
    assert len(checked) >= 10, checked
