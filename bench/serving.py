"""Serving latency on this CPU (make bench-serving).

One model (mobilenetv3_small_100, 224 px, trained for one epoch on generated photos — latency does not depend on
the weights), exported to ONNX. Measured in one process, one intra-op thread (the serving default):
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

from bench.common import metric, table, write  # noqa: E402

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


def main() -> None:
    from django.contrib.auth import get_user_model
    from rest_framework.test import APIClient

    from inference import services as inference_services
    from inference.core import Recognizer
    from labeling.services import project_create
    from training import services as training_services

    call_command("migrate", verbosity=0)
    settings.LOUPE_ACTIVE_MODEL_TTL = 60
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    imgs = VAR / "import" / "cars"
    imgs.mkdir(parents=True)
    lines = ["image_filename,make,model"]
    for i in range(48):
        make, model = [("Toyota", "Corolla"), ("Toyota", "Yaris"), ("Honda", "Civic")][i % 3]
        (imgs / f"c{i}_0.jpg").write_bytes(photo(i, 256))
        lines.append(f"c{i}_0.jpg,{make},{model}")
    (imgs / "cars.csv").write_text("\n".join(lines) + "\n")
    project = project_create(name="Cars", preset="car", slug="cars")
    call_command(
        "import_images",
        "cars",
        str(imgs),
        "--csv",
        str(imgs / "cars.csv"),
        "--head",
        "make=make",
        "--head",
        "model=model",
        verbosity=0,
        stdout=io.StringIO(),
    )
    config = {
        "backbone": "mobilenetv3_small_100",
        "pretrained": False,
        "image_size": 224,
        "epochs": 1,
        "batch_size": 16,
        "eval_report": False,
    }
    run = training_services.training_run_create(project=project, config=config, queue=False)
    run = training_services.training_run_execute(run_id=run.id, inline=True)
    assert run.status == "succeeded", run.error
    art = Path(run.artifact_dir)

    rec = Recognizer.load(art, num_threads=1)
    assert rec.backend == "onnx", "the version should have model.onnx"
    x_uint8 = rec._batch([Image.open(io.BytesIO(photo(999)))])
    from training.engine.data import normalize_batch

    x = normalize_batch(x_uint8, rec.mean, rec.std).contiguous()
    x_np = x.numpy()
    floor = timed(lambda: rec.session.run(rec._onnx_outputs, {"images": x_np}))
    torch_rec = Recognizer.load(art, num_threads=1, backend="torch")

    def eager():
        with torch.inference_mode():
            torch_rec.model(x)

    eager_t = timed(eager)

    user = get_user_model().objects.create_user("bench", is_staff=True)
    client = APIClient()
    client.force_authenticate(user)
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

    def car():
        r = client.post("/api/ai/detect-car-vision", ten, format="json")
        assert r.status_code == 200, r.content

    car_t = timed(car, n=100)

    floor50, ours50, eager50 = pct(floor, 50), pct(ours, 50), pct(eager_t, 50)
    metrics = {
        "endpoint_p50_ms": metric(
            ours50,
            "ms",
            "raw onnxruntime session.run, same tensor (floor)",
            floor50,
            target="<= 1.3x the floor",
            met=ours50 <= 1.3 * floor50,
        ),
        "endpoint_p99_ms": metric(pct(ours, 99), "ms", "raw onnxruntime session.run p99", pct(floor, 99)),
        "endpoint_vs_torch_eager_p50_ms": metric(
            ours50,
            "ms",
            "torch eager forward, same tensor",
            eager50,
            target=">= 3x faster than torch eager",
            met=eager50 >= 3 * ours50,
        ),
        "car_endpoint_10_photos_p50_ms": metric(
            pct(car_t, 50), "ms", "target 150 ms", 150.0, target="<= 150 ms", met=pct(car_t, 50) <= 150
        ),
        "car_endpoint_10_photos_p99_ms": metric(pct(car_t, 99), "ms", "target 150 ms", 150.0),
    }
    notes = (
        "mobilenetv3_small_100 at 224 px, 1 intra-op thread, in-process Django test client (no HTTP server); "
        f"{N_RUNS} timed requests after {N_WARM} warm-up; the floor is session.run alone on a preprocessed tensor."
    )
    path = write("serving", metrics, notes=notes)
    print(table(metrics))
    print(f"written {path}")


if __name__ == "__main__":
    main()
