"""Storage beyond one disk, end to end on real processes: photos imported into an S3-compatible store (moto's
standalone server on loopback), a Celery worker with its own disk trains and builds the index from them, and a
gunicorn web process with its own empty cache serves the promoted model — then sees the next promote. No two of
these processes share a media or artifact folder."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.db import connection
from rest_framework.authtoken.models import Token

from conftest import TINY_TRAIN, make_photo
from pipeline import chain
from tests.workers import ROOT, free_port, wait, worker_process
from training import services
from training.models import ModelVersion, TrainingRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def _machine(tmp_path: Path, name: str) -> dict:
    """The folders of one machine: nothing in them is seen by the others."""
    root = tmp_path / name
    return {
        "MEDIA_ROOT": str(root / "media"),
        "ARTIFACT_ROOT": str(root / "artifacts"),
        "LOUPE_CACHE_DIR": str(root / "cache"),
        "LOUPE_FEATURE_CACHE": str(root / "feature-cache"),
        "LOUPE_VAR_DIR": str(root / "var"),
    }


def _gunicorn(port: int, env: dict, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gunicorn", "webapp.wsgi:application", "--bind", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*cmd, "--workers", "1", "--timeout", "120"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def up() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            return False

    wait(up, timeout=90, what="gunicorn", every=0.3)
    return proc


def _recognise(port: int, slug: str, token: str) -> dict:
    photo = {"data": base64.b64encode(make_photo("green", seed=5)).decode(), "media_type": "image/jpeg"}
    body = json.dumps({"images": [photo]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        f"/api/v1/projects/{slug}/recognize",
        body=body,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200, data
    return data


def _trained(run_id: int) -> TrainingRun:
    run = wait(
        lambda: TrainingRun.objects.filter(pk=run_id, status__in=["succeeded", "failed"]).first(),
        timeout=300,
        what="the run on the worker",
        every=0.5,
    )
    assert run.status == "succeeded", run.error
    return run


def test_worker_and_web_share_nothing_but_the_store(s3_store, broker, shapes_project, admin_user, settings, tmp_path):
    project = shapes_project(4)  # imported by this process: straight into the bucket
    assert not Path(settings.MEDIA_ROOT).exists()
    stored = {o.key.split("/")[1] for o in default_storage.bucket.objects.all()}
    assert stored == {"images"}
    token = Token.objects.create(user=admin_user).key
    db = connection.settings_dict
    database_url = (
        f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    )
    gpu = _machine(tmp_path, "gpu-host")
    # Only the first model is promoted by the worker: the second one by an admin, below.
    worker = worker_process(tmp_path, broker.url, "s3-worker", settings, env={**gpu, "LOUPE_AUTO_PROMOTE": "first"})
    try:
        run = _trained(services.training_run_create(project=project, config=TINY_TRAIN).id)
        v1 = wait(
            lambda: ModelVersion.objects.filter(run=run, is_active=True, index_status="ready").first(),
            timeout=120,
            what="v1 promoted with its index",
        )
        keys = {o.key for o in default_storage.bucket.objects.filter(Prefix=f"loupe/artifacts/{project.slug}/")}
        prefix = f"loupe/artifacts/{project.slug}/run-{run.id}/"
        for name in ("model.pt", "model.onnx", "label_maps.json", "metrics.json", "calibration.json", "index.json"):
            assert prefix + name in keys, sorted(keys)
        assert not any("/checkpoints/" in k for k in keys)  # the worker's resume state stays on the worker
        # The worker read the photos through its own cache, keyed by content.
        assert list(Path(gpu["LOUPE_CACHE_DIR"], "blobs").rglob("*.jpg"))
        run2 = _trained(services.training_run_create(project=project, config={**TINY_TRAIN, "seed": 7}).id)
        v2 = ModelVersion.objects.get(run=run2)
        assert not v2.is_active
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    # The GPU host is gone with its disk: what it made lives in the store only.
    assert v1.artifact_dir.startswith(gpu["ARTIFACT_ROOT"])  # the database names the worker's folder
    shutil.rmtree(tmp_path / "gpu-host")

    web_host = _machine(tmp_path, "web-host")
    env = {
        **os.environ,
        **web_host,
        "DEBUG": "1",
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker.url,
        "LOUPE_ACTIVE_MODEL_TTL": "0.2",
    }
    port = free_port()
    web = _gunicorn(port, env, tmp_path / "web.log")
    try:
        answer = _recognise(port, project.slug, token)
        assert answer["model_version"] == 1 and "class" in answer["heads"]
        fetched = Path(web_host["ARTIFACT_ROOT"]) / project.slug / f"run-{run.id}"
        assert (fetched / "model.pt").is_file() and (fetched / "index.faiss").is_file()
        assert not Path(web_host["MEDIA_ROOT"]).exists()

        # The second model, promoted by an admin from a third machine (this process: its index is built here from
        # the store's photos and published): the web process serves it without a restart.
        chain.model_version_promote(version=v2, user=admin_user, inline=True, confirm_drop=True)
        v2.refresh_from_db()
        assert v2.is_active and v2.index_status == "ready", v2.index_error
        answer = wait(
            lambda: (a := _recognise(port, project.slug, token))["model_version"] == 2 and a,
            timeout=30,
            what="the web process to serve v2",
            every=0.3,
        )
        assert "class" in answer["heads"]
        assert (Path(web_host["ARTIFACT_ROOT"]) / project.slug / f"run-{run2.id}" / "index.faiss").is_file()
    finally:
        os.killpg(web.pid, signal.SIGKILL)
        web.wait(10)
