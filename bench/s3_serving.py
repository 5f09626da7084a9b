"""Recognition served from an S3-compatible store vs the local disk (make bench-s3).

One process, one model (mobilenetv3_small_100, the engine default; 224 px, one epoch on generated photos — latency
does not depend on the weights), exported to ONNX, called through Django's WSGI handler as gunicorn calls it
(bench/serving.py's Wsgi: every middleware, token auth, decode, ONNX Runtime, JSON).
  baseline  STORAGE = the local disk (FileSystemStorage): the artifacts in ARTIFACT_ROOT
  ours      STORAGE_URL=s3://… on moto's standalone S3 server on loopback: the artifacts published by the run and
            fetched into an empty ARTIFACT_ROOT/cache by the first request (timed apart: "cold"), then served warm
The arms alternate, each going first every other round (N_RUNS requests per arm and round), so drift and
warm-up order hit both alike.
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
from bench.serving import Wsgi, pct, photo, timed  # noqa: E402

N_RUNS, ROUNDS = 200, 4


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


def use_store(storages: dict, artifact_root: Path, cache: Path) -> None:
    """Switch this process's storage as a restart with other settings would (models reloaded on next request)."""
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
    storage._synced.clear()  # noqa: SLF001
    services.forget_all()


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
        project = car_project(VAR, "cars", photo)
        run = train_one_epoch(project, "mobilenetv3_small_100")

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

        url = f"/api/v1/projects/{project.slug}/recognize"
        one = {"images": [{"data": base64.b64encode(photo(1000)).decode(), "media_type": "image/jpeg"}]}
        samples: dict[str, list[float]] = {"local": [], "s3": []}
        cold = []
        per_round = []
        for r in range(ROUNDS):
            for arm in ("local", "s3") if r % 2 == 0 else ("s3", "local"):  # each arm goes first every other round
                if arm == "local":
                    use_store(local, local_art, local_cache)
                else:
                    shutil.rmtree(s3_art, ignore_errors=True)
                    shutil.rmtree(s3_cache, ignore_errors=True)
                    use_store(s3, s3_art, s3_cache)  # an empty cache: the first request fetches the model
                    t = time.perf_counter()
                    client.post(url, one)
                    cold.append(time.perf_counter() - t)
                    fetched = s3_art / project.slug / Path(run.artifact_dir).name / "model.onnx"
                    assert fetched.is_file(), "the S3 arm must serve the model it fetched"
                got = timed(lambda: client.post(url, one), n=N_RUNS)
                samples[arm] += got
                per_round.append(f"{arm} {pct(got, 50):.2f}")

        # Keeping low-confidence photos, a new photo each request: the S3 arm writes it to the store in the request.
        project.keep_low_confidence_photos = True
        project.save(update_fields=["keep_low_confidence_photos"])
        fresh = iter(range(10_000, 20_000))
        keep: dict[str, list[float]] = {}
        for arm, stores in (("local", (local, local_art, local_cache)), ("s3", (s3, s3_art, s3_cache))):
            use_store(*stores)
            keep[arm] = timed(
                lambda: client.post(
                    url,
                    {"images": [{"data": base64.b64encode(photo(next(fresh))).decode(), "media_type": "image/jpeg"}]},
                ),
                n=100,
            )
        from inference.models import Recognition  # noqa: PLC0415

        kept = Recognition.objects.filter(project=project).count()
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
        f"{ROUNDS} alternating rounds of {N_RUNS} requests per arm after 20 warm-up requests; {published} artifact "
        f"files published; moto {__import__('moto').__version__} standalone server on loopback (no network latency: "
        f"a LAN or cloud store adds its round trip to the cold fetch and to kept-photo writes, not to warm "
        f"requests). Keep-photos arm: 100 requests each, {kept} recognitions kept in all. p50 per round (ms): "
        + ", ".join(per_round)
    )
    path = write("s3_serving", metrics, notes)
    print(table(metrics))
    print(f"\n{notes}\nwritten to {path}")


if __name__ == "__main__":
    main()
