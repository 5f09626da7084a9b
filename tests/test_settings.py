"""Settings come from the environment; production settings pass `check --deploy`."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _manage(*args, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "SECRET_KEY", "DJANGO_ALLOW_ASYNC_UNSAFE")}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_clean_with_debug_off_and_a_real_secret(tmp_path):
    result = _manage(
        "check",
        "--deploy",
        DEBUG="0",
        SECRET_KEY="k" * 20 + "-Zx9_qP3rT7uV1wY5aB8cD2eF6gH0jK4lM",  # long and varied
        ALLOWED_HOSTS="loupe.example.com",
        LOUPE_VAR_DIR=str(tmp_path),
        SECURE_HSTS_SECONDS="31536000",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    issues = re.findall(r"\((\w+\.[WE]\d+)\)", result.stdout + result.stderr)
    # HSTS preload is an opt-in (SECURE_HSTS_PRELOAD=1): submitting a domain to browsers' preload list is hard
    # to undo, so it is the operator's decision. Nothing else may be reported.
    assert set(issues) <= {"security.W021"}, result.stdout + result.stderr


def test_missing_secret_key_in_production_is_a_clear_error(tmp_path):
    result = _manage("check", DEBUG="0", LOUPE_VAR_DIR=str(tmp_path))
    assert result.returncode != 0 and "Set the SECRET_KEY environment variable" in result.stderr


def test_database_and_broker_from_environment(tmp_path):
    code = "from django.conf import settings as s; print(s.DATABASES['default']['NAME'], s.CELERY_BROKER_URL)"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import django, os; os.environ['DJANGO_SETTINGS_MODULE']='webapp.settings'; django.setup(); {code}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "DEBUG": "1",
            "DATABASE_URL": "postgres://u@db:5432/loupedb",
            "CELERY_BROKER_URL": "redis://cache:6379/3",
            "LOUPE_VAR_DIR": str(tmp_path),
        },
    )
    assert result.stdout.split() == ["loupedb", "redis://cache:6379/3"], result.stderr
    embedded = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import django, os; os.environ['DJANGO_SETTINGS_MODULE']='webapp.settings'; django.setup(); {code}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            k: v
            for k, v in {**os.environ, "DEBUG": "1", "LOUPE_VAR_DIR": str(tmp_path)}.items()
            if k not in ("DATABASE_URL", "CELERY_BROKER_URL")
        },
    )
    name, broker = embedded.stdout.split()
    assert name == str(tmp_path / "loupe.sqlite3") and broker == "filesystem://"


def test_docker_compose_describes_the_deployment():
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "web", "worker", "gpu-worker"} <= set(services)
    assert "gunicorn" in services["web"]["command"]
    assert services["worker"]["command"][services["worker"]["command"].index("-Q") + 1] == "default"
    gpu = services["gpu-worker"]
    assert gpu["command"][gpu["command"].index("-Q") + 1] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_training_goes_to_the_gpu_queue_and_index_builds_to_default():
    from webapp.celery import app

    router = app.amqp.router
    assert router.route({}, "training.tasks.train_run")["queue"].name == "gpu"
    assert router.route({}, "training.tasks.index_build")["queue"].name == "default"


def test_check_deploy_clean_with_docker_compose_defaults(tmp_path):
    """`docker compose up` with only SECRET_KEY set: HTTPS redirect and Secure cookies are on by default."""
    from tests.compose import app_environment

    env = app_environment(SECRET_KEY="k" * 20 + "-Zx9_qP3rT7uV1wY5aB8cD2eF6gH0jK4lM")
    result = _manage("check", "--deploy", **env, LOUPE_VAR_DIR=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    issues = re.findall(r"\((\w+\.[WE]\d+)\)", result.stdout + result.stderr)
    assert set(issues) <= {"security.W021"}, result.stdout + result.stderr  # HSTS preload: the operator's opt-in


def test_docker_compose_s3_profile_gives_the_app_an_s3_store(tmp_path):
    """`docker compose --profile s3 up` with the documented .env: MinIO and its bucket, the app on S3."""
    from tests.compose import app_environment, compose

    services = compose()["services"]
    assert services["minio"]["profiles"] == ["s3"] and services["minio-setup"]["profiles"] == ["s3"]
    # migrate waits for the bucket; every app service waits for migrate.
    assert services["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["minio-setup"] == {
        "condition": "service_completed_successfully",
        "required": False,
    }
    env = app_environment(
        SECRET_KEY="k" * 20 + "-Zx9_qP3rT7uV1wY5aB8cD2eF6gH0jK4lM",
        STORAGE_URL="s3://loupe",
        AWS_S3_ENDPOINT_URL="http://minio:9000",
        AWS_ACCESS_KEY_ID="loupe",
        AWS_SECRET_ACCESS_KEY="a-long-secret",  # noqa: S106 - a test value
    )
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "from django.core.files.storage import default_storage as d; "
        "print(d.__class__.__name__, d.bucket_name, d.endpoint_url, s.LOUPE_CACHE_DIR)"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DEBUG", "SECRET_KEY", "STORAGE_URL", "AWS_"))}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, **env, "LOUPE_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "webapp.settings"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["S3Storage", "loupe", "http://minio:9000", "/data/cache"]
    # Without STORAGE_URL the same compose file keeps files on the shared volume, as before.
    env = app_environment(SECRET_KEY="k" * 20 + "-Zx9_qP3rT7uV1wY5aB8cD2eF6gH0jK4lM")
    out = subprocess.run(
        [sys.executable, "-c", code.replace("d.bucket_name, d.endpoint_url, ", "")],
        cwd=ROOT,
        env={**base, **env, "LOUPE_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "webapp.settings"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["FileSystemStorage", "/data/cache"]
