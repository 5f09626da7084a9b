"""Real processes for the tests that need them: a private Redis broker, a Celery worker on this test's database."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.db import connection

from webapp.celery import app

REDIS = shutil.which("redis-server")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout=120.0, what="condition", every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class PrivateBroker:
    """A redis-server of this test alone (no persistence, like the CI one), which the test can kill and restart
    empty; the Celery app publishes to it while the fixture lasts."""

    def __init__(self, tmp: Path):
        self.port, self.tmp, self.proc = free_port(), tmp, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
        )
        wait(self._pong, timeout=10, what="redis-server")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def use_broker(url: str | None) -> None:
    app.conf.update(broker_read_url=url, broker_write_url=url)
    app._pool = None  # the connection and producer pools are cached per app: drop them
    app.amqp._producer_pool = None


def worker_process(
    tmp_path: Path, broker_url: str, name: str, settings, queues: str = "default,gpu", env: dict | None = None
) -> subprocess.Popen:
    db = connection.settings_dict
    env = {
        **os.environ,
        "DEBUG": "1",
        "DATABASE_URL": f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/"
        + db["NAME"],
        "CELERY_BROKER_URL": broker_url,
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
        "LOUPE_HEARTBEAT_SECONDS": "0.5",
        "LOUPE_MISLABEL_AFTER_PROMOTE": "0",
        "LOUPE_UNCERTAIN_AFTER_PROMOTE": "0",
        "LOUPE_TRAIN_OVERRIDES": json.dumps(settings.LOUPE_TRAIN_OVERRIDES),  # as conftest: no pretrained weights
        **(env or {}),
    }
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - the process keeps it
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "webapp",
            "worker",
            "-Q",
            queues,
            "-c",
            "1",
            "-P",
            "solo",
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "info",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
