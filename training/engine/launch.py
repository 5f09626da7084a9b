"""Train a run in one process or, when config "devices" asks for several, in N processes started by torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N -m training.engine.ddp_rank RUN_DIR`, the
running interpreter's torch): what the gpu task calls (training.services.training_run_train). Pure: no Django.

The launcher and its processes talk through files in RUN_DIR/ddp/ (each written whole, atomic.py):

    request.json    the launcher's: the resolved config, fresh/resume, the feature cache, the collective timeout
    progress.json   rank 0's: {"seq", "epochs": [every finished epoch's report], "last": the latest report};
                    the launcher polls it and passes each new report to `progress` (epoch reports in order, none
                    twice), so the TrainingRun row moves as it does in one process
    result.json     rank 0's metrics, once the artifact files are written (RUN_DIR/metrics.json as usual)
    error-<k>.json  a failing process's exception ({"rank", "type", "message", "traceback"})
    rank-<k>.pid    each process's pid, so that nothing outlives a cancelled or failed run
    torchrun.log    torchrun's and the processes' output (appended per launch; its tail goes into errors)

An exception raised by `progress` (TrainingCancelled), by the caller's time limit (Celery's soft limit) or a
Ctrl-C stops torchrun and every process (SIGTERM, then SIGKILL) before it propagates; rank 0 also stops by itself
when the launcher is gone (LOUPE_DDP_LAUNCHER_PID). The tail fine-tune and the quick retrain run in this process
whatever "devices" says, and their metrics say why (metrics["distributed"])."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .atomic import write_json_atomic, write_text_atomic
from .config import resolve_config

log = logging.getLogger("training.engine")

DDP_DIR = "ddp"
ENTRY = "training.engine.ddp_rank"
LAUNCHER_PID_ENV = "LOUPE_DDP_LAUNCHER_PID"
POLL_S = 0.5
STOP_GRACE_S = 20.0  # after SIGTERM, torchrun stops its processes (SIGTERM, then SIGKILL after its own 30 s)
LOG_TAIL_CHARS = 4000


class DistributedTrainingError(RuntimeError):
    """A distributed run failed (a process crashed or was killed, or the run timed out): the message names the
    process and ends with the tail of torchrun's output."""


def train_run(
    manifest: dict,
    config: dict | None,
    out_dir,
    *,
    progress: Callable[[dict], None] | None = None,
    resume: bool = True,
    fresh: bool = False,
    cache_dir=None,
    timeout_s: float | None = None,
    collective_timeout_s: float | None = None,
) -> dict:
    """Train into out_dir and return the metrics: the quick retrain (config "quick"), or train_model in this process,
    or in config["devices"] processes under torchrun (DDP). ValueError for a bad config or a "devices" this machine
    cannot give (before anything runs); DistributedTrainingError when a process fails (its error, else the tail of
    torchrun's output) or the run outlives timeout_s (seconds, None = no limit)."""
    from .distributed import requested_processes, single_process_reason  # noqa: PLC0415 - imports torch

    cfg = resolve_config(config)
    reason = single_process_reason(cfg)
    if reason is not None:
        metrics = _train_here(manifest, config, cfg, out_dir, progress, resume, fresh, cache_dir)
        asked = cfg["devices"]
        if asked != 1 and (asked != "auto" or _cuda_count() > 1):
            log.warning("config 'devices' = %r, but %s", asked, reason)
            metrics["distributed"] = {"processes": 1, "devices": asked, "why": reason}
            metrics_path = Path(out_dir) / "metrics.json"
            if metrics_path.is_file():  # the record of the run says it too
                on_disk = json.loads(metrics_path.read_text(encoding="utf-8"))
                write_json_atomic(metrics_path, {**on_disk, "distributed": metrics["distributed"]}, indent=1)
        return metrics
    n = requested_processes(cfg)
    if n == 1:
        return _train_here(manifest, config, cfg, out_dir, progress, resume, fresh, cache_dir)
    return launch(
        manifest,
        cfg,
        out_dir,
        processes=n,
        progress=progress,
        resume=resume,
        fresh=fresh,
        cache_dir=cache_dir,
        timeout_s=timeout_s,
        collective_timeout_s=collective_timeout_s,
    )


def _cuda_count() -> int:
    from .distributed import cuda_device_count  # noqa: PLC0415

    return cuda_device_count()


