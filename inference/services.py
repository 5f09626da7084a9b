"""Serving: the active model of a project, cached per server process and swapped without a restart.

Every request asks the database which version is active (at most every LOUPE_ACTIVE_MODEL_TTL seconds per
project); a changed version is loaded fully, then swapped in under a lock, so a request sees either the old
or the new model, never a mix, and never fails during a promote."""

import threading
import time
from dataclasses import dataclass

from django.conf import settings

from training.models import ModelVersion

from .core import Recognizer


@dataclass
class Served:
    version_id: int
    number: int
    recognizer: Recognizer


_lock = threading.Lock()
_served: dict[int, Served] = {}
_checked_at: dict[int, float] = {}


class NoActiveModel(LookupError):
    pass


def active_model(*, project_id: int) -> Served:
    now = time.monotonic()
    current = _served.get(project_id)
    if current is not None and now - _checked_at.get(project_id, 0) < settings.LOUPE_ACTIVE_MODEL_TTL:
        return current
    row = (
        ModelVersion.objects.filter(project_id=project_id, is_active=True)
        .values("id", "number", "artifact_dir")
        .first()
    )
    if row is None:
        raise NoActiveModel("This project has no promoted model yet: train one and promote it.")
    if current is not None and current.version_id == row["id"]:
        _checked_at[project_id] = now
        return current
    loaded = Served(version_id=row["id"], number=row["number"], recognizer=Recognizer.load(row["artifact_dir"]))
    with _lock:
        _served[project_id] = loaded
        _checked_at[project_id] = now
    return loaded


def forget_all() -> None:
    """Drop cached models (tests)."""
    with _lock:
        _served.clear()
        _checked_at.clear()


def recognition_keep(*, project, served, blobs: list[bytes], result: dict, mode: str, user=None):
    """Production feedback: when the project opts in and some head got no label, store the photos as
    `production` images (content-addressed, unlabeled) and the prediction, for the low-confidence queue.
    Returns the Recognition or None. One transaction; files written are removed if it fails."""
    import hashlib

    from django.db import transaction

    from labeling import storage
    from labeling.models import Image, Label

    from .core import _sniff_ext
    from .models import Recognition

    if not project.keep_low_confidence_photos or all(h["label"] is not None for h in result["heads"].values()):
        return None
    written: list[str] = []
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
                sha = hashlib.sha256(data).hexdigest()
                image = Image.objects.filter(project=project, sha256=sha).first()
                if image is None:
                    name = storage.image_name(project.slug, sha, _sniff_ext(data))
                    if storage.store_bytes(name, data):
                        written.append(name)
                    thumb = ""
                    thumb_bytes = storage.make_thumbnail(data)
                    if thumb_bytes:
                        thumb = storage.thumb_name(project.slug, sha)
                        if storage.store_bytes(thumb, thumb_bytes):
                            written.append(thumb)
                    image = Image.objects.create(
                        project=project,
                        sha256=sha,
                        file=name,
                        thumbnail=thumb,
                        original_name=f"recognition-{rec.id}{_sniff_ext(data)}",
                        byte_size=len(data),
                        group_key=f"recognition-{rec.id}",  # the photos of one object are one group
                        source=Image.Source.PRODUCTION,
                    )
                    Label.objects.bulk_create([Label(image=image, head=h) for h in heads])
                rec.images.add(image)
    except Exception:
        storage.delete_quietly(written)
        raise
    return rec


def production_purge(*, project, now=None) -> int:
    """Delete production photos older than the project's retention that nobody labeled (labeled ones are
    training data now), and older Recognition rows. Returns the number of images deleted."""
    import datetime as dt

    from django.db.models import Exists, OuterRef
    from django.utils import timezone

    from labeling import storage
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
