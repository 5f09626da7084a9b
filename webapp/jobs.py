"""Background jobs that survive what operators see: a broker that is down when an admin clicks, a broker that
restarts empty, a worker killed mid-task. Three pieces, used by every app that queues work:

- `send` / `send_on_commit` publish a task under a stable id (`<kind>:<row id>`) and turn a broker outage into
  `BrokerUnavailable` (a 503 in the one error shape) after running the caller's undo, so nothing is left behind;
- `heartbeat` keeps a row's `heartbeat_at` fresh from a side thread while a task runs, so a stale heartbeat
  means the worker is gone (not merely busy in a step that reports no progress);
- `broker_waiting` tells whether a message still waits in the broker, for the reconciler
  (`training.reconcile`) that re-sends rows whose message a restarted broker lost.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connection, models, transaction
from django.db.models import Q
from django.utils import timezone
from rest_framework import status

from webapp.errors import ApiError

log = logging.getLogger(__name__)

# Publishing gives up after this: an admin's click must not hang on a dead broker.
_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


class JobStatus(models.TextChoices):
    """The states of every job row (training runs, health scans, pipeline jobs), defined once."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


class JobRow(models.Model):
    """What every job row has, whatever its kind: state, who asked, when, a heartbeat the reconciler reads, how
    often a lost worker restarted it, why it failed, and a cancel request the worker honours at its next progress
    report. Subclasses: training.TrainingRun, labeling.HealthReport, training.Job."""

    Status = JobStatus

    status = models.CharField(max_length=20, choices=JobStatus.choices, default=JobStatus.QUEUED)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Times a worker was lost mid-job and the job was resumed or restarted (the reconciler).
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    # A cancel asked for while the job was running: the worker stops at its next progress report.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        abstract = True

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES


class JobCancelled(Exception):
    """Raised inside a job at a progress report after an admin asked to cancel it."""


def cancel_request(model, pk: int, *, user, error: type[Exception], what: str):
    """Ask job row `pk` of `model` to stop: under a row lock, refuse (`error`) a job that already ended, record who
    asked and when (once). Returns (row, queued): a queued job is the caller's to mark cancelled at once; a running
    one stops at its next progress report."""
    with transaction.atomic():
        row = model.objects.select_for_update().get(pk=pk)
        if not row.is_active:
            raise error(f"{what} {row.pk} already {row.status}; there is nothing to cancel.")
        if row.cancel_requested_at is None:
            row.cancel_requested_at, row.cancel_requested_by = timezone.now(), user
            row.save(update_fields=["cancel_requested_at", "cancel_requested_by"])
        return row, row.status == JobStatus.QUEUED


def cancel_requested(model, pk: int) -> bool:
    return model.objects.filter(pk=pk, cancel_requested_at__isnull=False).exists()


def one_active_per(fields: list[str], name: str, also: models.Q | None = None) -> models.UniqueConstraint:
    """'One queued or running job of a kind per project' as a partial unique constraint (no race can break it);
    `also` narrows the rows it covers."""
    condition = models.Q(status__in=list(ACTIVE_STATUSES))
    return models.UniqueConstraint(fields=fields, condition=condition & also if also else condition, name=name)


