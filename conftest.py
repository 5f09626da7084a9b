"""Shared fixtures: isolated media/artifact folders, users, small generated photos."""

import io
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image as PILImage
from PIL import ImageDraw

from training.engine.synthetic import TINY_TEST_CONFIG

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 210, 40)}
# The one tiny training config (training.engine.synthetic): the tests that train through the services use batches of 16.
TINY_TRAIN = {**TINY_TEST_CONFIG, "batch_size": 16}
# The one tiny shelf detector (training.engine.detection) of the tests: recall >= 0.8 on its own photos at score 0.3.
TINY_DETECTOR = {
    "min_size": 192,
    "max_size": 256,
    "epochs": 30,
    "batch_size": 2,
    "lr": 1e-3,
    "warmup_steps": 5,
    "device": "cpu",
    "score_threshold": 0.3,
    "seed": 0,
    # the head the tiny run's bar was measured with (the defaults are larger: more time per step on 6 photos)
    "box_head_dim": 256,
    "roi_batch": 128,
}


@pytest.fixture(autouse=True)
def _isolated_files(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    settings.IMPORT_ROOTS = [tmp_path / "import"]
    settings.LOUPE_EXPORT_ROOT = tmp_path / "exports"
    # No hub downloads in tests (no network in CI); so no tail fine-tune (it needs pretrained weights) either.
    settings.LOUPE_TRAIN_OVERRIDES = {"pretrained": False, "tail_from_block": None}
    settings.LOUPE_MISLABEL_AFTER_PROMOTE = False  # K fold trainings after every promote: only where a test asks
    settings.LOUPE_UNCERTAIN_AFTER_PROMOTE = False  # re-ranking every unlabeled photo after each promote: likewise
    settings.LOUPE_AUTO_PROMOTE = "first"  # the promote gate auto-promotes later models only where a test asks
    # The health scan's similarity pass embeds every photo with a pretrained backbone: only where a test asks.
    settings.LOUPE_SCAN_SIMILARITY = False
    settings.LOUPE_FEATURE_CACHE = tmp_path / "feature-cache"
    settings.LOUPE_CACHE_DIR = tmp_path / "cache"
    (tmp_path / "import").mkdir()
    from django.core.cache import cache

    from inference import services
    from webapp.authentication import forget_tokens

    services.forget_all()
    forget_tokens()
    cache.clear()  # throttle counters of earlier tests
    yield
    services.forget_all()
    forget_tokens()


def make_photo(color: str, shape: str = "square", *, size: int = 64, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A small synthetic photo: a coloured shape on a noisy grey background."""
    rng = random.Random(f"{color}-{shape}-{size}-{seed}")
    base = rng.randint(90, 160)
    img = PILImage.new("RGB", (size, size), (base, base, base))
    px = img.load()
    for _ in range(size * 2):
        x, y = rng.randrange(size), rng.randrange(size)
        v = rng.randint(60, 200)
        px[x, y] = (v, v, v)
    draw = ImageDraw.Draw(img)
    m = rng.randint(size // 8, size // 4)
    box = (m, m, size - m + rng.randint(-3, 3), size - m + rng.randint(-3, 3))
    fill = COLORS[color]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.ellipse(box, fill=fill)
    out = io.BytesIO()
    img.save(out, fmt, quality=92) if fmt == "JPEG" else img.save(out, fmt)
    return out.getvalue()


@pytest.fixture
def photo_folder(tmp_path):
    """import/<color>/<ID>_<seq>.jpg: 4 colours × 6 groups × 2 photos."""

    def build(colors=("red", "blue", "green", "yellow"), groups: int = 6, per_group: int = 2, root: Path | None = None):
        root = root or tmp_path / "import" / "folder"
        for color in colors:
            for g in range(groups):
                for s in range(per_group):
                    p = root / color / f"{color[:1].upper()}{g:03d}_{s}.jpg"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(make_photo(color, seed=g * 10 + s, size=64))
        return root

    return build


@pytest.fixture
def shapes_project(photo_folder):
    """A `retrieval` project with photo_folder's colours imported; call with the number of groups per colour."""

    def build(groups: int):
        from labeling import importers
        from labeling.services import project_create

        project = project_create(name="Shapes", preset="retrieval")
        project.min_image_side = 32  # the test photos are 64 px
        project.save(update_fields=["min_image_side"])
        rows, report = importers.plan_folder(photo_folder(groups=groups), head=project.heads.get())
        assert importers.images_import(project=project, rows=rows, report=report).written
        return project

    return build


CARS = (  # make, model, the colour and shape of its photos
    ("Toyota", "Corolla", "red", "square"),
    ("Toyota", "Yaris", "blue", "square"),
    ("Honda", "Civic", "green", "circle"),
)


@pytest.fixture
def car_project():
    """A `car` project (make -> model: Toyota (Corolla, Yaris), Honda (Civic)); call it with the number of groups
    per model and photos per group. Photo `s` of group `g` of a model is `<model><g>_<s>.jpg` in group
    `<model><g>`, labeled with its make and model, one colour and shape per model (CARS). Its classes exist
    even with no photos (groups=0)."""
    from labeling.tests.factories import ImageFactory, LabelClassFactory, ProjectFactory

    def build(groups: int = 6, per_group: int = 2, *, name: str = "Cars", slug: str | None = "cars"):
        project = ProjectFactory(name=name, slug=slug, preset="car", min_image_side=32)  # the photos are 64 px
        make, model = project.heads.get(name="make"), project.heads.get(name="model")
        makes, models = {}, {}
        for make_name, model_name, _, _ in CARS:
            if make_name not in makes:
                makes[make_name] = LabelClassFactory(head=make, name=make_name)
            models[model_name] = LabelClassFactory(head=model, name=model_name, parent=makes[make_name])
        n = 0
        for make_name, model_name, color, shape in CARS:
            for g in range(groups):
                for s in range(per_group):
                    ImageFactory(
                        project=project,
                        color=color,
                        shape=shape,
                        seed=n,
                        original_name=f"{model_name}{g}_{s}.jpg",
                        group_key=f"{model_name}{g}",
                        labels={"make": makes[make_name], "model": models[model_name]},
                    )
                    n += 1
        return project

    return build


@pytest.fixture
def trained_version():
    """Train a model on a project and return its ModelVersion: call it with the project and any config keys over
    TINY_TRAIN. The run is executed inline (as the worker does: index, first model promoted) and must succeed."""

    def train(project, **config):
        from pipeline import chain
        from training import services
        from training.models import ModelVersion

        run = services.training_run_create(project=project, config={**TINY_TRAIN, **config}, queue=False)
        run = chain.training_run_execute(run_id=run.id, inline=True)
        assert run.status == "succeeded", run.error
        return ModelVersion.objects.get(run=run)  # as the database has it now (promoted or not)

    return train


@pytest.fixture
def token_client():
    """An API client authenticated as `user` with a fresh API token: token_client(user)."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    def make(user) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
        return client

    return make


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_user("admin", password="admin-pass-123", is_staff=True, is_superuser=True)


@pytest.fixture
def reviewer(django_user_model):
    return django_user_model.objects.create_user("reviewer", password="reviewer-pass-123")


@pytest.fixture
def worker(settings):
    """A real Celery worker (thread, solo pool) on the configured broker, consuming both queues."""
    from celery.contrib.testing.worker import start_worker

    from webapp.celery import app

    settings.CELERY_TASK_ALWAYS_EAGER = False
    with app.connection_for_write() as conn:  # drop messages left by an earlier, interrupted run
        for queue in ("default", "gpu"):
            conn.default_channel.queue_purge(queue)
    with start_worker(
        app, pool="solo", concurrency=1, perform_ping_check=False, queues=["default", "gpu"], shutdown_timeout=30
    ):
        yield


# --- S3: a real S3-compatible HTTP server (moto's standalone server) on loopback, one per test session -----------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The endpoint URL of a moto S3 server process on 127.0.0.1 (stopped at the end of the session)."""
    pytest.importorskip("storages", reason="django-storages is not installed (requirements.txt)")
    pytest.importorskip("moto", reason="moto[server] is not installed (requirements-dev.txt)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start (see {log.name})") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def s3_store(s3_server, settings, monkeypatch):
    """The default storage switched to a fresh bucket of the moto server, exactly as STORAGE_URL=s3://… does in
    production (webapp.settings._default_storage). Returns the environment a subprocess needs for the same store."""
    import boto3

    from labeling import storage
    from webapp.settings import _default_storage

    bucket = f"loupe-{uuid.uuid4().hex[:12]}"
    env = {
        "STORAGE_URL": f"s3://{bucket}/loupe",
        "AWS_S3_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_S3_REGION_NAME": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="x"
    ).create_bucket(Bucket=bucket)
    settings.STORAGES = {**settings.STORAGES, "default": _default_storage(env["STORAGE_URL"])}
    storage._synced.clear()
    yield {**env, "bucket": bucket}
    storage._synced.clear()
