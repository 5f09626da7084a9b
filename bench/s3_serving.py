"""Recognition served from an S3-compatible store vs the local disk (make bench-s3).

One process, one model (mobilenetv3_small_100, the engine default; 224 px, one epoch on generated photos — latency
does not depend on the weights), exported to ONNX, called through Django's WSGI handler as gunicorn calls it
(bench/serving.py's Wsgi: every middleware, token auth, decode, ONNX Runtime, JSON).
  baseline  STORAGE = the local disk (FileSystemStorage): the artifacts in ARTIFACT_ROOT
  ours      STORAGE_URL=s3://… on moto's standalone S3 server on loopback: the artifacts published by the run and
            fetched into an empty ARTIFACT_ROOT/cache by the first request (timed apart: "cold"), then served warm
Two projects with the same model, one per arm; warm requests alternate between the arms request by request (each
with its own store configured), so drift and CPU placement hit both alike.
Also measured, without a target: the same with the project keeping low-confidence photos and a new photo per
request (the photo is then written to the store inside the request: an S3 PUT).
Run: .venv/bin/python -m bench.s3_serving (writes bench/results/s3_serving.json)."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(tempfile.mkdtemp(prefix="loupe-bench-s3-"))
os.environ.update({"DEBUG": "1", "LOUPE_VAR_DIR": str(VAR), "DJANGO_SETTINGS_MODULE": "webapp.settings"})
os.environ["LOUPE_UNCERTAIN_AFTER_PROMOTE"] = "0"  # no worker in this bench
os.environ["LOUPE_API_RATE"] = "1000000/min"
for key in ("DATABASE_URL", "CELERY_BROKER_URL", "STORAGE_URL"):
    os.environ.pop(key, None)
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from bench.common import car_project, metric, table, train_one_epoch, write  # noqa: E402
from bench.serving import Wsgi, pct, photo  # noqa: E402

N_RUNS, ROUNDS = 200, 6


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("moto's S3 server did not start (pip install -r requirements-dev.txt)")
            time.sleep(0.1)


def use_store(storages: dict, artifact_root: Path, cache: Path, *, forget: bool = True) -> None:
    """Switch this process's storage as a restart with other settings would (forget: models reloaded on the next
    request)."""
    from django.core.files.storage import default_storage  # noqa: PLC0415
    from django.core.files.storage import storages as handler  # noqa: PLC0415
    from django.utils.functional import empty  # noqa: PLC0415

    from inference import services  # noqa: PLC0415
    from labeling import storage  # noqa: PLC0415

    settings.STORAGES = storages
    settings.ARTIFACT_ROOT, settings.LOUPE_CACHE_DIR = artifact_root, cache
    handler.__dict__.pop("backends", None)  # a cached_property: what override_settings' signal drops
    handler._backends, handler._storages = None, {}  # noqa: SLF001
    default_storage._wrapped = empty  # noqa: SLF001
    if forget:
        storage._synced.clear()  # noqa: SLF001
        services.forget_all()


def services_forget_contexts() -> None:
    from inference import services  # noqa: PLC0415

    services.forget_project()  # the projects' serving context (thresholds, keep flag) is read again


def main() -> None:
    import boto3  # noqa: PLC0415
    from django.contrib.auth import get_user_model  # noqa: PLC0415
    from rest_framework.authtoken.models import Token  # noqa: PLC0415

    from labeling import storage  # noqa: PLC0415
    from webapp.settings import _default_storage  # noqa: PLC0415

    moto, endpoint = moto_server()
    try:
        call_command("migrate", verbosity=0)
        settings.LOUPE_ACTIVE_MODEL_TTL = 60
        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "localhost"]
        user = get_user_model().objects.create_user("bench", is_staff=True)
        client = Wsgi(Token.objects.create(user=user).key)
        # Two projects with the same model (same photos, same seed): one served from the local disk, one from S3.
        projects, runs = {}, {}
        for arm in ("local", "s3"):
            projects[arm] = car_project(VAR, f"cars-{arm}", photo)
            runs[arm] = train_one_epoch(projects[arm], "mobilenetv3_small_100")
        project, run = projects["s3"], runs["s3"]

        local = {**settings.STORAGES}
        for k, v in {"AWS_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench"}.items():
            os.environ[k] = v
        os.environ["AWS_SECRET_ACCESS_KEY"] = "bench"  # noqa: S105 - moto accepts any key
        os.environ["AWS_S3_REGION_NAME"] = "us-east-1"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",  # noqa: S106
        ).create_bucket(Bucket="loupe-bench")
        s3 = {**local, "default": _default_storage("s3://loupe-bench/loupe")}
        local_art, local_cache = Path(settings.ARTIFACT_ROOT), Path(settings.LOUPE_CACHE_DIR)
        use_store(s3, local_art, local_cache)
        published = storage.artifact_publish(run.artifact_dir)
        s3_art, s3_cache = VAR / "web-host" / "artifacts", VAR / "web-host" / "cache"
        stores = {"local": (local, local_art, local_cache), "s3": (s3, s3_art, s3_cache)}
        urls = {arm: f"/api/v1/projects/{p.slug}/recognize" for arm, p in projects.items()}
        one = {"images": [{"data": base64.b64encode(photo(1000)).decode(), "media_type": "image/jpeg"}]}

        # Cold: an empty cache, the first request fetches the model from S3 (3 times).
        cold = []
        for _ in range(3):
            shutil.rmtree(s3_art, ignore_errors=True)
            shutil.rmtree(s3_cache, ignore_errors=True)
            use_store(*stores["s3"])
            t = time.perf_counter()
            client.post(urls["s3"], one)
            cold.append(time.perf_counter() - t)
            assert (s3_art / project.slug / Path(run.artifact_dir).name / "model.onnx").is_file()
        use_store(*stores["local"], forget=False)
        for _ in range(20):  # warm both
            client.post(urls["local"], one)
        use_store(*stores["s3"], forget=False)
        for _ in range(20):
            client.post(urls["s3"], one)
        # Warm: the two arms interleaved request by request (the order swapped every 50), each with its own store
        # configured, so drift and CPU placement hit both alike.
        samples: dict[str, list[float]] = {"local": [], "s3": []}
        for i in range(2 * N_RUNS * ROUNDS):
            arm = ("local", "s3")[(i + i // 100) % 2]
            use_store(*stores[arm], forget=False)
            t = time.perf_counter()
            client.post(urls[arm], one)
            samples[arm].append(time.perf_counter() - t)
        per_round = [
            f"{arm} {pct(samples[arm][k * N_RUNS : (k + 1) * N_RUNS], 50):.2f}"
            for k in range(ROUNDS)
            for arm in ("local", "s3")
        ]

        # Keeping low-confidence photos, a new photo each request: the S3 arm writes it to the store in the request.
        from labeling.models import Project  # noqa: PLC0415

        Project.objects.filter(pk__in=[p.pk for p in projects.values()]).update(keep_low_confidence_photos=True)
        services_forget_contexts()
        fresh = iter(range(10_000, 20_000))
        keep: dict[str, list[float]] = {"local": [], "s3": []}
        for i in range(200):
            arm = ("local", "s3")[i % 2]
            use_store(*stores[arm], forget=False)
            body = {"images": [{"data": base64.b64encode(photo(next(fresh))).decode(), "media_type": "image/jpeg"}]}
            t = time.perf_counter()
            client.post(urls[arm], body)
            keep[arm].append(time.perf_counter() - t)
        from inference.models import Recognition  # noqa: PLC0415

        kept = Recognition.objects.count()
    finally:
        moto.terminate()
        moto.wait(10)

    l50, s50 = pct(samples["local"], 50), pct(samples["s3"], 50)
    metrics = {
        "recognise_p50_ms (s3, warm)": metric(
            s50,
            "ms",
            "the same endpoint on the local disk",
            l50,
            target="within 10% of the local disk",
            met=abs(s50 - l50) <= 0.10 * l50,
        ),
        "recognise_p95_ms (s3, warm)": metric(
            pct(samples["s3"], 95), "ms", "the same endpoint on the local disk (p95)", pct(samples["local"], 95)
        ),
        "first_request_ms (s3, empty cache)": metric(min(cold) * 1000, "ms", "warm p50 on S3", s50),
        "recognise_keep_photos_p50_ms (s3)": metric(
            pct(keep["s3"], 50), "ms", "the same, local disk", pct(keep["local"], 50)
        ),
    }
    notes = (
        f"{N_RUNS * ROUNDS} requests per arm, interleaved one by one, after 20 warm-up requests each; "
        f"{published} artifact files published; moto {__import__('moto').__version__} standalone server on "
        f"loopback (no network latency: a LAN or cloud store adds its round trip to the cold fetch and to "
        f"kept-photo writes, not to warm "
        f"requests). Keep-photos arms: 100 requests each, interleaved, {kept} recognitions kept in all. p50 per "
        f"{N_RUNS} requests (ms): " + ", ".join(per_round)
    )
    path = write("s3_serving", metrics, notes)
    print(table(metrics))
    print(f"\n{notes}\nwritten to {path}")


if __name__ == "__main__":
    main()
