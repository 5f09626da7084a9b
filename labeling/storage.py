"""Content-addressed image storage: images/<project>/<sha[:2]>/<sha>.<ext>, thumbnails beside them.
All access goes through Django's storage API so S3 is a settings change."""

import io

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from PIL import Image as PILImage

THUMB_SIDE = 256


def image_name(project_slug: str, sha256: str, ext: str) -> str:
    return f"images/{project_slug}/{sha256[:2]}/{sha256}{ext}"


def thumb_name(project_slug: str, sha256: str) -> str:
    return f"images/{project_slug}/{sha256[:2]}/{sha256}.thumb.jpg"


def store_bytes(name: str, data: bytes) -> bool:
    """Write `data` under `name` unless it is already there. True when a file was written."""
    if default_storage.exists(name):
        return False
    saved = default_storage.save(name, ContentFile(data))
    if saved != name:  # a concurrent writer got there first; content is identical by construction
        default_storage.delete(saved)
        return False
    return True


def make_thumbnail(data: bytes) -> bytes | None:
    """A JPEG thumbnail (<= 256 px), decoded at reduced size; None when the image cannot be decoded."""
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
            img = img.convert("RGB")
            img.thumbnail((THUMB_SIDE, THUMB_SIDE), PILImage.Resampling.BICUBIC)
            out = io.BytesIO()
            img.save(out, "JPEG", quality=85)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - any decode failure means "no thumbnail"
        return None


def local_path(name: str) -> str:
    """A local filesystem path for the training engine and the index builder."""
    return default_storage.path(name)


def delete_quietly(names: list[str]) -> None:
    for name in names:
        try:
            default_storage.delete(name)
        except OSError:
            pass
