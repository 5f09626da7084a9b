"""docs/examples/rest_loop.py, run for real: import -> label -> retrain -> promote -> recognise over REST only,
against a live server and a real Celery worker (issue 17.1)."""

import importlib.util
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token

from conftest import TINY_TRAIN, make_photo
from training.models import ModelVersion

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]
EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "rest_loop.py"


def _example():
    spec = importlib.util.spec_from_file_location("rest_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rest_example_drives_the_whole_loop(live_server, admin_user, worker, tmp_path, settings):
    photos = tmp_path / "photos"
    for color, shape in (("red", "square"), ("blue", "circle"), ("green", "square")):
        folder = photos / color
        folder.mkdir(parents=True)
        for g in range(4):
            for s in range(2):
                (folder / f"{color}{g}_{s}.jpg").write_bytes(make_photo(color, shape, seed=g * 10 + s))
    token = Token.objects.create(user=admin_user).key
    lines = []
    out = _example().run(
        live_server.url,
        token,
        photos,
        config={**TINY_TRAIN, "epochs": 3},
        settings={"min_image_side": 32},
        timeout=300,
        log=lines.append,
    )
    assert out["run"]["status"] == "succeeded"
    assert ModelVersion.objects.get(project__slug="rest-demo", is_active=True).number == out["version"]
    assert out["answer"]["heads"]["color"]["label"] in (None, "red", "blue", "green")
    assert any("uploaded 8 red photo(s)" in line for line in lines), lines