class BrokerUnavailable(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE

    def __init__(self, what: str, exc: Exception | None = None):
        reason = f" ({type(exc).__name__}: {exc})" if exc else ""
        super().__init__(
            f"The task queue (broker) is not reachable, so {what} was not started and nothing was changed{reason}. "
            "Check that Redis (or the configured broker) is running, then try again.",
            code="broker_unavailable",
        )


def limits(name: str) -> dict:
    """Celery time limits of task `name` from settings.LOUPE_TASK_TIME_LIMITS: the soft limit a minute before the
    hard one, so the task can record why it stopped."""
    hard = int(settings.LOUPE_TASK_TIME_LIMITS[name])
    return {"time_limit": hard, "soft_time_limit": max(1, hard - 60)}


def task_id(kind: str, pk: int) -> str:
    """The stable id of the message for one row: the reconciler looks for it in the broker."""
    return f"loupe:{kind}:{pk}"


def send(task, *args, kind: str, pk: int, what: str) -> None:
    """Publish `task(*args)` under `task_id(kind, pk)`; BrokerUnavailable when the broker cannot take it. `task` is a
    task or a task's registered name: the lower apps queue the pipeline's steps by name without importing it."""
    from kombu.exceptions import OperationalError

    if isinstance(task, str):
        from webapp.celery import app

        task = app.signature(task)
    name = getattr(task, "name", None) or getattr(task, "task", "?")
    try:
        task.apply_async(args=args, task_id=task_id(kind, pk), retry=True, retry_policy=_RETRY_POLICY)
    except (OperationalError, OSError) as exc:
        log.warning("cannot publish %s for %s %s: %s", name, kind, pk, exc)
        raise BrokerUnavailable(what, exc) from exc


def send_on_commit(task, *args, kind: str, pk: int, what: str, undo: Callable[[], None] | None = None) -> None:
    """`send` once the surrounding transaction commits. If the broker refuses, `undo` reverts the committed
    change (deletes the new job row, restores the old state) and BrokerUnavailable propagates to the caller.
    With `undo=None` the row stays for the reconciler to send later and the failure is only logged."""

    def publish() -> None:
        try:
            send(task, *args, kind=kind, pk=pk, what=what)
        except BrokerUnavailable:
            if undo is None:
                log.warning("%s %s stays queued; the reconciler sends it when the broker is back", kind, pk)
                return
            undo()
            raise

    transaction.on_commit(publish)


def heartbeat_seconds() -> float:
    return float(getattr(settings, "LOUPE_HEARTBEAT_SECONDS", 30.0))


def lost_after_seconds() -> float:
    return float(getattr(settings, "LOUPE_JOB_LOST_AFTER_SECONDS", 300.0))


@contextmanager
def heartbeat(model, pk: int, field: str = "heartbeat_at"):
    """While the block runs, set `model(pk).<field>` to now every LOUPE_HEARTBEAT_SECONDS from a side thread
    (its own database connection), so a long step without progress reports does not look like a dead worker."""
    stop = threading.Event()
    every = heartbeat_seconds()

    def beat() -> None:
        try:
            while not stop.wait(every):
                try:
                    model.objects.filter(pk=pk).update(**{field: timezone.now()})
                except Exception:  # noqa: BLE001 - a missed beat is retried; the job itself goes on
                    log.warning("heartbeat of %s %s failed", model.__name__, pk, exc_info=True)
                    close_old_connections()
        finally:
            connection.close()

    thread = threading.Thread(target=beat, name=f"heartbeat-{model.__name__}-{pk}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 10)


def broker_waiting(tid: str, queues: tuple[str, ...] = ("default", "gpu")) -> bool | None:
    """Whether a message with task id `tid` still waits in one of `queues` (not yet delivered to a worker).
    Knows Redis (the queue lists, priority lists included) and kombu's filesystem transport (one file per
    message); None for other brokers, which the reconciler then trusts."""
    from webapp.celery import app

    needle = tid.encode()
    with app.connection_for_read() as conn:
        url = conn.as_uri()
        if url.startswith(("redis://", "rediss://")):
            client = conn.default_channel.client
            keys = [k for q in queues for k in (q, *(f"{q}\x06\x16{p}" for p in range(1, 10)))]
            return any(needle in item for key in keys for item in client.lrange(key, 0, -1))
    if url.startswith("filesystem"):
        folder = Path((app.conf.broker_transport_options or {}).get("data_folder_in", ""))
        if not folder.is_dir():
            return False
        for path in folder.iterdir():
            try:
                if needle in path.read_bytes():
                    return True
            except OSError:  # consumed meanwhile
                continue
        return False
    return None


# ---------------------------------------------------------------------------------------------- reconcile
QUEUED_GRACE = dt.timedelta(seconds=60)  # between publishing and a worker claiming the row


def _max_attempts() -> int:
    return int(getattr(settings, "LOUPE_JOB_MAX_ATTEMPTS", 3))


def message_waiting(kind: str, pk: int) -> bool:
    """True when the broker still holds the message undelivered, or when the broker cannot be asked."""
    try:
        held = broker_waiting(task_id(kind, pk))
    except Exception:  # noqa: BLE001 - a broker that cannot be asked cannot take a re-send either
        log.warning("cannot inspect the broker for %s %s", kind, pk, exc_info=True)
        return True
    return True if held is None else held


def resend(task, pk: int, kind: str) -> bool:
    try:
        send(task, pk, kind=kind, pk=pk, what=f"{kind} {pk}")
    except BrokerUnavailable:
        return False
    return True


def _lost_note(row, now) -> str:
    seen = timezone.localtime(row.heartbeat_at).strftime("%Y-%m-%d %H:%M:%S") if row.heartbeat_at else "never"
    return f"Worker lost (no heartbeat since {seen})"


def rows_reconcile(
    model,
    qs,
    *,
    kind: str,
    task,
    resume: str,
    cancel: Callable[[int], None],
    on_failed: Callable[[int], None] | None = None,
) -> dict:
    """Requeue the lost `running` rows of `qs` and re-send the `queued` ones whose message is gone; a row lost too
    often fails (then `on_failed(pk)`). A lost row whose cancel was asked for is cancelled by `cancel(pk)`."""
    now = timezone.now()
    stale = now - dt.timedelta(seconds=lost_after_seconds())
    out = {"lost": [], "failed": [], "resent": []}
    running_lost = qs.filter(Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True), status=model.Status.RUNNING)
    for pk in running_lost.filter(cancel_requested_at__isnull=False).values_list("pk", flat=True):
        cancel(pk)  # cancelled while its worker was lost: not resumed
    for row in running_lost.filter(cancel_requested_at__isnull=True):
        if row.attempts + 1 >= _max_attempts():
            failed = model.objects.filter(pk=row.pk, status=model.Status.RUNNING, heartbeat_at=row.heartbeat_at).update(
                status=model.Status.FAILED,
                finished_at=now,
                error=f"{_lost_note(row, now)}: lost {row.attempts + 1} times, so it was stopped. "
                "The worker may run out of memory on this job; see the worker's log, then start it again.",
            )
            if failed:
                out["failed"].append(row.pk)
                if on_failed is not None:
                    on_failed(row.pk)
            continue
        # Conditional on the heartbeat read: a worker that beat meanwhile keeps its row.
        requeued = model.objects.filter(pk=row.pk, status=model.Status.RUNNING, heartbeat_at=row.heartbeat_at).update(
            status=model.Status.QUEUED,
            attempts=row.attempts + 1,
            error=f"{_lost_note(row, now)}; requeued at {timezone.localtime(now):%H:%M:%S}: {resume}.",
        )
        if requeued:
            out["lost"].append(row.pk)
            log.warning("%s %s lost its worker; requeued", kind, row.pk)
            if resend(task, row.pk, kind):
                out["resent"].append(row.pk)
    for row in qs.filter(status=model.Status.QUEUED, created_at__lt=now - QUEUED_GRACE).exclude(pk__in=out["lost"]):
        if not message_waiting(kind, row.pk) and resend(task, row.pk, kind):
            log.warning("%s %s was queued but its message was gone; re-sent", kind, row.pk)
            out["resent"].append(row.pk)
    return out


# ---------------------------------------------------------------------------------------------- visibility
# Every kind of job row, by app label: the pages ask where a job stands without importing the apps above theirs.
JOB_MODELS = ("training.TrainingRun", "labeling.HealthReport", "labeling.ImportRun", "training.Job")


def queue_of(task_name: str) -> str:
    """The Celery queue a task goes to (settings.CELERY_TASK_ROUTES, glob patterns included)."""
    from fnmatch import fnmatchcase

    for pattern, route in settings.CELERY_TASK_ROUTES.items():
        if fnmatchcase(task_name, pattern):
            return route.get("queue", settings.CELERY_TASK_DEFAULT_QUEUE)
    return settings.CELERY_TASK_DEFAULT_QUEUE


def _ahead_on(queue: str, before) -> tuple[int, list]:
    """How many active job rows of every kind, on `queue`, run before a row created at `before`: every running
    one and every queued one created earlier. Also returns the running rows (their ETAs bound the wait)."""
    from django.apps import apps

    n, running = 0, []
    for label in JOB_MODELS:
        model = apps.get_model(label)
        rows = model.objects.filter(Q(status=JobStatus.RUNNING) | Q(status=JobStatus.QUEUED, created_at__lt=before))
        for row in rows:
            if queue_of(row.task_name) != queue:
                continue
            n += 1
            if row.status == JobStatus.RUNNING:
                running.append(row)
    return n, running


def eta_seconds(row) -> float | None:
    """Seconds left for a running row: the engine's own estimate for training runs, else the pace so far."""
    if row.status != JobStatus.RUNNING:
        return None
    if getattr(row, "eta_s", None) is not None:
        return float(row.eta_s)
    progress = getattr(row, "progress", None)
    if not progress or not row.started_at:
        return None
    elapsed = (timezone.now() - row.started_at).total_seconds()
    return max(0.0, elapsed / progress - elapsed)


def describe(row) -> dict:
    """Where a job stands, for pages and the API: {"type", "id", "what", "status", "step", "progress", "eta_s",
    "queue", "ahead", "wait_s", "error", "created_at", "started_at", "finished_at", "cancel_requested"}. "ahead" counts
    the jobs of any project that run before a queued one on its queue; "wait_s" is the longest ETA among those
    running (None when unknown)."""
    queue = queue_of(row.task_name)
    out = {
        "type": row._meta.label_lower.split(".")[1],
        "id": row.pk,
        "what": row.what,
        "status": row.status,
        "step": getattr(row, "step", "") or getattr(row, "phase", "") or "",
        "progress": row.progress,
        "eta_s": eta_seconds(row),
        "queue": queue,
        "ahead": None,
        "wait_s": None,
        "error": row.error,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "cancel_requested": row.cancel_requested_at is not None,
    }
    if row.status == JobStatus.QUEUED:
        ahead, running = _ahead_on(queue, row.created_at)
        etas = [eta_seconds(r) for r in running]
        out["ahead"] = ahead
        out["wait_s"] = max(etas) if etas and None not in etas else None
    return out
