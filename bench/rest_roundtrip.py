"""REST round trips under load (make bench-rest; issue 17): 10 concurrent clients on gunicorn (3 sync workers, as
docker-compose.yml runs it) against PostgreSQL, each a reviewer with their own API token, for REST_SECONDS (30 s):

  label   PUT /api/v1/projects/<slug>/images/<id>/labels/model/ with the version the client last saw (its own
          photos, so no 409), alternating two classes: p50 / p95 of one request;
  review  POST …/review/mislabel/next/ then POST …/items/<id>/resolve/ {"action": "keep"}: p50 / p95 of the pair.

Baseline in the same run: the same with one client alone. Targets: none given by the issue (it asks for the p95s);
the ratio says what 10 concurrent clients on 2 cores cost. Set-up: a fresh database (REST_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/loupe_bench_rest; dropped and created), a car project with 5,000 photo rows
(no files: neither operation reads them) and a mislabel queue of 5,000 open items.
Run: .venv/bin/python -m bench.rest_roundtrip (writes bench/results/rest_roundtrip.json)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(tempfile.mkdtemp(prefix="loupe-bench-rest-"))
DB_URL = os.environ.get("REST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/loupe_bench_rest")
CLIENTS = 10
SECONDS = float(os.environ.get("REST_SECONDS", "30"))
N_IMAGES = 5000
os.environ.update(
    {
        "DEBUG": "0",
        "SECRET_KEY": "bench-rest-not-secret-" + "x" * 40,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LOUPE_VAR_DIR": str(VAR),
        "DATABASE_URL": DB_URL,
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "LOUPE_API_RATE": "10000000/min",
        "SECURE_SSL_REDIRECT": "0",
    }
)
os.environ.pop("CELERY_BROKER_URL", None)
sys.path.insert(0, str(ROOT))

from bench.common import recreate_database  # noqa: E402

recreate_database(DB_URL, "bench.rest_roundtrip", "REST_DATABASE_URL")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

from bench.common import free_port, metric, start_gunicorn, table, write  # noqa: E402


def setup() -> tuple[str, list[str], dict[str, dict[int, int]], tuple[int, int]]:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from labeling.models import Image, Label, LabelClass
    from labeling.services import project_create
    from review.models import ReviewItem

    call_command("migrate", verbosity=0)
    project = project_create(name="Cars", slug="cars", preset="car")
    make, model = project.heads.get(name="make"), project.heads.get(name="model")
    toyota = LabelClass.objects.create(head=make, name="Toyota", normalized_name="toyota")
    corolla = LabelClass.objects.create(head=model, name="Corolla", normalized_name="corolla", parent=toyota)
    yaris = LabelClass.objects.create(head=model, name="Yaris", normalized_name="yaris", parent=toyota)
    images = Image.objects.bulk_create(
        Image(
            project=project,
            sha256=f"{i:064x}",
            file=f"images/cars/{i}.jpg",
            original_name=f"c{i}.jpg",
            group_key=f"g{i}",
        )
        for i in range(N_IMAGES)
    )
    Label.objects.bulk_create(
        [Label(image=im, head=make, label_class=toyota) for im in images]
        + [Label(image=im, head=model, label_class=corolla) for im in images]
    )
    ReviewItem.objects.bulk_create(
        ReviewItem(
            project=project,
            queue="mislabel",
            image=im,
            head=model,
            given_class=corolla,
            suggested_class=yaris,
            suggested_prob=0.9,
            score=i / N_IMAGES,
            rank=i,
            top_k=[{"class_id": yaris.id, "label": "Yaris", "prob": 0.9}],
        )
        for i, im in enumerate(images)
    )
    tokens, mine = [], {}
    for c in range(CLIENTS):
        user = get_user_model().objects.create_user(f"reviewer{c}")
        tokens.append(Token.objects.create(user=user).key)
        mine[tokens[-1]] = {im.id: 1 for im in images[c::CLIENTS][:200]}  # photo -> the version last seen
    return project.slug, tokens, mine, (corolla.id, yaris.id)


def _call(conn, method, path, token, body=None) -> tuple[int, dict]:
    headers = {"Authorization": f"Token {token}", "X-Forwarded-Proto": "https", "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, (json.loads(data) if data else {})


def client(port, slug, token, versions, classes, kind, stop, out) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    photos = sorted(versions)  # the versions dict is the client's memory across phases
    turn = 0
    while not stop.is_set():
        t = time.perf_counter()
        if kind == "label":
            image_id = photos[turn % len(photos)]
            cls = classes[(turn // len(photos) + 1) % 2]
            status, body = _call(
                conn,
                "PUT",
                f"/api/v1/projects/{slug}/images/{image_id}/labels/model/",
                token,
                {"class_id": cls, "version": versions[image_id]},
            )
            ok = status == 200
            if ok:
                versions[image_id] = body["version"]
        else:
            status, item = _call(conn, "POST", f"/api/v1/projects/{slug}/review/mislabel/next/", token)
            ok = status == 200
            if ok:
                status, _ = _call(
                    conn,
                    "POST",
                    f"/api/v1/projects/{slug}/review/mislabel/items/{item['id']}/resolve/",
                    token,
                    {"action": "keep", "version": item["label_version"]},
                )
                ok = status == 200
        out.append((time.perf_counter() - t, ok))
        turn += 1


def phase(port, slug, tokens, mine, classes, kind, n_clients) -> dict:
    stop, records, threads = threading.Event(), [], []
    for token in tokens[:n_clients]:
        out = []
        records.append(out)
        th = threading.Thread(target=client, args=(port, slug, token, mine[token], classes, kind, stop, out))
        th.start()
        threads.append(th)
    time.sleep(SECONDS)
    stop.set()
    for th in threads:
        th.join(60)
    flat = [r for out in records for r in out]
    times = sorted(t * 1000 for t, ok in flat if ok)
    return {
        "n": len(flat),
        "errors": sum(1 for _, ok in flat if not ok),
        "p50": statistics.median(times),
        "p95": times[int(0.95 * (len(times) - 1))],
        "per_s": len(flat) / SECONDS,
    }


def main() -> None:
    slug, tokens, mine, classes = setup()
    port = free_port()
    proc = start_gunicorn(port)
    try:
        results = {}
        for kind in ("label", "review"):
            for n in (1, CLIENTS):
                results[(kind, n)] = r = phase(port, slug, tokens, mine, classes, kind, n)
                print(
                    f"{kind} x{n}: {r['n']} in {SECONDS:.0f} s ({r['errors']} errors), p50 {r['p50']:.1f} ms, "
                    f"p95 {r['p95']:.1f} ms",
                    flush=True,
                )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    metrics = {}
    for kind, what in (("label", "label set (PUT)"), ("review", "queue next + resolve")):
        many, one = results[(kind, CLIENTS)], results[(kind, 1)]
        metrics[f"{kind}_p95_ms_10_clients"] = metric(many["p95"], "ms", f"{what}, one client alone, p95", one["p95"])
        metrics[f"{kind}_per_s_10_clients"] = metric(many["per_s"], "1/s", f"{what}, one client alone", one["per_s"])
    errors = {f"{k}x{n}": r["errors"] for (k, n), r in results.items()}
    notes = (
        f"gunicorn webapp.wsgi, 3 sync workers, PostgreSQL, {SECONDS:.0f} s per phase, {CLIENTS} reviewers with their "
        f"own tokens; label: each client its own 200 photos, the version it last saw; review: next + keep on a "
        f"mislabel queue of {N_IMAGES} items. Errors (non-200): {errors}."
    )
    print(table(metrics))
    print("written", write("rest_roundtrip", metrics, notes))


if __name__ == "__main__":
    main()
