"""Slow clients against the web tier, on loopback: nginx (deploy/nginx.conf, the file docker-compose.yml mounts)
in front of gunicorn, compared with gunicorn alone (how docker-compose.yml published it before).

A slow client opens a connection and sends its request a little at a time: half of them the headers of a
GET /healthz, one header line a second; the other half a POST /accounts/login/ whose headers are complete but
whose body (announced as 1 MB) comes one byte a second. A gunicorn sync worker that takes such a connection is
stuck reading it until gunicorn's --timeout kills it; nginx reads them all at once, event-driven, and passes a
request on only once it is whole. When a server drops one of them (nginx's client_header_timeout), the client
opens a new one, as a real slowloris does, so `n` stay open all the time.

Used by bench/load.py (phase slow_clients) and tests/test_slow_clients.py. No Django here."""

from __future__ import annotations

import http.client
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_version() -> str:
    nginx = find_nginx()
    if not nginx:
        return "none"
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().split("/")[-1]


def render_nginx_conf(upstream_port: int, listen_port: int, workdir: Path) -> str:
    """deploy/nginx.conf with gunicorn at 127.0.0.1:upstream_port, listening on 127.0.0.1:listen_port, and its
    temporary files under workdir (the packaged defaults may not be writable here); everything else as is."""
    text = NGINX_CONF.read_text()
    subs = [
        (r"(?m)^(\s*)server web:8000;", rf"\g<1>server 127.0.0.1:{upstream_port};"),
        (r"(?m)^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{listen_port};"),
        (r"(?m)^http \{\n", "http {\n" + "".join(f"    {k}_temp_path {workdir / k};\n" for k in TEMP_PATHS)),
    ]
    for pattern, repl in subs:
        text, n = re.subn(pattern, repl, text)
        assert n == 1, f"deploy/nginx.conf: expected exactly one {pattern!r} (bench/slow_clients.py rewrites it)"
    return text


TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def start_nginx(upstream_port: int, listen_port: int) -> tuple[subprocess.Popen, Path]:
    """nginx in the foreground with the rendered config; returns (process, its working folder) once it answers."""
    nginx = find_nginx()
    assert nginx, "nginx not found (`make test` installs the Debian package)"
    workdir = Path(tempfile.mkdtemp(prefix="loupe-nginx-"))
    workdir.chmod(0o755)  # run as root, nginx's workers run as an unprivileged user and write temporary files here
    conf = workdir / "nginx.conf"
    try:
        conf.write_text(render_nginx_conf(upstream_port, listen_port, workdir))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    cmd = [nginx, "-p", str(workdir), "-c", str(conf), "-e", "stderr", "-g", f"daemon off; pid {workdir}/nginx.pid;"]
    check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", listen_port), timeout=1).close()
            return proc, workdir
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nginx did not listen within 15 s")


def stop_nginx(proc: subprocess.Popen, workdir: Path) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


class SlowClients:
    """`n` connections to 127.0.0.1:port kept open and trickling (see the module's docstring), from one thread.
    Use as a context manager; `reopened` counts the connections the server dropped (and this class replaced)."""

    HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n"
    BODY = (
        b"POST /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000000\r\n\r\nusername=slow&password="
    )

    def __init__(self, port: int, n: int = 20, interval: float = 1.0):
        self.port, self.n, self.interval = port, n, interval
        self.socks: list[socket.socket | None] = [None] * n
        self.reopened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            s.sendall(self.HEADERS if i % 2 == 0 else self.BODY)
            s.setblocking(False)
            return s
        except OSError:
            return None

    def _trickle(self, i: int, s: socket.socket) -> bool:
        """One more piece; False when the server has closed or answered (408) this connection."""
        try:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                return False
            s.send(b"X-Slow: 1\r\n" if i % 2 == 0 else b"a")
            return True
        except BlockingIOError:
            return True  # the server is not reading it: exactly what a stuck sync worker does
        except OSError:
            return False

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            for i, s in enumerate(self.socks):
                if s is not None and self._trickle(i, s):
                    continue
                if s is not None:
                    s.close()
                    self.reopened += 1
                self.socks[i] = self._open(i)

    def open_count(self) -> int:
        return sum(s is not None for s in self.socks)

    def __enter__(self) -> SlowClients:
        for i in range(self.n):
            self.socks[i] = self._open(i)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for s in self.socks:
            if s is not None:
                s.close()


def healthz_latencies(port: int, count: int, timeout: float, budget: float) -> list[float | None]:
    """Sequential GET /healthz (as a TLS-terminating proxy would forward it: X-Forwarded-Proto https); seconds per
    request, None for one that failed or took longer than `timeout`. Stops after `budget` seconds."""
    out: list[float | None] = []
    end = time.monotonic() + budget
    while len(out) < count and time.monotonic() < end:
        t = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            conn.request("GET", "/healthz", headers={"X-Forwarded-Proto": "https"})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            out.append(time.perf_counter() - t if resp.status == 200 else None)
        except OSError:
            out.append(None)
    return out


def percentile(latencies: list[float | None], q: float, timeout: float) -> float:
    """The q-th percentile in seconds, a failed or timed-out request counted as `timeout` (a lower bound)."""
    import numpy as np  # noqa: PLC0415

    return float(np.percentile([timeout if x is None else x for x in latencies], q))


def measure(
    nginx_port: int,
    gunicorn_port: int,
    *,
    clients: int = 20,
    count: int = 100,
    settle: float = 2.0,
    direct_timeout: float = 2.0,
    direct_budget: float = 8.0,
) -> dict:
    """/healthz through nginx, then straight to gunicorn, each while `clients` slow clients hold connections to
    the same server. Returns p50/p99 (s) for both, request and failure counts, and how many slow connections
    each server dropped."""
    result = {"clients": clients}
    with SlowClients(nginx_port, clients) as slow:
        time.sleep(settle)
        lat = healthz_latencies(nginx_port, count, timeout=5.0, budget=60.0)
        result["nginx"] = {
            "p50": percentile(lat, 50, 5.0),
            "p99": percentile(lat, 99, 5.0),
            "requests": len(lat),
            "failed": sum(x is None for x in lat),
            "slow_open": slow.open_count(),
            "slow_dropped": slow.reopened,
        }
    with SlowClients(gunicorn_port, clients) as slow:
        time.sleep(settle)
        lat = healthz_latencies(gunicorn_port, count, timeout=direct_timeout, budget=direct_budget)
        result["gunicorn"] = {
            "p50": percentile(lat, 50, direct_timeout),
            "p99": percentile(lat, 99, direct_timeout),
            "requests": len(lat),
            "failed": sum(x is None for x in lat),
            "timeout": direct_timeout,
            "slow_open": slow.open_count(),
            "slow_dropped": slow.reopened,
        }
    return result
