"""Shared helpers for benchmarks: the machine description and the results file format (DESIGN.md)."""

import datetime as dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, GPU {gpu}, {platform.machine()}"


def metric(value, unit, baseline, baseline_value, target=None, met=None) -> dict:
    ratio = None if not baseline_value else round(value / baseline_value, 3)
    return {
        "value": round(value, 3),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": round(baseline_value, 3),
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def write(name: str, metrics: dict, notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {
        "bench": name,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "metrics": metrics,
        "notes": notes,
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def table(metrics: dict) -> str:
    lines = [f"{'metric':38} {'value':>10} {'baseline':>10} {'ratio':>7}  baseline"]
    for name, m in metrics.items():
        lines.append(f"{name:38} {m['value']:>10} {m['baseline_value']:>10} {m['ratio']!s:>7}  {m['baseline']}")
    return "\n".join(lines)


def car_project(root: Path, slug: str, photo):
    """A `car`-preset project of 48 generated photos (3 make/model pairs) imported from a CSV, as a user would;
    `photo(seed, size)` returns JPEG bytes. Django must be set up."""
    import io  # noqa: PLC0415

    from django.core.management import call_command  # noqa: PLC0415

    from labeling.services import project_create  # noqa: PLC0415

    imgs = root / "import" / slug
    imgs.mkdir(parents=True)
    lines = ["image_filename,make,model"]
    for i in range(48):
        make, model = [("Toyota", "Corolla"), ("Toyota", "Yaris"), ("Honda", "Civic")][i % 3]
        (imgs / f"c{i}.jpg").write_bytes(photo(i, 256))
        lines.append(f"c{i}.jpg,{make},{model}")
    (imgs / "cars.csv").write_text("\n".join(lines) + "\n")
    project = project_create(name=slug, preset="car", slug=slug)
    call_command(
        "import_images",
        slug,
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
    return project


def train_one_epoch(project, backbone: str, *, seed: int = 0):
    """A 224 px, one-epoch, from-scratch run trained inline (latency does not depend on the weights); returns it."""
    from pipeline import chain  # noqa: PLC0415
    from training import services  # noqa: PLC0415

    config = {"backbone": backbone, "pretrained": False, "tail_from_block": None, "image_size": 224, "epochs": 1}
    config["batch_size"] = 16
    config |= {"seed": seed, "eval_report": False}
    run = chain.training_run_execute(
        run_id=services.training_run_create(project=project, config=config, queue=False).id, inline=True
    )
    assert run.status == "succeeded", run.error
    return run


# Headless Chromium as the browser tests start it (Playwright's own browser download does not work here).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(port: int, env: dict | None = None):
    """gunicorn as docker-compose.yml runs it (3 sync workers), with `env` (default: this process's environment),
    in its own process group (os.killpg stops its workers too); returns once /healthz answers, exits the bench
    otherwise."""
    import http.client  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent
    compose = (root / "docker-compose.yml").read_text()
    assert '"--workers", "3"' in compose, "keep the benches' gunicorn command in step with docker-compose.yml"
    cmd = [sys.executable, "-m", "gunicorn", "webapp.wsgi:application", "--bind", f"127.0.0.1:{port}"]
    cmd += ["--workers", "3", "--timeout", "120", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=root, env=dict(os.environ if env is None else env), start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz", headers={"X-Forwarded-Proto": "https"})  # as behind the TLS proxy
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    sys.exit("gunicorn did not answer /healthz within 60 s")


def recreate_database(url: str, who: str, env_var: str) -> None:
    """Drop and create the PostgreSQL database of `url` (a bench's own, never the app's); exits with a message
    naming the bench (`who`) and the variable that points it elsewhere when PostgreSQL cannot be reached."""
    import sys  # noqa: PLC0415

    import psycopg  # noqa: PLC0415

    base, name = url.rsplit("/", 1)
    try:
        with psycopg.connect(base + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        sys.exit(f"{who} needs PostgreSQL at {base} (set {env_var}): {exc}")
