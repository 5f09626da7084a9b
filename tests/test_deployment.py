"""How Loupe faces the network (docker-compose.yml + deploy/nginx.conf): nginx in front of gunicorn, on loopback."""

import http.client
import os
import re
import signal
import subprocess
import sys

import pytest

from bench import slow_clients
from bench.common import free_port, start_gunicorn
from tests.compose import ROOT, app_environment, compose

SECRET = "k" * 20 + "-Zx9_qP3rT7uV1wY5aB8cD2eF6gH0jK4lM"


def test_only_nginx_is_published_and_it_proxies_to_gunicorn():
    services = compose()["services"]
    assert "ports" not in services["web"], "gunicorn's sync workers must not face clients directly"
    assert services["web"]["expose"] == ["8000"] and "0.0.0.0:8000" in services["web"]["command"]
    nginx = services["nginx"]
    assert [p.split(":")[-1] for p in nginx["ports"]] == ["80"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert [s for s, svc in services.items() if "ports" in svc] == ["nginx"]
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"(?m)^\s*server web:8000;", conf) and re.search(r"(?m)^\s*listen 80;", conf)


def test_nginx_takes_the_largest_request_the_app_takes(settings):
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    size = re.search(r"(?m)^\s*client_max_body_size (\d+)m;", conf)
    assert size and int(size.group(1)) * 2**20 >= settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    biggest_json = settings.LOUPE_MAX_IMAGES_PER_REQUEST * settings.LOUPE_MAX_IMAGE_BYTES * 4 // 3  # base64
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE >= biggest_json
    assert re.search(r"(?m)^\s*proxy_request_buffering on;", conf) and re.search(r"(?m)^\s*proxy_buffering on;", conf)


@pytest.fixture
def web_tier(tmp_path):
    """gunicorn (docker-compose.yml's command and environment, SQLite and folders under tmp_path instead of the
    compose services, which /healthz does not use) and nginx with deploy/nginx.conf in front, on loopback ports."""
    if not slow_clients.find_nginx():
        pytest.skip("nginx not found; `make nginx` (part of `make test`) installs the Debian package")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "LOUPE_", "SECURE_", "CSRF_"))}
    env.update(app_environment(SECRET_KEY=SECRET))
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CELERY_BROKER_URL="filesystem://",
        LOUPE_VAR_DIR=str(tmp_path),
        MEDIA_ROOT=str(tmp_path / "media"),
        ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        IMPORT_ROOTS=str(tmp_path / "import"),
    )
    gport, nport = free_port(), free_port()
    gunicorn = start_gunicorn(gport, env)
    try:
        nginx, workdir = slow_clients.start_nginx(gport, nport)
        try:
            yield nport, gport, env
        finally:
            slow_clients.stop_nginx(nginx, workdir)
    finally:
        os.killpg(gunicorn.pid, signal.SIGKILL)  # a throwaway server: no need to wait for its workers
        gunicorn.wait(timeout=30)


def _get(port, path, **headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_healthz_stays_fast_behind_nginx_while_20_slow_clients_hold_connections(web_tier):
    nport, gport, env = web_tier
    # The secure defaults work behind the proxy: plain HTTP is sent to https:// once; what the TLS proxy forwards
    # (X-Forwarded-Proto: https, believed from loopback) is served, no redirect loop.
    plain = _get(nport, "/healthz")
    assert plain.status == 301 and plain.getheader("Location") == f"https://127.0.0.1:{nport}/healthz"
    assert _get(nport, "/healthz", **{"X-Forwarded-Proto": "https"}).status == 200
    # the web service's healthcheck, as docker-compose.yml runs it (against gunicorn's port)
    check = compose()["services"]["web"]["healthcheck"]["test"][3].replace(":8000/", f":{gport}/")
    assert subprocess.run([sys.executable, "-c", check], env=env, timeout=30).returncode == 0

    result = slow_clients.measure(nport, gport, clients=20, count=100, settle=1.5, direct_timeout=1.0, direct_budget=4)
    through, direct = result["nginx"], result["gunicorn"]
    assert through["requests"] == 100 and through["failed"] == 0, result
    assert through["slow_open"] == 20, result
    assert through["p99"] < 1.0, result
    # the baseline, same slow clients straight at gunicorn (how docker-compose.yml published it before): stuck
    assert direct["failed"] > 0 and direct["p99"] >= 1.0, result


def test_the_gpu_worker_gets_the_image_with_onnxruntimes_cuda_provider():
    """docker-compose's gpu-worker builds the Dockerfile's `gpu` target (onnxruntime-gpu from requirements-gpu.txt
    instead of the CPU wheel); every other service builds the default, last stage."""
    services = compose()["services"]
    assert services["gpu-worker"]["build"] == {"context": ".", "target": "gpu"}
    assert services["web"]["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert stages == ["base", "gpu", "cpu"]  # the last stage is the default target
    gpu = dockerfile.split("FROM base AS gpu", 1)[1].split("FROM ", 1)[0]
    assert "pip uninstall -y onnxruntime" in gpu and "requirements-gpu.txt" in gpu
    pins = (ROOT / "requirements-gpu.txt").read_text()
    assert "onnxruntime-gpu==" in pins
