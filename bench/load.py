"""Load: 50 concurrent clients against gunicorn on loopback (make bench-load).

Set-up (in this process): a fresh PostgreSQL database (LOAD_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/loupe_bench_load; dropped and created), a car project, two model versions
(mobilenetv3_small_100, 224 px, trained one epoch with different seeds, so their answers differ), both indexes
built, v1 active. gunicorn then runs exactly as docker-compose.yml runs it (webapp.wsgi, 3 sync workers).

Phases, each LOAD_SECONDS (default 120 s) with 50 client threads, each posting one 224 px JPEG (JSON base64,
token auth) to /api/v1/projects/<slug>/recognize again and again:
  steady    no promote;
  promote   this process promotes v2 / v1 alternately every 10 s (the admin's promote service).
Every answer is checked against what its own version answers alone (computed beforehand in this process for
each of the 8 photos): an answer that is not exactly one version's answer (labels, confidences to 1e-4)
counts as an error, like a non-200 or a connection failure.
Baseline, same run: one client alone (sequential requests), p50.
  slow_clients  nginx with deploy/nginx.conf (docker-compose.yml's) in front of the same gunicorn; 20 slow
            clients (bench/slow_clients.py: half trickle their headers, half their body, one piece a second)
            hold connections to it while GET /healthz is timed 200 times, one after another. Baseline: the same
            against gunicorn directly (as docker-compose.yml published it before), each request given 2 s.
LOAD_PHASES (default steady,promote,slow_clients) runs some of them; the metrics of the others are kept from
the existing bench/results/load.json (the notes say so).
Run: .venv/bin/python -m bench.load (writes bench/results/load.json)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(tempfile.mkdtemp(prefix="loupe-bench-load-"))
DB_URL = os.environ.get("LOAD_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/loupe_bench_load")
CLIENTS = int(os.environ.get("LOAD_CLIENTS", "50"))
SECONDS = float(os.environ.get("LOAD_SECONDS", "120"))
PROMOTE_EVERY = 10.0
PHASES = os.environ.get("LOAD_PHASES", "steady,promote,slow_clients").split(",")
SLOW_CLIENTS = 20
ENV = {
    "DEBUG": "0",
    "SECRET_KEY": "bench-load-not-secret-" + "x" * 40,
    "ALLOWED_HOSTS": "127.0.0.1,localhost",
    "LOUPE_VAR_DIR": str(VAR),
    "DATABASE_URL": DB_URL,
    "DJANGO_SETTINGS_MODULE": "webapp.settings",
    "LOUPE_API_RATE": "10000000/min",  # one token for all 50 clients: the throttle runs but never refuses
    "LOUPE_UNCERTAIN_AFTER_PROMOTE": "0",  # no worker here: the promotes measure the switch alone
    "LOUPE_MISLABEL_AFTER_PROMOTE": "0",
    "SECURE_SSL_REDIRECT": "0",  # plain HTTP on loopback (production sits behind a TLS proxy)
}
os.environ.update(ENV)
os.environ.pop("CELERY_BROKER_URL", None)
sys.path.insert(0, str(ROOT))


from bench.common import recreate_database  # noqa: E402

recreate_database(DB_URL, "bench.load", "LOAD_DATABASE_URL")

import django  # noqa: E402

django.setup()

import numpy as np  # noqa: E402
from django.core.management import call_command  # noqa: E402
from PIL import Image  # noqa: E402

from bench import slow_clients  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS,
    car_project,
    free_port,
    metric,
    start_gunicorn,
    table,
    train_one_epoch,
    write,
)
from pipeline import chain  # noqa: E402


def photo(seed: int, size: int = 224) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)  # a smooth, photo-like picture (upscaled noise)
    img = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def setup():
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from inference.recognizer import Recognizer

    call_command("migrate", verbosity=0)
    project = car_project(VAR, "cars", photo)
    versions = [train_one_epoch(project, "mobilenetv3_small_100", seed=seed).model_version for seed in (1, 2)]
    v1, v2 = versions
    chain.model_version_promote(version=v2, inline=True)  # builds v2's index
    chain.model_version_promote(version=v1, inline=True)  # builds v1's index; v1 active
    user = get_user_model().objects.create_user("bench", is_staff=True)
    token = Token.objects.create(user=user).key
    photos = [photo(1000 + i) for i in range(8)]
    expected: dict[int, list[dict]] = {}
    for v in (v1, v2):
        v.refresh_from_db()
        rec = Recognizer.load(v.artifact_dir, num_threads=1)
        thresholds = dict(project.heads.values_list("name", "threshold"))
        expected[v.number] = [
            rec.recognize([Image.open(io.BytesIO(p)).convert("RGB")], thresholds=thresholds, neighbours=0)["heads"]
            for p in photos
        ]
    differs = sum(expected[v1.number][i] != expected[v2.number][i] for i in range(len(photos)))
    return project, v1, v2, token, photos, expected, differs


def matches(heads: dict, want: dict) -> bool:
    if set(heads) != set(want):
        return False
    for name, w in want.items():
        h = heads[name]
        if h["label"] != w["label"] or abs(h["confidence"] - w["confidence"]) > 1e-4:
            return False
        if [t["label"] for t in h["top_k"]] != [t["label"] for t in w["top_k"]]:
            return False
    return True


class Load:
    """CLIENTS threads posting photos until stop; records (latency, ok, version, why) per request."""

    def __init__(self, port, url, token, bodies, expected):
        self.port, self.url, self.token, self.bodies, self.expected = port, url, token, bodies, expected
        self.records: list[tuple[float, bool, int | None, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def one(self, i: int) -> tuple[float, bool, int | None, str]:
        body = self.bodies[i % len(self.bodies)]
        headers = {"Content-Type": "application/json", "Authorization": f"Token {self.token}"}
        t = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.request("POST", self.url, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
        except OSError as exc:
            return time.perf_counter() - t, False, None, f"connection: {exc}"
        dt = time.perf_counter() - t
        if resp.status != 200:
            return dt, False, None, f"HTTP {resp.status}: {data[:200]!r}"
        answer = json.loads(data)
        version = answer.get("model_version")
        want = self.expected.get(version)
        if want is None or not matches(answer["heads"], want[i % len(self.bodies)]):
            return dt, False, version, f"answer of version {version} is not that version's answer"
        return dt, True, version, ""

    def client(self, k: int) -> None:
        i = k
        while not self.stop.is_set():
            rec = self.one(i)
            with self.lock:
                self.records.append(rec)
            i += CLIENTS

    def run(self, seconds: float, n_clients: int, during=None) -> list:
        self.records, self.stop = [], threading.Event()
        threads = [threading.Thread(target=self.client, args=(k,), daemon=True) for k in range(n_clients)]
        for t in threads:
            t.start()
        end = time.monotonic() + seconds
        if during:
            during(end)
        else:
            time.sleep(seconds)
        self.stop.set()
        for t in threads:
            t.join(timeout=90)
        return list(self.records)


def summary(records, seconds) -> dict:
    lat = np.array([r[0] for r in records]) * 1000
    errors = [r for r in records if not r[1]]
    return {
        "requests": len(records),
        "errors": len(errors),
        "first_errors": sorted({r[3] for r in errors})[:5],
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "rps": len(records) / seconds,
        "versions": sorted({r[2] for r in records if r[2] is not None}),
    }


def recognition_phases(port, prepared) -> tuple[dict, str]:
    """The steady and promote phases (whichever LOAD_PHASES names) against gunicorn on `port`; `prepared`: setup()."""

    project, v1, v2, token, photos, expected, differs = prepared
    bodies = [
        json.dumps({"images": [{"data": base64.b64encode(p).decode(), "media_type": "image/jpeg"}]}).encode()
        for p in photos
    ]
    load = Load(port, f"/api/v1/projects/{project.slug}/recognize", token, bodies, expected)
    load.run(10, CLIENTS)  # warm-up: every worker has loaded v1
    alone = summary(load.run(20, 1), 20)
    metrics, notes = {}, []
    if "steady" in PHASES:
        steady = summary(load.run(SECONDS, CLIENTS), SECONDS)
        metrics |= {
            "steady_p50_ms": metric(steady["p50"], "ms", "one client alone, p50", alone["p50"]),
            "steady_p99_ms": metric(steady["p99"], "ms", "one client alone, p50", alone["p50"]),
            "steady_requests_per_s": metric(steady["rps"], "req/s", "one client alone, req/s", alone["rps"]),
            "steady_errors": metric(steady["errors"], "errors", f"of {steady['requests']} requests", 0, "0", None),
        }
        metrics["steady_errors"]["met"] = steady["errors"] == 0
        notes.append(f"Errors seen: steady {steady['first_errors']}.")
    if "promote" in PHASES:
        promotes = []

        def promote_every(end):
            versions = [v2, v1]
            k = 0
            while time.monotonic() + PROMOTE_EVERY <= end:
                time.sleep(PROMOTE_EVERY)
                chain.model_version_promote(version=versions[k % 2])
                promotes.append(versions[k % 2].number)
                k += 1
            time.sleep(max(0.0, end - time.monotonic()))

        swapping = summary(load.run(SECONDS, CLIENTS, during=promote_every), SECONDS)
        metrics |= {
            "promote_every_10s_p50_ms": metric(swapping["p50"], "ms", "one client alone, p50", alone["p50"]),
            "promote_every_10s_p99_ms": metric(swapping["p99"], "ms", "one client alone, p50", alone["p50"]),
            "promote_every_10s_errors": metric(
                swapping["errors"], "errors", f"of {swapping['requests']} requests", 0, "0", None
            ),
        }
        metrics["promote_every_10s_errors"]["met"] = swapping["errors"] == 0
        notes.append(
            f"Promote phase: {len(promotes)} promotes ({promotes}); versions seen {swapping['versions']}. "
            f"Errors seen: promote {swapping['first_errors']}."
        )
    head = (
        f"gunicorn webapp.wsgi, 3 sync workers (as docker-compose.yml), PostgreSQL, on this 2-core machine with the "
        f"{CLIENTS} client threads in the same machine; {SECONDS:.0f} s per phase; mobilenetv3_small_100 224 px, "
        f"ONNX Runtime; one 224 px JPEG per request (JSON base64, token auth). The two versions answer differently "
        f"for {differs} of the {len(photos)} photos; every answer was checked against its version's own answer."
    )
    return metrics, " ".join([head, *notes])


def slow_clients_phase(port) -> tuple[dict, str]:
    """GET /healthz through nginx (deploy/nginx.conf) vs straight to gunicorn, 20 slow clients open on each."""
    nport = free_port()
    nginx, workdir = slow_clients.start_nginx(port, nport)
    try:
        r = slow_clients.measure(
            nport, port, clients=SLOW_CLIENTS, count=200, settle=2.0, direct_timeout=2.0, direct_budget=12.0
        )
    finally:
        slow_clients.stop_nginx(nginx, workdir)
    via, direct = r["nginx"], r["gunicorn"]
    base = f"gunicorn direct, {SLOW_CLIENTS} slow clients open, a request that timed out (2 s) counted as 2 s"
    metrics = {
        "slow_clients_healthz_p50_ms": metric(via["p50"] * 1000, "ms", f"{base}, p50", direct["p50"] * 1000),
        "slow_clients_healthz_p99_ms": metric(
            via["p99"] * 1000, "ms", f"{base}, p99", direct["p99"] * 1000, "< 1000 ms", via["p99"] < 1.0
        ),
        "slow_clients_healthz_failed": metric(
            via["failed"],
            "requests",
            f"gunicorn direct: failed or timed out, of {direct['requests']}",
            direct["failed"],
            "0",
            via["failed"] == 0,
        ),
    }
    notes = (
        f"Slow clients: nginx {slow_clients.nginx_version()} with deploy/nginx.conf in front of that gunicorn; "
        f"{SLOW_CLIENTS} slow clients "
        f"(half trickle GET headers, half a POST body, one piece a second; reopened when dropped) open during "
        f"{via['requests']} sequential GET /healthz through nginx ({via['failed']} failed; the slow clients held "
        f"{via['slow_open']} connections, nginx dropped {via['slow_dropped']}); then the same slow clients straight at "
        f"gunicorn: {direct['failed']} of {direct['requests']} /healthz requests got no answer within 2 s."
    )
    return metrics, notes


def main() -> None:
    recognition = [p for p in PHASES if p in ("steady", "promote")]
    if recognition:
        prepared = setup()
        assert prepared[-1] > 0, "the two versions answer the same for every photo: the mixing check would be blind"
    else:
        call_command("migrate", verbosity=0)
    port = free_port()
    proc = start_gunicorn(port)
    metrics, notes = {}, []
    try:
        if recognition:
            m, n = recognition_phases(port, prepared)
            metrics |= m
            notes.append(n)
        if "slow_clients" in PHASES:
            m, n = slow_clients_phase(port)
            metrics |= m
            notes.append(n)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    previous = RESULTS / "load.json"
    if previous.exists() and set(PHASES) != {"steady", "promote", "slow_clients"}:
        old = json.loads(previous.read_text())
        kept = {k: v for k, v in old["metrics"].items() if k not in metrics}
        if kept:
            metrics = kept | metrics
            notes.insert(0, f"[{', '.join(kept)} kept from the run of {old['when']}: {old.get('notes', '')}]")
    path = write("load", metrics, notes=" ".join(notes))
    print(table(metrics))
    print(" ".join(notes))
    print(f"written {path}")


if __name__ == "__main__":
    main()
