"""Imports of any size (make bench-import; issue 17.3): N generated photos (default 57,000, the car seed's size;
LOUPE_BENCH_IMPORT_N) in folder mode (<class>/<ID>_<seq>.jpg, 50 classes), imported two ways, each in its own
process on a fresh project, SQLite under a temporary var/ as `make demo` runs:

  job       labeling.import_jobs (the worker's side of an import job): the plan, then LOUPE_IMPORT_BATCH photos
            read and written per transaction;
  baseline  the in-request import the Import page ran before (labeling.importers.images_import over every row
            at once: every file's bytes are read before the one transaction that writes them).

Measured: photos/s (wall time of the import alone) and the peak RSS of the process (ru_maxrss), against the
issue's targets: peak RSS < 1 GiB and >= 300 photos/s. Photos: 96 px JPEGs of random colour blocks (~3 KB).
Run: .venv/bin/python -m bench.import_scale (writes bench/results/import_scale.json)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import metric, table, write

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("LOUPE_BENCH_IMPORT_N") or 57_000)
CLASSES = 50
BATCH = os.environ.get("LOUPE_IMPORT_BATCH", "200")

CHILD = r"""
import json, os, resource, sys, time
import django
django.setup()
from labeling import import_jobs, importers
from labeling.models import Image
from labeling.services import project_create
arm, folder, slug = sys.argv[1], sys.argv[2], sys.argv[3]
project = project_create(name=slug, preset="retrieval", slug=slug)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.monotonic()
if arm == "job":
    run = import_jobs.import_run_create(project=project, mode="folder", params={"folder": folder}, queue=False)
    run = import_jobs.import_run_execute(run_id=run.id)
    ok, created = run.status == "succeeded", run.report.get("created", 0)
else:
    rows, report = importers.plan_folder(importers.Path(folder), head=project.heads.get())
    report = importers.images_import(project=project, rows=rows, report=report)
    ok, created = report.written, report.created
seconds = time.monotonic() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"ok": ok, "created": created, "seconds": seconds, "rss": rss, "rss0": rss0,
                  "images": Image.objects.filter(project=project).count()}))
"""


def _photos(folder: Path, n: int) -> None:
    from PIL import Image, ImageDraw

    rnd = random.Random(0)
    for c in range(CLASSES):
        (folder / f"class{c:02d}").mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (96, 96), tuple(rnd.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rnd.randrange(80), rnd.randrange(80)
            d.rectangle([x, y, x + 16, y + 16], fill=tuple(rnd.randrange(256) for _ in range(3)))
        img.save(folder / f"class{i % CLASSES:02d}" / f"P{i:06d}_0.jpg", quality=80)


def _arm(arm: str, folder: Path, var: Path) -> dict:
    env = {**os.environ, "DEBUG": "1", "LOUPE_VAR_DIR": str(var), "DJANGO_SETTINGS_MODULE": "webapp.settings"}
    env.pop("DATABASE_URL", None)  # SQLite under var/, as make demo
    out = subprocess.run(
        [sys.executable, "-c", CHILD, arm, str(folder), f"bench-{arm}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="loupe-bench-import-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        t = time.monotonic()
        _photos(folder, N)
        print(f"generated {N} photos in {time.monotonic() - t:.0f} s", flush=True)
        var = tmp / "var"
        env = {**os.environ, "DEBUG": "1", "LOUPE_VAR_DIR": str(var)}
        env.pop("DATABASE_URL", None)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        results = {}
        for arm in ("job", "baseline"):
            results[arm] = _arm(arm, folder, var)
            r = results[arm]
            print(
                f"{arm}: {r['created']} photos in {r['seconds']:.0f} s, peak RSS {r['rss'] / 2**20:.0f} MiB", flush=True
            )
    job, base = results["job"], results["baseline"]
    job_rate, base_rate = job["created"] / job["seconds"], base["created"] / base["seconds"]
    metrics = {
        "import_job_photos_per_s": metric(
            job_rate,
            "photos/s",
            "in-request import of the same photos",
            base_rate,
            target=">= 300",
            met=job_rate >= 300,
        ),
        "import_job_peak_rss_mib": metric(
            job["rss"] / 2**20,
            "MiB",
            "in-request import of the same photos",
            base["rss"] / 2**20,
            target="< 1024",
            met=job["rss"] < 2**30,
        ),
        "import_job_rss_growth_mib": metric(
            (job["rss"] - job["rss0"]) / 2**20,
            "MiB",
            "the in-request import's growth over the same start",
            (base["rss"] - base["rss0"]) / 2**20,
        ),
    }
    notes = (
        f"{N} photos (96 px JPEG, {CLASSES} classes, folder mode), SQLite, one process per arm on a fresh project; "
        f"job: {job['created']} created in {job['seconds']:.1f} s (batches of {BATCH}), "
        f"baseline: {base['created']} in {base['seconds']:.1f} s; both ok: {job['ok']} / {base['ok']}. Peak RSS "
        f"includes the app's start (Django with every app loaded: {job['rss0'] / 2**20:.0f} MiB before the import)."
    )
    print(table(metrics))
    print("written", write("import_scale", metrics, notes))


if __name__ == "__main__":
    main()
