"""Browser uploads as import jobs (the Import page's drop zone, issue 17.3). The browser sends the photos in
several requests; every file is checked at the edge (its name, its size, that its header is a JPEG, PNG, WebP or
BMP, its pixel count) and staged through Django's storage API under `uploads/<project>/<upload id>/` — never a
local path: the web process and the workers need not share a disk (S3 is a settings change). "Start" queues an
ImportRun of mode `upload`, which `labeling.import_jobs` runs like every import: the staged files are planned
(class from the parent folder's name, one class, or unlabeled), read back through the storage in batches of
LOUPE_IMPORT_BATCH with the same checks and writes, rolled back by the job's record if it fails or is cancelled;
when the job ends, however it ends, the staged files are deleted. An upload never started is deleted by its cancel,
or by the reconciler LOUPE_UPLOAD_ABANDONED_SECONDS after its last file arrived (the browser was closed)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from webapp import jobs

from . import formats, importers, storage
from .models import ImportRun, ImportUpload, ImportUploadFile, Project
from .services import LabelingError

log = logging.getLogger(__name__)

LABELING = {
    "folder": "class from the parent folder's name",
    "class": "one class for every photo",
    "none": "unlabeled",
}
FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # what IMAGE_EXTS name, sniffed from the content
MAX_PATH = 500


def limits() -> dict:
    """What one file and one request may be, for the server's checks, the page's text and the browser's pre-check
    (which batches files to stay well inside them)."""
    request_bytes = int(getattr(settings, "LOUPE_UPLOAD_REQUEST_MAX_BYTES", 64 * 2**20))
    request_files = int(settings.DATA_UPLOAD_MAX_NUMBER_FILES or 100)
    return {
        "file_bytes": min(importers.MAX_FILE_BYTES, request_bytes - 2**16),  # one file always fits one request
        "request_bytes": request_bytes,
        "request_files": request_files,
        "batch_files": min(20, request_files),
        "batch_bytes": min(20 * 2**20, request_bytes // 2),
        "pixels": int(settings.LOUPE_MAX_IMAGE_PIXELS),
        "extensions": sorted(importers.IMAGE_EXTS),
        "abandoned_after_s": abandoned_after_seconds(),
    }


def abandoned_after_seconds() -> float:
    return float(getattr(settings, "LOUPE_UPLOAD_ABANDONED_SECONDS", 24 * 3600))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def clean_path(raw: str) -> str | None:
    """The relative path a browser gave (`Toyota/car_1.jpg`), normalised; None when it cannot be one (`..`, control
    characters, too long)."""
    parts = [p.strip() for p in str(raw).replace("\\", "/").split("/")]
    parts = [p for p in parts if p not in ("", ".")]
    if not parts or ".." in parts or any(ord(c) < 32 or c == "\x7f" for p in parts for c in p):
        return None
    path = "/".join(parts)
    return path if len(path) <= MAX_PATH else None


def check_file(path: str, f) -> str | None:
    """The edge's checks on one uploaded file (an UploadedFile): None when it may be staged, else why not. The header
    is read, not the pixels: the job decodes every photo (truncated ones are kept as unreadable, as any import)."""
    lim = limits()
    if PurePosixPath(path).suffix.lower() not in importers.IMAGE_EXTS:
        return f"not an image file name ({', '.join(lim['extensions'])})"
    if not f.size:
        return "empty file"
    if f.size > lim["file_bytes"]:
        return f"{_mib(f.size)}, more than the {_mib(lim['file_bytes'])} limit per photo"
    try:
        f.seek(0)
        with PILImage.open(f, formats=list(FORMATS)) as img:
            width, height = img.size
    except UnidentifiedImageError:
        return "not an image (the content is not JPEG, PNG, WebP or BMP, whatever the name says)"
    except PILImage.DecompressionBombError:
        return f"too many pixels (more than {lim['pixels']:,})"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"damaged image ({exc})"
    finally:
        f.seek(0)
    if width * height > lim["pixels"]:
        return f"{width}×{height} is more than {lim['pixels']:,} pixels"
    return None


def staged_name(upload: ImportUpload, path: str) -> str:
    """Where a staged file waits: derived from its path (a retried request replaces its own copy), never the
    browser's string itself."""
    digest = hashlib.sha256(path.encode()).hexdigest()[:40]
    return f"uploads/{upload.project.slug}/{upload.pk}/{digest}{PurePosixPath(path).suffix.lower()}"


def import_upload_create(*, project: Project, user=None) -> ImportUpload:
    return ImportUpload.objects.create(project=project, created_by=user)


