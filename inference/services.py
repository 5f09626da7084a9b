"""Serving: the active model of a project, cached per server process and swapped without a restart.

Every request asks the database which version is active (at most every LOUPE_ACTIVE_MODEL_TTL seconds per
project); a changed version is loaded fully, then swapped in under a lock, so a request sees either the old
or the new model, never a mix, and never fails during a promote.

The few project settings a recognition needs (id, head thresholds, the keep-photos opt-in) are cached beside
it with the same TTL (`serving_context`), so a request that hits the cache runs no SQL at all: at 224 px the
model itself takes ~1-10 ms on this CPU, and three ORM queries cost ~1.5 ms. Saving a project or a head drops
its entry in this process at once; other server processes see the change within the TTL."""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from labeling import storage
from training.models import ModelVersion

from .detector import Detector
from .recognizer import ModelUnavailable, Recognizer

log = logging.getLogger("inference.services")
RETRY_FAILED_LOAD_SECONDS = 30.0  # a version that failed to load is tried again at most this often per process


@dataclass
class Served:
    version_id: int
    number: int
    model: Any  # a Recognizer (active_model) or a Detector (active_detector)

    @property
    def recognizer(self) -> Recognizer:
        return self.model

    @property
    def detector(self) -> Detector:
        return self.model


@dataclass(frozen=True)
class ServingContext:
    """What one recognition request needs to know about its project (cached, see serving_context)."""

    project_id: int
    slug: str
    thresholds: dict  # head name -> threshold
    keep_low_confidence_photos: bool
    members_only: bool = False
    detection_heads: tuple = ()  # names of the detection heads (a shelf project's `container`), in order
    sku_project: str | None = None  # a shelf project's SKU project (slug)


# Keyed by (kind, project id): kind "recognizer" or "detector", so a project asked for the wrong kind never poisons
# the other kind's entry.
_lock = threading.Lock()
_served: dict[tuple[str, int], Served] = {}
_checked_at: dict[tuple[str, int], float] = {}
_contexts: dict[str, tuple[float, ServingContext]] = {}
_loading: dict[tuple[str, int], threading.Lock] = {}  # held by the one thread loading a newly promoted version
_failed: dict[tuple[str, int], tuple[int, float, ModelUnavailable]] = {}  # (version id, when, why) of a failed load


class NoActiveModel(LookupError):
    pass


class NoProject(LookupError):
    pass


def serving_context(*, slug: str) -> ServingContext:
    """The project's serving settings, from this process's cache when younger than LOUPE_ACTIVE_MODEL_TTL.
    Raises NoProject for an unknown slug (not cached: a project created a moment later is found)."""
    now = time.monotonic()
    hit = _contexts.get(slug)
    if hit is not None and now - hit[0] < settings.LOUPE_ACTIVE_MODEL_TTL:
        return hit[1]
    from labeling.models import Head, Project  # noqa: PLC0415 - labeling imports this app's models

    row = (
        Project.objects.filter(slug=slug)
        .values("id", "keep_low_confidence_photos", "members_only", "sku_project__slug")
        .first()
    )
    if row is None:
        raise NoProject(f"No project {slug!r}.")
    heads = list(Head.objects.filter(project_id=row["id"]).values_list("name", "threshold", "kind"))
    ctx = ServingContext(
        project_id=row["id"],
        slug=slug,
        thresholds={name: thr for name, thr, _ in heads},
        keep_low_confidence_photos=row["keep_low_confidence_photos"],
        members_only=row["members_only"],
        detection_heads=tuple(name for name, _, kind in heads if kind == Head.Kind.DETECTION),
        sku_project=row["sku_project__slug"],
    )
    _contexts[slug] = (now, ctx)
    return ctx


def forget_project(slug: str | None = None) -> None:
    """Drop the cached serving settings of one project (all when slug is None); called on Project/Head saves."""
    if slug is None:
        _contexts.clear()
    else:
        _contexts.pop(slug, None)


