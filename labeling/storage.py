"""Content-addressed image storage: images/<project>/<sha[:2]>/<sha>.<ext>, thumbnails beside them, and the
published artifacts of model versions under artifacts/<project>/run-<id>/.

All access goes through Django's storage API, so S3 (STORAGE_URL=s3://…) is a settings change. With a remote
store no process assumes a shared disk:
- `local_path(s)` give a local file for a stored name: the file itself on a local store, else a copy in this
  process's read-through cache (LOUPE_CACHE_DIR/blobs/<sha[:2]>/<sha>.<ext>: content-addressed, so a copy never
  goes stale and projects share it);
- `artifact_publish(dir)` uploads what a worker wrote into a run's artifact folder (checkpoints stay local: they
  are the worker's resume state), and `artifact_local(dir)` gives any process a local folder holding the
  published files of that run, fetching what it lacks or what changed (an index rebuilt after new labels)."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from PIL import Image as PILImage

log = logging.getLogger(__name__)
THUMB_SIDE = 256
ARTIFACTS = "artifacts"
# Files of an artifact folder that are never published: the worker's resume state and half-written temp files.
UNPUBLISHED_DIRS = ("checkpoints",)
_SHA_NAME = re.compile(r"^[0-9a-f]{64}[.]")
_CHUNK = 1 << 20


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


def is_remote() -> bool:
    """True when the default storage has no local paths (S3 and the like)."""
    try:
        default_storage.path("x")
    except NotImplementedError:
        return True
    return False


def _cache_file(name: str) -> Path:
    base = Path(name).name
    root = Path(settings.LOUPE_CACHE_DIR)
    if _SHA_NAME.match(base):  # content-addressed: one copy per content, whatever the project
        return root / "blobs" / base[:2] / base
    return root / "files" / name


def _download(name: str, dest: Path, mtime: float | None = None) -> None:
    """Copy a stored file to `dest` whole or not at all (a temp name, then os.replace)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with default_storage.open(name, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store's own errors (botocore) become OSError
                code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(f"{name}: not in the file store") from exc
                raise OSError(f"{name}: the file store failed: {type(exc).__name__}: {exc}") from exc
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def local_path(name: str) -> str:
    """A local filesystem path for a stored name (the training engine, the index builder, the health scan): the
    file itself on a local store, else this process's cached copy, fetched on first use. Raises OSError
    (FileNotFoundError when the store has no such file)."""
    if not is_remote():
        return default_storage.path(name)
    dest = _cache_file(name)
    if not dest.is_file():
        _download(name, dest)
    return str(dest)


def local_paths(names: list[str], *, threads: int = 16) -> list[str | None]:
    """local_path for many names, fetched in parallel from a remote store; None for a file that cannot be read
    (logged) — the callers skip unreadable photos like corrupt ones."""
    if not is_remote():
        return [default_storage.path(n) for n in names]

    def one(name: str) -> str | None:
        try:
            return local_path(name)
        except OSError as exc:
            log.warning("cannot fetch %s: %s", name, exc)
            return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, names))


def missing_path(name: str) -> str:
    """Where the cached copy of a name would be: a path the engine finds unreadable and skips (counted, logged)."""
    return str(_cache_file(name))


def cache_prune(*, max_bytes: int) -> dict:
    """Delete the oldest cached photo copies (by the time they were fetched) until the cache holds at most
    `max_bytes`. Returns {"deleted", "freed", "kept", "kept_bytes"}. A copy being read stays readable (POSIX)."""
    root = Path(settings.LOUPE_CACHE_DIR) / "blobs"
    files = []
    for f in root.rglob("*") if root.is_dir() else []:
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if f.is_file() and not f.name.startswith(".part-"):
            files.append((st.st_mtime, st.st_size, f))
    files.sort()
    total = sum(size for _, size, _ in files)
    deleted = freed = 0
    for _, size, f in files:
        if total <= max_bytes:
            break
        f.unlink(missing_ok=True)
        total -= size
        freed += size
        deleted += 1
    return {"deleted": deleted, "freed": freed, "kept": len(files) - deleted, "kept_bytes": total}


def manifest_localize(manifest: dict) -> dict:
    """A manifest read back from an artifact folder, its photo paths made valid in this process: items carry
    their stored name ("file"); on a remote store the paths written by another machine are re-resolved through
    this process's cache. A local store's paths are kept."""
    items = manifest.get("items") or []
    if not is_remote() or not items or any("file" not in it for it in items):
        return manifest
    paths = local_paths([it["file"] for it in items])
    out = []
    for it, path in zip(items, paths, strict=True):
        out.append({**it, "path": path or it["path"]})
    return {**manifest, "items": out}