def import_upload_totals(upload: ImportUpload) -> dict:
    agg = ImportUploadFile.objects.filter(upload=upload).aggregate(files=Count("id"), bytes=Sum("size"))
    return {"files": agg["files"], "bytes": agg["bytes"] or 0}


def import_upload_add(*, upload: ImportUpload, files: list[tuple[str, object]]) -> dict:
    """Stage one request's files: [(relative path, UploadedFile)]. Each bad file is refused with its reason and
    the others staged. A path sent again (a retried request) replaces its earlier copy. Returns {"staged":
    [{"path", "size"}], "refused": [{"path", "reason"}], "files", "bytes"} (the totals of the whole upload)."""
    staged, refused, written = [], [], []
    try:
        with transaction.atomic():
            # The row lock orders this batch with a start or a cancel of the same upload.
            locked = ImportUpload.objects.select_for_update().filter(pk=upload.pk).first()
            if locked is None:
                raise LabelingError(f"Upload {upload.pk} was cancelled or removed; drop the photos again.")
            if locked.run_id is not None:
                raise LabelingError(f"Upload {upload.pk} is already being imported; start a new upload for more.")
            for raw, f in files:
                path = clean_path(raw or getattr(f, "name", "") or "")
                if path is None:
                    refused.append({"path": str(raw)[:MAX_PATH], "reason": "not a usable relative path"})
                    continue
                why = check_file(path, f)
                if why:
                    refused.append({"path": path, "reason": why})
                    continue
                name = staged_name(upload, path)
                if default_storage.exists(name):
                    default_storage.delete(name)
                saved = default_storage.save(name, f)
                written.append(saved)
                ImportUploadFile.objects.update_or_create(
                    upload=upload, path=path, defaults={"name": saved, "size": f.size}
                )
                staged.append({"path": path, "size": f.size})
            ImportUpload.objects.filter(pk=upload.pk).update(updated_at=timezone.now())
    except Exception:
        storage.delete_quietly(written)
        raise
    return {"staged": staged, "refused": refused, **import_upload_totals(upload)}


def import_upload_start(*, upload: ImportUpload, params: dict, user=None) -> ImportRun:
    """Queue the import job of an upload's staged photos. params: labeling ("folder" | "class" | "none"), class_head
    (the head's name; default the first), class_name ("class"), group_by, skip_bad_rows, update."""
    from . import import_jobs  # noqa: PLC0415 - import_jobs plans uploads through this module

    labeling = params.get("labeling") or "folder"
    if labeling not in LABELING:
        raise LabelingError(f"labeling must be one of {', '.join(LABELING)}, got {labeling!r}.")
    project = upload.project
    head = None
    if labeling != "none":
        heads = project.heads.order_by("order", "id")
        head = heads.filter(name=params["class_head"]).first() if params.get("class_head") else heads.first()
        if head is None:
            raise LabelingError(f"Project {project.slug!r} has no head {params.get('class_head')!r}.")
    class_name = str(params.get("class_name") or "").strip()
    if labeling == "class" and not 0 < len(class_name) <= 200:
        raise LabelingError("Give the class (1 to 200 characters) that every photo gets.")
    group_by = params.get("group_by") or "auto"
    if group_by not in ("auto", "name", "image"):
        raise LabelingError(f"group_by must be auto, name or image for an upload, got {group_by!r}.")
    with transaction.atomic():
        locked = ImportUpload.objects.select_for_update().filter(pk=upload.pk).first()
        if locked is None:
            raise LabelingError(f"Upload {upload.pk} was cancelled or removed; drop the photos again.")
        if locked.run_id is not None:
            raise LabelingError(f"Upload {upload.pk} is already being imported (import {locked.run_id}).")
        totals = import_upload_totals(upload)
        if not totals["files"]:
            raise LabelingError("No photo has been uploaded yet: drop photos or folders first.")
        if labeling == "folder" and not upload.files.filter(path__contains="/").exists():
            raise LabelingError(
                "None of the photos sits in a folder, so none has a class from its folder's name: drop the class "
                "folders themselves, or choose one class for all, or unlabeled."
            )
        run = import_jobs.import_run_create(
            project=project,
            mode=ImportRun.Mode.UPLOAD,
            params={
                "upload": upload.pk,
                "files": totals["files"],
                "bytes": totals["bytes"],
                "labeling": labeling,
                "class_head": head.name if head else None,
                "class_name": class_name if labeling == "class" else None,
                "group_by": group_by,
                "skip_bad_rows": bool(params.get("skip_bad_rows")),
                "update": bool(params.get("update")),
            },
            user=user,
        )
        ImportUpload.objects.filter(pk=upload.pk).update(run=run)
    return run