def _load_recognizer(path: Path) -> Recognizer:
    return Recognizer.load(path, device=settings.LOUPE_SERVING_DEVICE)


def _load_detector(path: Path) -> Detector:
    return Detector.load(path, device=settings.LOUPE_SERVING_DEVICE)


def active_model(*, project_id: int) -> Served:
    """The project's promoted model in this process (served.recognizer). After a promote, the first request to
    notice loads the new version fully (one thread per project at a time) while the process's other threads go on
    answering with the old one; then it is swapped in. A process with nothing loaded yet waits for the load.

    A version whose files cannot be served (Recognizer.load failed) is logged and retried at most every
    RETRY_FAILED_LOAD_SECONDS; meanwhile the previously loaded version goes on serving, or, when there is none,
    ModelUnavailable (code naming the problem: model_file_missing, model_file_corrupt, model_load_failed)."""
    return _active(project_id, "recognizer", _load_recognizer)


def active_detector(*, project_id: int) -> Served:
    """A shelf project's promoted detector (served.detector), cached and swapped like active_model."""
    return _active(project_id, "detector", _load_detector)


def _active(project_id: int, kind: str, load: Callable[[Path], Any]) -> Served:
    key = (kind, project_id)
    now = time.monotonic()
    current = _served.get(key)
    if current is not None and now - _checked_at.get(key, 0) < settings.LOUPE_ACTIVE_MODEL_TTL:
        return current
    row = (
        ModelVersion.objects.filter(project_id=project_id, is_active=True)
        .values("id", "number", "artifact_dir")
        .first()
    )
    if row is None:
        raise NoActiveModel("This project has no promoted model yet: train one and promote it.")
    if current is not None and current.version_id == row["id"]:
        _checked_at[key] = now
        return current
    failed = _failed.get(key)
    if failed is not None and failed[0] == row["id"] and now - failed[1] < RETRY_FAILED_LOAD_SECONDS:
        _checked_at[key] = now
        if current is not None:
            return current
        raise failed[2]
    with _lock:
        loading = _loading.setdefault(key, threading.Lock())
    if not loading.acquire(blocking=current is None):
        return current  # another thread is loading the new version: keep serving the old one meanwhile
    try:
        again = _served.get(key)
        if again is not None and again.version_id == row["id"]:
            return again
        try:
            art = storage.artifact_local(row["artifact_dir"])  # a remote store: fetched into this process's cache
            model = load(art)
        except Exception as exc:  # noqa: BLE001 - a broken version must not take the endpoint down
            error = _unavailable(row["number"], exc, serving=current)
            log.error("%s", error, exc_info=not isinstance(exc, ModelUnavailable))
            with _lock:
                _failed[key] = (row["id"], time.monotonic(), error)
                _checked_at[key] = time.monotonic()
            if current is not None:
                return current
            raise error from exc
        _failed.pop(key, None)
        loaded = Served(version_id=row["id"], number=row["number"], model=model)
        with _lock:
            _served[key] = loaded
            _checked_at[key] = time.monotonic()
        return loaded
    finally:
        loading.release()


def _unavailable(number: int, exc: Exception, *, serving: Served | None) -> ModelUnavailable:
    """The error of a promoted version that cannot be loaded, in words for the API and the log."""
    code = exc.code if isinstance(exc, ModelUnavailable) else "model_load_failed"
    still = f"; v{serving.number} goes on serving" if serving is not None else ""
    return ModelUnavailable(
        f"The promoted model v{number} cannot be served: {exc}{still}. Promote another version or train a new one.",
        code=code,
        problems=getattr(exc, "problems", None),
    )


def forget_all() -> None:
    """Drop cached models and project settings (tests)."""
    with _lock:
        _served.clear()
        _failed.clear()
        _checked_at.clear()
        _contexts.clear()
        _loading.clear()


