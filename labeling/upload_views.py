"""The Import page's drop zone: JSON endpoints that static/loupe/upload.js calls (session + CSRF token, project
admins only; reviewers get 403, another project's upload or import 404). Thin: each calls one service of
labeling.import_uploads / labeling.import_jobs. Errors are in the one error shape {"error": {"code", "message",
"details"}}."""

from __future__ import annotations

from functools import wraps

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_POST

from webapp.jobs import ACTIVE_STATUSES, BrokerUnavailable, describe

from . import import_jobs, import_uploads
from .access import ADMIN, current_project
from .models import ImportRun, ImportUpload
from .services import LabelingError


def _error(message: str, *, code: str = "invalid", status: int = 400, details=None) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "details": details}}, status=status)


def _admins_only(view):
    """labeling.views.staff_required's rule (site admins and the project's admin members), answered in JSON."""

    @wraps(view)
    def wrapper(request, slug, *args, **kwargs):
        if not request.user.is_authenticated:
            return _error("Your session ended: log in again, then retry.", code="not_authenticated", status=403)
        project = current_project(request, slug)  # 404 for unknown projects (the middleware hides invisible ones)
        if not (request.user.is_staff or getattr(request, "project_role", None) == ADMIN):
            return _error("Only admins of this project can import photos.", code="permission_denied", status=403)
        return view(request, project, *args, **kwargs)

    return wrapper


def _urls(project, upload: ImportUpload) -> dict:
    base = ("labeling:upload-files", "labeling:upload-start", "labeling:upload-cancel")
    files, start, cancel = (reverse(name, args=[project.slug, upload.pk]) for name in base)
    return {"files": files, "start": start, "cancel": cancel}


def _run_json(project, run: ImportRun) -> dict:
    report = run.report or {}
    return {
        "job": describe(run),
        "done": run.done,
        "total": run.total,
        "report": report.get("lines", []),
        "errors": [{"path": w, "reason": m} for w, m in report.get("errors", [])[:200]],
        "created": report.get("created", 0),
        "status_url": reverse("labeling:import-run", args=[project.slug, run.pk]),
        "cancel_url": reverse("labeling:import-run-cancel", args=[project.slug, run.pk]),
        "grid_url": reverse("labeling:image-grid", args=[project.slug]),
    }


@require_POST
@_admins_only
def upload_create(request, project):
    """Start an upload (nothing is imported until its start): 201 {"id", "urls", "limits"}."""
    upload = import_uploads.import_upload_create(project=project, user=request.user)
    return JsonResponse(
        {"id": upload.pk, "urls": _urls(project, upload), "limits": import_uploads.limits()}, status=201
    )


@csrf_exempt  # checked below, after the size check: Django's CSRF check parses the whole multipart body first
@require_POST
@_admins_only
def upload_files(request, project, pk):
    """One request of photos: multipart `files` (several) and `paths` (each file's relative path, same order).
    Each bad file is refused with its reason, the others staged: 200 {"staged", "refused", "files", "bytes"}."""
    limits = import_uploads.limits()
    length = int(request.META.get("CONTENT_LENGTH") or 0)
    if length > limits["request_bytes"]:
        return _error(
            f"This request is {length / 2**20:.1f} MiB, more than the {limits['request_bytes'] / 2**20:.0f} MiB "
            "allowed per request: send fewer photos per request.",
            code="request_too_large",
            status=413,
            details={"limit_bytes": limits["request_bytes"]},
        )
    try:
        return _upload_files_checked(request, project, pk)
    except TooManyFilesSent:
        return _error(
            f"Too many files in one request: at most {limits['request_files']} (DATA_UPLOAD_MAX_NUMBER_FILES).",
            code="too_many_files",
            details={"limit": limits["request_files"]},
        )
    except (TooManyFieldsSent, RequestDataTooBig):
        return _error("Too many form fields or too much form data in one request.", code="request_too_large")


@csrf_protect
def _upload_files_checked(request, project, pk):
    upload = get_object_or_404(ImportUpload, project=project, pk=pk)
    files = request.FILES.getlist("files")
    paths = request.POST.getlist("paths")
    if not files:
        return _error("No file in this request: send the photos as multipart field 'files'.", code="empty")
    if paths and len(paths) != len(files):
        return _error(f"{len(files)} files but {len(paths)} paths: send one path per file, in order.")
    try:
        out = import_uploads.import_upload_add(
            upload=upload, files=list(zip(paths or [f.name for f in files], files, strict=True))
        )
    except LabelingError as exc:
        return _error(str(exc), code="conflict", status=409)
    return JsonResponse(out)


@require_POST
@_admins_only
def upload_start(request, project, pk):
    """Queue the import job of the staged photos (form fields: labeling, class_head, class_name, group_by,
    skip_bad_rows, update): 202 with the job, or 400/409 saying why (the staged photos stay)."""
    upload = get_object_or_404(ImportUpload, project=project, pk=pk)
    post = request.POST
    params = {
        "labeling": post.get("labeling", "folder"),
        "class_head": post.get("class_head") or None,
        "class_name": post.get("class_name", ""),
        "group_by": post.get("group_by") or "auto",
        "skip_bad_rows": post.get("skip_bad_rows") in ("1", "on", "true"),
        "update": post.get("update") in ("1", "on", "true"),
    }
    try:
        run = import_uploads.import_upload_start(upload=upload, params=params, user=request.user)
    except LabelingError as exc:
        busy = "already queued or running" in str(exc)
        message = f"{exc} The uploaded photos stay; press Start again then." if busy else str(exc)
        return _error(message, code="busy" if busy else "invalid", status=409 if busy else 400)
    except BrokerUnavailable as exc:
        return _error(f"{exc.message} The uploaded photos stay; press Start again.", code=exc.code, status=503)
    return JsonResponse(_run_json(project, run), status=202)


@require_POST
@_admins_only
def upload_cancel(request, project, pk):
    """Cancel an upload: still uploading, its staged photos are deleted at once; started, its import job stops and
    removes what it wrote, then the staged photos."""
    upload = get_object_or_404(ImportUpload, project=project, pk=pk)
    try:
        out = import_uploads.import_upload_cancel(upload=upload, user=request.user)
    except LabelingError as exc:
        return _error(str(exc), code="conflict", status=409)
    return JsonResponse(out)


@require_GET
@_admins_only
def import_run_status(request, project, pk):
    """Where an import job stands (any mode): webapp.jobs.describe, done/total, the report's lines when it ended."""
    return JsonResponse(_run_json(project, get_object_or_404(ImportRun, project=project, pk=pk)))


@require_POST
@_admins_only
def import_run_cancel(request, project, pk):
    run = get_object_or_404(ImportRun, project=project, pk=pk)
    try:
        run = import_jobs.import_run_cancel(run=run, user=request.user)
    except LabelingError as exc:
        return _error(str(exc), code="conflict", status=409)
    return JsonResponse(_run_json(project, run))


def import_page_context(project) -> dict:
    """What the Import page's drop zone needs: the limits, the project's heads, the uploads not started yet (start
    over or cancel them) and the import job running now (its progress and cancel)."""
    return {
        "upload_limits": import_uploads.limits(),
        "pending_uploads": list(import_uploads.pending_uploads(project=project)),
        "active_import": project.import_runs.filter(status__in=ACTIVE_STATUSES).first(),
        "upload_heads": list(project.heads.order_by("order", "id")),
        "labeling_choices": import_uploads.LABELING,
    }
