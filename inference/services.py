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