def recognition_keep(
    *, project, served, blobs: list[bytes], result: dict, mode: str, user=None, written: list[str] | None = None
):
    """Production feedback: when the project opts in and some head got no label, store the photos as
    `production` images (content-addressed, unlabeled) and the prediction, for the low-confidence queue.
    `project` is a Project or a ServingContext (the Project row is then read only when something is kept).
    Returns the Recognition or None. One transaction; files written are removed if it fails. A caller that
    keeps more inside its own transaction passes `written` (the names of the files written are added to it) and
    removes them when its transaction fails."""
    from django.db import transaction

    from .models import Recognition

    if not project.keep_low_confidence_photos or all(h["label"] is not None for h in result["heads"].values()):
        return None
    if isinstance(project, ServingContext):
        from labeling.models import Project  # noqa: PLC0415

        project = Project.objects.get(pk=project.project_id)
    written = [] if written is None else written
    try:
        with transaction.atomic():
            rec = Recognition.objects.create(
                project=project,
                model_version=served.number,
                mode=mode,
                result={"heads": result["heads"], "reason": result.get("reason")},
                unclassifiable=bool(result.get("unclassifiable")),
                user=user if getattr(user, "is_authenticated", False) else None,
            )
            heads = list(project.heads.all())
            for data in blobs:
                image = production_image_store(
                    project=project, data=data, name=f"recognition-{rec.id}", heads=heads, written=written
                )
                rec.images.add(image)
    except Exception:
        storage.delete_quietly(written)
        raise
    return rec


def production_image_store(
    *, project, data: bytes, name: str, heads: list, written: list[str], size: tuple[int, int] | None = None
):
    """The project's image with these bytes, stored as a new `production` photo (file + thumbnail, an empty label
    per class head, group `name`) when it has none yet. Call inside a transaction; the names of the files written
    are added to `written`, for the caller to remove if the transaction fails."""
    import hashlib

    from labeling.models import Head, Image, Label

    from .decode import _sniff_ext

    sha = hashlib.sha256(data).hexdigest()
    image = Image.objects.filter(project=project, sha256=sha).first()
    if image is not None:
        return image
    file_name = storage.image_name(project.slug, sha, _sniff_ext(data))
    if storage.store_bytes(file_name, data):
        written.append(file_name)
    thumb = ""
    thumb_bytes = storage.make_thumbnail(data)
    if thumb_bytes:
        thumb = storage.thumb_name(project.slug, sha)
        if storage.store_bytes(thumb, thumb_bytes):
            written.append(thumb)
    image = Image.objects.create(
        project=project,
        sha256=sha,
        file=file_name,
        thumbnail=thumb,
        original_name=f"{name}{_sniff_ext(data)}",
        byte_size=len(data),
        group_key=name,  # the photos of one object are one group
        source=Image.Source.PRODUCTION,
        width=size[0] if size else None,
        height=size[1] if size else None,
    )
    Label.objects.bulk_create([Label(image=image, head=h) for h in heads if h.kind == Head.Kind.CLASS])
    return image


def production_purge(*, project, now=None) -> int:
    """Delete production photos older than the project's retention that nobody labeled (labeled ones are
    training data now), and older Recognition rows. Returns the number of images deleted."""
    import datetime as dt

    from django.db.models import Exists, OuterRef
    from django.utils import timezone

    from labeling.models import Image, Label

    from .models import Recognition

    cutoff = (now or timezone.now()) - dt.timedelta(days=project.production_retention_days)
    labeled = Label.objects.filter(image=OuterRef("pk"), label_class__isnull=False)
    old = Image.objects.filter(project=project, source=Image.Source.PRODUCTION, created_at__lt=cutoff).exclude(
        Exists(labeled)
    )
    files = [n for pair in old.values_list("file", "thumbnail") for n in pair if n]
    count = old.count()
    old.delete()
    Recognition.objects.filter(project=project, created_at__lt=cutoff).delete()
    storage.delete_quietly(files)
    return count
