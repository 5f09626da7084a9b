"""Serving latency on this CPU (make bench-serving).

Two models (efficientnet_b0, the presets' backbone, and mobilenetv3_small_100, the engine default; 224 px, trained
for one epoch on generated photos — latency does not depend on the weights),
exported to ONNX. Measured in one process, one intra-op thread (the serving default):
  floor   onnxruntime session.run on an already preprocessed 1x3x224x224 tensor
  torch   the same model in torch eager on the same tensor
  ours    POST /api/v1/projects/<slug>/recognize with one 224 px JPEG through Django + DRF (in-process client:
          decode, preprocessing, ONNX Runtime, thresholds, Faiss neighbours, JSON), and the car endpoint
          POST /api/ai/detect-car-vision with 10 photos.
Run: .venv/bin/python -m bench.serving (writes bench/results/serving.json)."""

from __future__ import annotations

import base64
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(tempfile.mkdtemp(prefix="loupe-bench-serving-"))
os.environ.update({"DEBUG": "1", "LOUPE_VAR_DIR": str(VAR), "DJANGO_SETTINGS_MODULE": "webapp.settings"})
os.environ["LOUPE_UNCERTAIN_AFTER_PROMOTE"] = "0"  # no worker in this bench
os.environ["LOUPE_API_RATE"] = "1000000/min"  # the throttle still runs (its cost is measured), it never refuses
os.environ.pop("DATABASE_URL", None)
os.environ.pop("CELERY_BROKER_URL", None)
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import car_project, metric, table, train_one_epoch, write  # noqa: E402

N_WARM, N_RUNS = 20, 200


def pct(samples, q):
    return float(np.percentile(np.asarray(samples) * 1000, q))


def timed(fn, n=N_RUNS):
    for _ in range(N_WARM):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def photo(seed: int, size: int = 224) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


BACKBONES = (
    ("efficientnet_b0", "the car/sku/lego/retrieval presets' backbone"),
    ("mobilenetv3_small_100", "the engine default and the demo's; ~1 ms, so fixed per-request costs dominate"),
)


def measure(backbone: str, client) -> dict:
    """Train one epoch of `backbone`, promote it, and time floor / torch eager / endpoint / car endpoint."""
    from inference import services as inference_services
    from inference.core import Recognizer
    from training.engine.data import normalize_batch

    project = car_project(VAR, "cars-" + backbone.split("_")[0], photo)
    art = Path(train_one_epoch(project, backbone).artifact_dir)

    rec = Recognizer.load(art, num_threads=1)
    assert rec.backend == "onnx", "the version should have model.onnx"
    x = normalize_batch(rec._batch([Image.open(io.BytesIO(photo(999)))]), rec.mean, rec.std).contiguous()
    x_np = x.numpy()
    floor = timed(lambda: rec.session.run(rec._onnx_outputs, {"images": x_np}))
    torch_rec = Recognizer.load(art, num_threads=1, backend="torch")

    def eager():
        with torch.inference_mode():
            torch_rec.model(x)

    eager_t = timed(eager)
    url = f"/api/v1/projects/{project.slug}/recognize"
    one = {"images": [{"data": base64.b64encode(photo(1000)).decode(), "media_type": "image/jpeg"}]}
    inference_services.forget_all()

    def endpoint():
        r = client.post(url, one, format="json")
        assert r.status_code == 200, r.content

    ours = timed(endpoint)
    ten = {
        "images": [{"data": base64.b64encode(photo(2000 + i)).decode(), "media_type": "image/jpeg"} for i in range(10)]
    }
    settings.LOUPE_CAR_PROJECT = project.slug

    def car():
        r = client.post("/api/ai/detect-car-vision", ten, format="json")
        assert r.status_code == 200, r.content

    car_t = timed(car, n=100)
    return {"floor": floor, "eager": eager_t, "ours": ours, "car": car_t}


def main() -> None:
    from django.contrib.auth import get_user_model
    from rest_framework.test import APIClient

    call_command("migrate", verbosity=0)
    settings.LOUPE_ACTIVE_MODEL_TTL = 60
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    from rest_framework.authtoken.models import Token

    user = get_user_model().objects.create_user("bench", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")  # real token auth

    metrics = {}
    for backbone, _why in BACKBONES:
        t = measure(backbone, client)
        floor50, ours50, eager50 = pct(t["floor"], 50), pct(t["ours"], 50), pct(t["eager"], 50)
        car50 = pct(t["car"], 50)
        metrics |= {
            f"{backbone}: endpoint_p50_ms": metric(
                ours50,
                "ms",
                "raw onnxruntime session.run, same tensor (floor)",
                floor50,
                target="<= 1.3x the floor",
                met=ours50 <= 1.3 * floor50,
            ),
            f"{backbone}: endpoint_p99_ms": metric(
                pct(t["ours"], 99), "ms", "raw onnxruntime session.run p99", pct(t["floor"], 99)
            ),
            f"{backbone}: endpoint_overhead_p50_ms": metric(
                ours50 - floor50, "ms", "endpoint minus floor p50 (decode, resize, DRF, JSON) vs the floor", floor50
            ),
            f"{backbone}: endpoint_vs_torch_eager_p50_ms": metric(
                ours50,
                "ms",
                "torch eager forward, same tensor",
                eager50,
                target=">= 3x faster than torch eager",
                met=eager50 >= 3 * ours50,
            ),
            f"{backbone}: car_endpoint_10_photos_p50_ms": metric(
                car50, "ms", "target 150 ms", 150.0, target="<= 150 ms", met=car50 <= 150
            ),
            f"{backbone}: car_endpoint_10_photos_p99_ms": metric(pct(t["car"], 99), "ms", "target 150 ms", 150.0),
        }
    notes = (
        "224 px, 1 intra-op thread for both runtimes, token auth, in-process Django test client (no HTTP server: see "
        f"bench/load.py for gunicorn); {N_RUNS} timed requests after {N_WARM} warm-up; the floor is session.run "
        "alone on a preprocessed tensor; the endpoint decodes a 224 px JPEG, resizes, runs the model and answers "
        "JSON. Backbones: " + "; ".join(f"{b} = {why}" for b, why in BACKBONES) + "."
    )
    path = write("serving", metrics, notes=notes)
    print(table(metrics))
    print(f"written {path}")


if __name__ == "__main__":
    main()