# --- model artifacts ---------------------------------------------------------------------------------------------


def _artifact_key(artifact_dir) -> str:
    d = Path(artifact_dir)  # <ARTIFACT_ROOT>/<project>/run-<id> on the worker that wrote it
    return f"{ARTIFACTS}/{d.parent.name}/{d.name}"


def _published(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).parts
    return path.is_file() and rel[0] not in UNPUBLISHED_DIRS and not any(p.startswith(".") for p in rel)


def _remote_tree(prefix: str) -> dict[str, tuple[int, float]]:
    """{relative name: (size, modified epoch seconds)} of the stored files under `prefix`, in one listing."""
    out: dict[str, tuple[int, float]] = {}
    bucket = getattr(default_storage, "bucket", None)
    if bucket is not None:  # S3: one paginated LIST instead of a HEAD per file
        root = default_storage._normalize_name(prefix).rstrip("/") + "/"  # noqa: SLF001 - the location prefix
        for obj in bucket.objects.filter(Prefix=root):
            out[obj.key[len(root) :]] = (obj.size, obj.last_modified.timestamp())
        return out

    def walk(path: str) -> None:
        dirs, files = default_storage.listdir(path)
        for f in files:
            name = f"{path}/{f}"
            out[name[len(prefix) + 1 :]] = (
                default_storage.size(name),
                default_storage.get_modified_time(name).timestamp(),
            )
        for d in dirs:
            walk(f"{path}/{d}")

    if default_storage.exists(prefix):
        walk(prefix)
    return out


def artifact_publish(artifact_dir, *, since: float | None = None) -> int:
    """Upload a run's artifact folder (or only its files written at or after `since`, a time.time()) to a remote
    store; nothing on a local one. Each local file then carries the stored file's time, so `artifact_local` on
    this machine fetches nothing back. Returns the number of files uploaded."""
    if not is_remote():
        return 0
    root = Path(artifact_dir)
    key = _artifact_key(root)
    files = [f for f in sorted(root.rglob("*")) if _published(f, root)]
    if since is not None:
        files = [f for f in files if f.stat().st_mtime >= since - 1]
    for f in files:
        with f.open("rb") as fh:
            default_storage.save(f"{key}/{f.relative_to(root).as_posix()}", File(fh))
    remote = _remote_tree(key)
    for f in files:
        got = remote.get(f.relative_to(root).as_posix())
        if got is not None:
            os.utime(f, (got[1], got[1]))
    _synced.pop(key, None)
    log.info("published %d artifact files to %s", len(files), key)
    return len(files)


_synced: dict[str, float] = {}
_sync_lock = threading.Lock()


def artifact_local(artifact_dir) -> Path:
    """A local folder with a run's artifacts. Local store: the folder itself. Remote store: the same place under
    this process's ARTIFACT_ROOT, brought up to date with the store (files it lacks or that changed there), at most
    once every LOUPE_ARTIFACT_SYNC_SECONDS per folder. A folder the store does not have is returned as is (the
    worker that is writing it, or an old version from before the store: the callers report missing files)."""
    if not artifact_dir or not is_remote():
        return Path(artifact_dir)
    src = Path(artifact_dir)
    key = _artifact_key(src)
    local = Path(settings.ARTIFACT_ROOT) / src.parent.name / src.name
    ttl = float(settings.LOUPE_ARTIFACT_SYNC_SECONDS)
    if time.monotonic() - _synced.get(key, -1e9) < ttl:
        return local
    with _sync_lock:
        if time.monotonic() - _synced.get(key, -1e9) < ttl:
            return local
        fetched = 0
        for rel, (size, mtime) in _remote_tree(key).items():
            dest = local / rel
            try:
                st = dest.stat()
                if st.st_size == size and int(st.st_mtime) == int(mtime):
                    continue
            except FileNotFoundError:
                pass
            _download(f"{key}/{rel}", dest, mtime=mtime)
            fetched += 1
        if fetched:
            log.info("fetched %d artifact files of %s into %s", fetched, key, local)
        _synced[key] = time.monotonic()
    return local


def delete_quietly(names: list[str]) -> None:
    for name in names:
        try:
            default_storage.delete(name)
        except OSError:
            pass