def _train_here(manifest, config, cfg, out_dir, progress, resume, fresh, cache_dir) -> dict:
    if cfg["quick"]:  # heads only, on cached frozen features: seconds once the cache is warm
        from .quick import train_quick  # noqa: PLC0415

        return train_quick(manifest, config, out_dir, cache_dir=cache_dir, progress=progress)
    from .loop import train_model  # noqa: PLC0415

    return train_model(manifest, config, out_dir, progress=progress, resume=resume, fresh=fresh, cache_dir=cache_dir)


def launch(
    manifest: dict,
    config: dict,
    out_dir,
    *,
    processes: int,
    progress: Callable[[dict], None] | None = None,
    resume: bool = True,
    fresh: bool = False,
    cache_dir=None,
    timeout_s: float | None = None,
    collective_timeout_s: float | None = None,
    poll_s: float = POLL_S,
) -> dict:
    """train_model in `processes` processes under torchrun (see the module's docstring); returns rank 0's metrics."""
    from .distributed import DEFAULT_COLLECTIVE_TIMEOUT_S  # noqa: PLC0415

    out_dir = Path(out_dir)
    ddp = out_dir / DDP_DIR
    _clear(ddp)
    _write_manifest(out_dir / "manifest.json", manifest)
    write_json_atomic(
        ddp / "request.json",
        {
            "config": config,
            "resume": resume,
            "fresh": fresh,
            "cache_dir": None if cache_dir is None else str(cache_dir),
            "collective_timeout_s": collective_timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S,
        },
    )
    root = Path(__file__).resolve().parents[2]  # the folder that holds the `training` package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        f"--log-dir={ddp / 'torchelastic'}",
        "-m",
        ENTRY,
        str(out_dir),
    ]
    log_path = ddp / "torchrun.log"
    with log_path.open("ab") as log_file:
        log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log_file.flush()
        log_start = log_file.tell()
        log.info("training in %d processes (torchrun), output in %s", processes, log_path)
        proc = subprocess.Popen(  # noqa: S603 - our interpreter and module, no shell
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one, and not by the caller's terminal
        )
    forward = _Forwarder(ddp / "progress.json", progress)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            forward.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise DistributedTrainingError(
                    f"distributed training did not finish within {timeout_s:g} s: stopped"
                    + _log_tail(log_path, log_start)
                )
            time.sleep(poll_s)
        forward.poll()  # the reports written just before the end
    except BaseException:
        stop(proc, ddp)
        raise
    if proc.returncode != 0:
        stop(proc, ddp)  # a process torchrun did not reap (it was killed itself)
        raise _failure(ddp, proc.returncode, _log_tail(log_path, log_start))
    result = ddp / "result.json"
    if not result.is_file():
        raise DistributedTrainingError(
            "distributed training ended without a result (rank 0 wrote no result.json)" + _log_tail(log_path, log_start)
        )
    metrics = json.loads(result.read_text(encoding="utf-8"))
    _clear(ddp)
    return metrics


