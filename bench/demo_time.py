"""How long `make demo` takes from a fresh var/ to a served model, step by step, on this machine.

Baseline, measured in the same run: the training engine alone (`training.engine.train_model`) on the same
manifest and config, in one process with no web app, database or Celery. The ratio says what the whole loop
(generate + import + queue + worker + index + promote + first request) costs on top of training itself.
Run: `make bench-demo` (writes bench/results/demo.json)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import metric, table, write  # noqa: E402


def main() -> None:
    var = Path(tempfile.mkdtemp(prefix="loupe-bench-demo-"))
    env = {**os.environ, "DEBUG": "1", "LOUPE_VAR_DIR": str(var)}
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    py = sys.executable
    steps = {}

    def run(name, *args):
        t = time.monotonic()
        subprocess.run([py, "manage.py", *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        steps[name] = time.monotonic() - t

    t_all = time.monotonic()
    run("migrate", "migrate", "--noinput")
    run("generate_and_import", "demo")
    (var / "log").mkdir(exist_ok=True)
    workers = [  # as `make demo`: queue default (with beat) and queue gpu
        subprocess.Popen(
            [py, "-m", "celery", "-A", "webapp", "worker", "-Q", queue, "-c", "1", "-n", f"{queue}@%h", "-l", "warning"]
            + (["-B", "-s", str(var / "celerybeat-schedule")] if queue == "default" else []),
            cwd=ROOT,
            env=env,
            stdout=open(var / "log" / f"{queue}-worker.log", "w"),
            stderr=subprocess.STDOUT,
        )
        for queue in ("default", "gpu")
    ]
    try:
        run("train_index_promote", "demo", "--train")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
    t = time.monotonic()
    code = (
        "import django, base64, json, sys; django.setup();"
        "from rest_framework.test import APIClient; from django.contrib.auth.models import User;"
        "c = APIClient(); c.force_authenticate(User.objects.get(username='admin'));"
        "data = base64.b64encode(open(sys.argv[1], 'rb').read()).decode();"
        "r = c.post('/api/v1/projects/lego-demo/recognize', {'images': [{'data': data, 'media_type': 'image/jpeg'}]},"
        " format='json'); print(json.dumps(r.json()))"
    )
    sample = sorted((var / "demo" / "images").glob("*.jpg"))[0]
    out = subprocess.run(
        [py, "-c", code, str(sample)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**env, "DJANGO_SETTINGS_MODULE": "webapp.settings", "ALLOWED_HOSTS": "testserver"},
    )
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    steps["first_recognize"] = time.monotonic() - t
    total = time.monotonic() - t_all

    # Baseline: the engine alone on the same manifest and resolved config.
    run_dir = next((var / "artifacts" / "lego-demo").glob("run-*"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    from training.engine import train_model
    from training.engine.quick import train_quick

    t = time.monotonic()
    out = Path(tempfile.mkdtemp(prefix="loupe-bench-engine-"))
    if config.get("quick"):  # from a cold feature cache, as the demo's first run
        metrics = train_quick(manifest, config, out, cache_dir=out / "feature-cache")
    else:
        metrics = train_model(manifest, config, out)
    engine_s = time.monotonic() - t
    demo_metrics = json.loads((run_dir / "metrics.json").read_text())

    results = {
        "demo_to_served_model_s": metric(
            total,
            "s",
            "the engine alone (train_quick from a cold cache, or train_model) on the same manifest and config",
            engine_s,
            target="<= 240 s (issue 15)",
            met=total <= 240,
        ),
    }
    for name, seconds in steps.items():
        results[f"step_{name}_s"] = metric(seconds, "s", "the engine alone, same manifest and config", engine_s)
    per_head = ", ".join(f"{h} {m['top1']:.3f}" for h, m in demo_metrics["heads"].items())
    notes = (
        f"venv install excluded (cached). Demo model v{answer['model_version']}: mean val top-1 "
        f"{demo_metrics['primary']:.3f} ({per_head}); "
        f"engine-only rerun mean val top-1 {metrics['primary']:.3f}. n_train {demo_metrics['n_train']}, "
        f"n_val {demo_metrics['n_val']}."
    )
    path = write("demo", results, notes)
    print(table(results))
    print(notes)
    print(f"written {path}")


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    main()