def plan_upload(project: Project, params: dict) -> tuple[list[importers.ImportRow], importers.ImportReport]:
    """The rows of an upload's import job, as the folder import plans a folder: with "class from folder", a photo
    that sits in no folder is an error (nothing is written unless skip_bad_rows)."""
    labeling = params.get("labeling") or "folder"
    head_name = None
    if labeling != "none":
        head = project.heads.filter(name=params.get("class_head") or "").first()
        head = head or project.heads.order_by("order", "id").first()
        if head is None:
            raise LabelingError(f"Project {project.slug!r} has no head {params.get('class_head')!r}.")
        head_name = head.name
    report = importers.ImportReport()
    rows: list[importers.ImportRow] = []
    files = ImportUploadFile.objects.filter(upload_id=params["upload"]).order_by("id").values_list("path", "name")
    for path, name in files.iterator(chunk_size=2000):
        rel = PurePosixPath(path)
        if labeling == "folder":
            if len(rel.parts) < 2:
                report.errors.append((path, "sits in no folder, so it has no class from a folder's name"))
                continue
            labels = {head_name: rel.parent.name}
        elif labeling == "class":
            labels = {head_name: params["class_name"]}
        else:
            labels = {}
        rows.append(
            importers.ImportRow(
                where=path, path=Path(path), labels=labels, group=formats.group_from_name(rel.name), storage_name=name
            )
        )
    if not rows and not report.errors:
        report.errors.append(("upload", "no staged photos (the upload was removed?)"))
    return rows, report


def import_upload_discard(*, upload_id: int) -> int:
    """Delete an upload's staged files, then its rows, a chunk at a time (memory stays bounded). Returns how many
    files went."""
    n = 0
    while True:
        chunk = list(
            ImportUploadFile.objects.filter(upload_id=upload_id).order_by("id").values_list("id", "name")[:1000]
        )
        if not chunk:
            break
        storage.delete_quietly([name for _, name in chunk])
        ImportUploadFile.objects.filter(pk__in=[pk for pk, _ in chunk]).delete()
        n += len(chunk)
    ImportUpload.objects.filter(pk=upload_id).delete()
    return n


def import_uploads_discard_for_run(*, run_id: int) -> None:
    """An upload's import job ended (done, failed or cancelled): its staged files go."""
    for upload_id in ImportUpload.objects.filter(run_id=run_id).values_list("pk", flat=True):
        import_upload_discard(upload_id=upload_id)


def import_upload_cancel(*, upload: ImportUpload, user=None) -> dict:
    """Cancel an upload: one still staging goes at once with its files; a started one cancels its import job
    (import_jobs.import_run_cancel: what it wrote is removed, then the staged files)."""
    from . import import_jobs  # noqa: PLC0415

    with transaction.atomic():
        locked = ImportUpload.objects.select_for_update().filter(pk=upload.pk).first()
        if locked is None:
            return {"upload": upload.pk, "removed": 0, "run": None}
        run = locked.run
        if run is None:
            return {"upload": upload.pk, "removed": import_upload_discard(upload_id=upload.pk), "run": None}
    run = import_jobs.import_run_cancel(run=run, user=user)
    return {"upload": upload.pk, "removed": None, "run": run.pk, "status": run.status}


def import_uploads_expire(*, project: Project | None = None) -> list[int]:
    """The reconciler's part: uploads never started whose last file is older than LOUPE_UPLOAD_ABANDONED_SECONDS
    (the browser was closed), and any whose import job ended without removing them, are deleted with their files."""
    cutoff = timezone.now() - dt.timedelta(seconds=abandoned_after_seconds())
    qs = ImportUpload.objects.filter(
        Q(run__isnull=True, updated_at__lt=cutoff) | Q(run__isnull=False) & ~Q(run__status__in=jobs.ACTIVE_STATUSES)
    )
    if project is not None:
        qs = qs.filter(project=project)
    gone = list(qs.values_list("pk", flat=True))
    for pk in gone:
        n = import_upload_discard(upload_id=pk)
        log.info("upload %s removed with its %s staged file(s)", pk, n)
    return gone


def pending_uploads(*, project: Project):
    """The project's uploads not started yet that hold photos, with their counts (the Import page lists them: start
    or cancel). Empty ones (nothing arrived) are left to the reconciler."""
    return (
        ImportUpload.objects.filter(project=project, run__isnull=True)
        .annotate(n_files=Count("files"), n_bytes=Sum("files__size"))
        .filter(n_files__gt=0)
        .select_related("created_by")
        .order_by("-updated_at")
    )
