"""Serving latency on this CPU (make bench-serving).

Two models (efficientnet_b0, a B0-sized CNN, and mobilenetv3_small_100, the engine default; 224 px, trained
for one epoch on generated photos — latency does not depend on the weights),
exported to ONNX. Measured in one process, one intra-op thread (the serving default):
  floor   onnxruntime session.run on an already preprocessed 1x3x224x224 tensor
  torch   the same model in torch eager on the same tensor
  ours    POST /api/v1/projects/<slug>/recognize with one 224 px JPEG, called the way gunicorn calls Django:
          a WSGI environ with the JSON body and the token header handed to webapp.wsgi's handler (every
          middleware, URL routing, DRF, token auth + throttle, decode, preprocessing, ONNX Runtime,
          thresholds, JSON response); and the car endpoint POST /api/ai/detect-car-vision with 10 photos.
          (Django's test client adds ~0.6 ms of its own per request — template-signal wiring, request
          building — that no server pays; bench/load.py measures the real HTTP server.)
The photos are photo-like (smooth gradients, shapes, sensor noise), not white noise: a noise JPEG is ~6x larger
than a real 224 px photo and twice as slow to decode.
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
    """A photo-like JPEG (quality 90): a coloured gradient background, a few filled shapes, mild sensor noise."""
    from PIL import ImageDraw  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = (rng.uniform(0, 255, 3) for _ in range(3))
    base = c0 + np.multiply.outer(xx, c1 - c0) * 0.8 + np.multiply.outer(yy, c2 - c0) * 0.5
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Wsgi:
    """POST JSON to Django through its WSGI handler, as gunicorn does (no test client in between)."""

    def __init__(self, token: str):
        from django.core.handlers.wsgi import WSGIHandler  # noqa: PLC0415

        self.handler, self.token = WSGIHandler(), token

    def post(self, path: str, payload: dict) -> None:
        import json  # noqa: PLC0415

        body = json.dumps(payload).encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "localhost",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_AUTHORIZATION": f"Token {self.token}",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0),
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        status: list[str] = []
        out = b"".join(self.handler(environ, lambda s, _headers, _exc=None: status.append(s)))
        assert status and status[0].startswith("200"), (status, out[:300])


BACKBONES = (
    ("efficientnet_b0", "a B0-sized CNN (the presets' backbone when first measured)"),
    ("mobilenetv3_small_100", "the engine default and the demo's; ~1 ms, so fixed per-request costs dominate"),
)


def measure(backbone: str, client) -> dict:
    """Train one epoch of `backbone`, promote it, and time floor / torch eager / endpoint / car endpoint."""
    from inference import services as inference_services
    from inference.recognizer import Recognizer
    from training.engine.data import normalize_batch

    project = car_project(VAR, "cars-" + backbone.split("_")[0], photo)
    art = Path(train_one_epoch(project, backbone).artifact_dir)

    rec = Recognizer.load(art, num_threads=1)
    assert rec.backend == "onnx", "the version should have model.onnx"
    x = normalize_batch(rec._batch([Image.open(io.BytesIO(photo(999)))]), rec.mean, rec.std).contiguous()
    x_np = x.numpy()
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    raw = ort.InferenceSession(str(art / "model.onnx"), opts, providers=["CPUExecutionProvider"])  # as exported
    floor = timed(lambda: raw.run(rec._onnx_outputs, {"images": x_np}))
    torch_rec = Recognizer.load(art, num_threads=1, backend="torch")

    def eager():
        with torch.inference_mode():
            torch_rec.model(x)

    eager_t = timed(eager)
    url = f"/api/v1/projects/{project.slug}/recognize"
    one = {"images": [{"data": base64.b64encode(photo(1000)).decode(), "media_type": "image/jpeg"}]}
    inference_services.forget_all()

    def endpoint():
        client.post(url, one)

    ours = timed(endpoint)
    ten = {
        "images": [{"data": base64.b64encode(photo(2000 + i)).decode(), "media_type": "image/jpeg"} for i in range(10)]
    }
    settings.LOUPE_CAR_PROJECT = project.slug

    def car():
        client.post("/api/ai/detect-car-vision", ten)

    car_t = timed(car, n=100)
    return {"floor": floor, "eager": eager_t, "ours": ours, "car": car_t}


def main() -> None:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    call_command("migrate", verbosity=0)
    settings.LOUPE_ACTIVE_MODEL_TTL = 60
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "localhost"]
    user = get_user_model().objects.create_user("bench", is_staff=True)
    client = Wsgi(Token.objects.create(user=user).key)  # real token auth

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
            f"{backbone}: floor_vs_torch_eager_p50_ms": metric(
                floor50,
                "ms",
                "torch eager forward (the ceiling for 'x times faster than eager': even a free endpoint is only "
                "eager / floor times faster)",
                eager50,
            ),
            f"{backbone}: car_endpoint_10_photos_p50_ms": metric(
                car50, "ms", "target 150 ms", 150.0, target="<= 150 ms", met=car50 <= 150
            ),
            f"{backbone}: car_endpoint_10_photos_p99_ms": metric(pct(t["car"], 99), "ms", "target 150 ms", 150.0),
        }
    notes = (
        "224 px, 1 intra-op thread for both runtimes, token auth, requests through Django's WSGI handler as "
        "gunicorn calls it (no HTTP socket: bench/load.py measures gunicorn over loopback); "
        f"{N_RUNS} timed requests after {N_WARM} warm-up; the floor is session.run of the exported model alone on "
        "a preprocessed tensor; the endpoint decodes a photo-like 224 px JPEG, resizes, runs the model and answers "
        "JSON. Backbones: " + "; ".join(f"{b} = {why}" for b, why in BACKBONES) + "."
    )
    path = write("serving", metrics, notes=notes)
    print(table(metrics))
    print(f"written {path}")


if __name__ == "__main__":
    main()