def _clear(ddp: Path) -> None:
    """Remove the previous launch's exchange files (not torchrun.log)."""
    ddp.mkdir(parents=True, exist_ok=True)
    for path in ddp.iterdir():
        if path.name == "torchrun.log":
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_manifest(path: Path, manifest: dict) -> None:
    """RUN_DIR/manifest.json as the processes read it (the caller usually wrote it already: left as it is then)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")) == manifest:
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(path, manifest)


def _strip(event: dict) -> dict:
    return {k: v for k, v in event.items() if k != "seq"}


class _Forwarder:
    """Reads progress.json and passes every report not seen yet to `progress`: finished epochs in order, then the
    latest report when it is newer than everything passed on (intermediate step reports may be skipped)."""

    def __init__(self, path: Path, progress: Callable[[dict], None] | None):
        self.path = path
        self.progress = progress
        self.epochs_sent = 0
        self.seq_sent = 0

    def poll(self) -> None:
        if self.progress is None:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return
        if data["seq"] <= self.seq_sent:
            return
        seen = self.seq_sent
        self.seq_sent = data["seq"]
        for event in data["epochs"][self.epochs_sent :]:
            self.epochs_sent += 1  # counted first: a report that raised (a cancel) is not passed on again
            self.progress(_strip(event))
        last = data["last"]
        if last.get("phase") != "epoch" and last["seq"] > seen:
            self.progress(_strip(last))


class ProgressFile:
    """Rank 0's progress callback: each report into progress.json (see _Forwarder). Raises when the launcher is
    gone (its pid in LOUPE_DDP_LAUNCHER_PID no longer exists), so that torchrun stops the run."""

    def __init__(self, path: Path, launcher_pid: int | None = None):
        self.path = Path(path)
        self.launcher_pid = launcher_pid
        self.seq = 0
        self.epochs: list[dict] = []

    def __call__(self, event: dict) -> None:
        from .results import _clean  # noqa: PLC0415 - NaN/inf as null

        if self.launcher_pid is not None and not _alive(self.launcher_pid):
            raise RuntimeError(f"the process that launched this training (pid {self.launcher_pid}) is gone: stopping")
        self.seq += 1
        event = {**_clean(event), "seq": self.seq}
        if event.get("phase") == "epoch":
            self.epochs.append(event)
        write_json_atomic(self.path, {"seq": self.seq, "epochs": self.epochs, "last": event}, indent=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _rank_pids(ddp: Path) -> list[int]:
    pids = []
    for path in ddp.glob("rank-*.pid"):
        try:
            pids.append(int(path.read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def _is_rank(pid: int) -> bool:
    """Whether pid is still one of our training processes (not a recycled pid)."""
    try:
        return ENTRY.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop(proc: subprocess.Popen, ddp: Path, grace_s: float = STOP_GRACE_S) -> None:
    """Stop torchrun and every training process: SIGTERM to torchrun's process group (it stops its processes), then
    SIGKILL to what is left of it, then SIGKILL to any training process still alive (each runs in a session of its
    own). Returns when none is left (or after a few seconds more, logged)."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    left = [pid for pid in _rank_pids(ddp) if _alive(pid) and _is_rank(pid)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0
    while any(_alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    still = [pid for pid in left if _alive(pid)]
    if still:
        log.error("training processes %s did not stop", still)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _log_tail(path: Path, start: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - LOG_TAIL_CHARS))
            text = f.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f"\n--- torchrun output (last lines) ---\n{text}" if text else ""


_ROOT_CAUSE = re.compile(
    r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+).*?traceback\s*:\s*([^\n]*)",
    re.DOTALL,
)


def _failure(ddp: Path, returncode: int, tail: str) -> Exception:
    """The exception of a failed launch: the error of the process that failed first (torchrun's "root cause"), a
    ValueError as it was (a message for a person); a process killed before it could say anything (a signal, the
    kernel's OOM killer) as torchrun reported it; else the first error written."""
    errors = {}
    for path in ddp.glob("error-*.json"):
        try:
            error = json.loads(path.read_text(encoding="utf-8"))
            errors[int(error["rank"])] = (path.stat().st_mtime, error)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    root = _ROOT_CAUSE.search(tail)
    if root is not None and int(root.group(1)) not in errors:
        rank, code, why = int(root.group(1)), int(root.group(2)), root.group(3).strip()
        return DistributedTrainingError(
            f"training process {rank} died without an error of its own (exit code {code}: {why}); torchrun stopped "
            f"the others{tail}"
        )
    if errors:
        first = (errors[int(root.group(1))] if root is not None else min(errors.values(), key=lambda e: e[0]))[1]
        if first.get("type") == "ValueError":
            return ValueError(first["message"])
        return DistributedTrainingError(
            f"training process {first.get('rank')} failed: {first.get('type')}: {first.get('message')}\n"
            f"{first.get('traceback', '')[-2000:]}{tail}"
        )
    return DistributedTrainingError(
        f"distributed training failed (torchrun exit status {returncode}; a process was killed or crashed before "
        f"it could report){tail}"
    )


def write_error(ddp: Path, rank: int, exc: BaseException, tb: str) -> None:
    """error-<rank>.json for the launcher (ddp_rank.py, when the process fails)."""
    write_json_atomic(
        ddp / f"error-{rank}.json",
        {"rank": rank, "type": type(exc).__name__, "message": str(exc)[:5000], "traceback": tb[-5000:]},
    )


def write_pid(ddp: Path, rank: int) -> None:
    write_text_atomic(ddp / f"rank-{rank}.pid", str(os.getpid()))
