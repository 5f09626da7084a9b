"""Imports of any size as background jobs (ImportRun rows): the plan (folder, CSV with column mapping, export,
placeholder, or photos a browser uploaded: labeling.import_uploads) is written in batches of LOUPE_IMPORT_BATCH
photos — each batch read, checked and written in its own transaction, so memory holds one batch whatever the
import's size — with progress on the row and a cancel checked between batches. "Nothing half-written" is kept by
the job's own record: a failed, cancelled or lost job rolls back what it wrote (the images it created carry
`import_run`, and the labels it set on photos that were already there name it in their history's reason), then
fails, is cancelled or starts again."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from webapp import jobs
from webapp.jobs import JobCancelled

from . import boxes, importers, storage
from .models import GroupSplit, Head, Image, ImportRun, Label, LabelClass, LabelEvent, Project
from .services import LabelingError

log = logging.getLogger(__name__)
COUNTS = ("rows", "created", "existing", "unreadable", "labels_set", "labels_updated", "classes_created")


def import_plan(project: Project, mode: str, params: dict) -> tuple[list[importers.ImportRow], importers.ImportReport]:
    """The rows of an import, as `manage.py import_images` and the Import page plan them (nothing read or written)."""
    if mode == ImportRun.Mode.UPLOAD:  # photos a browser uploaded, staged in the storage (labeling.import_uploads)
        from .import_uploads import plan_upload  # noqa: PLC0415 - import_uploads starts jobs through this module

        return plan_upload(project, params)
    folder = Path(params["folder"])
    # Imports asked for from the web (page, API) read only under IMPORT_ROOTS; the command line anywhere.
    roots = list(settings.IMPORT_ROOTS) if params.get("restrict_roots") else None
    if mode == ImportRun.Mode.BOXES:  # a YOLO or COCO box dataset (labeling.boxes)
        return boxes.boxes_plan(project=project, folder=folder, format=params.get("format"), allowed_roots=roots)
    if mode == ImportRun.Mode.CSV:
        return importers.plan_csv(
            Path(params["csv"]),
            images_dir=folder,
            filename_col=params.get("filename_col", "image_filename"),
            head_cols=params["head_cols"],
            project=project,
            group_col=params.get("group_col"),
            source_col=params.get("source_col"),
            allowed_roots=roots,
        )
    if mode == ImportRun.Mode.PLACEHOLDER:
        return importers.plan_placeholder(folder, allowed_roots=roots)
    if mode == ImportRun.Mode.EXPORT:
        return importers.plan_export(folder, project=project, allowed_roots=roots)
    head = project.heads.filter(name=params["class_head"]).first() if params.get("class_head") else None
    head = head or project.heads.order_by("order", "id").first()
    if head is None:
        raise LabelingError(f"Project {project.slug!r} has no head {params.get('class_head')!r}.")
    return importers.plan_folder(folder, head=head, allowed_roots=roots)


def import_run_create(*, project: Project, mode: str, params: dict, user=None, queue: bool = True) -> ImportRun:
    """Queue an import job (one per project at a time). Bad parameters are refused here; bad rows are found by the
    job, which then writes nothing (unless params["skip_bad_rows"])."""
    if mode not in ImportRun.Mode.values:
        raise LabelingError(f"mode must be one of {', '.join(ImportRun.Mode.values)}, got {mode!r}.")
    if mode == ImportRun.Mode.UPLOAD:
        if not params.get("upload"):
            raise LabelingError("An upload import starts from photos uploaded on the Import page (its drop zone).")
    elif not params.get("folder"):
        raise LabelingError("Give the images folder.")
    if mode == ImportRun.Mode.CSV and not (params.get("csv") and params.get("head_cols")):
        raise LabelingError("A CSV import needs the CSV file and at least one head=column mapping.")
    if mode == ImportRun.Mode.BOXES:
        if params.get("format") not in boxes.FORMATS:
            raise LabelingError(f"A box import needs the format: {' or '.join(boxes.FORMATS)}.")
        params["head"] = boxes.detection_head(project, params.get("head")).name
    try:
        with transaction.atomic():
            run = ImportRun.objects.create(project=project, mode=mode, params=params, created_by=user)
    except IntegrityError:
        raise LabelingError("An import is already queued or running for this project; wait for it.") from None
    if queue:
        rid = run.id
        jobs.send_on_commit(
            "labeling.tasks.import_run",
            rid,
            kind="import_run",
            pk=rid,
            what=f"import {rid}",
            undo=lambda: ImportRun.objects.filter(pk=rid).delete(),
        )
    return run


def _progress(run_id: int, **fields) -> None:
    """Write progress and the heartbeat; JobCancelled once an admin asked to cancel."""
    if not ImportRun.objects.filter(pk=run_id, cancel_requested_at__isnull=True).update(
        heartbeat_at=timezone.now(), **fields
    ):
        raise JobCancelled(run_id)


def import_run_execute(*, run_id: int) -> ImportRun:
    """Run one import job. Idempotent: a finished job is left alone; one left running by a lost worker is rolled
    back and starts again."""
    stale = timezone.now() - dt.timedelta(seconds=jobs.lost_after_seconds())
    claimable = Q(status=ImportRun.Status.QUEUED) | Q(
        Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True), status=ImportRun.Status.RUNNING
    )
    run = ImportRun.objects.select_related("project", "created_by").get(pk=run_id)
    now = timezone.now()
    if not ImportRun.objects.filter(claimable, pk=run_id).update(
        status=ImportRun.Status.RUNNING, started_at=now, heartbeat_at=now
    ):
        run.refresh_from_db()
        return run
    with jobs.heartbeat(ImportRun, run_id):
        if run.attempts or run.status == ImportRun.Status.RUNNING:
            import_run_rollback(run_id=run_id)  # a lost worker's half (requeued or claimed stale): undone first
        try:
            report = _run(run)
        except JobCancelled:
            import_run_rollback(run_id=run_id)
            return _end(run_id, ImportRun.Status.CANCELLED, error="Cancelled; what it had written was removed.")
        except Exception as exc:  # noqa: BLE001 - the row says why, and nothing stays half-written
            log.exception("import %s failed", run_id)
            import_run_rollback(run_id=run_id)
            return _end(run_id, ImportRun.Status.FAILED, error=f"{type(exc).__name__}: {exc}"[:5000])
    if not report.written:
        import_run_rollback(run_id=run_id)
        errors = "; ".join(f"{w}: {m}" for w, m in report.errors[:20])
        return _end(run_id, ImportRun.Status.FAILED, error=f"Nothing was written: {errors}", report=_as_dict(report))
    return _end(run_id, ImportRun.Status.SUCCEEDED, report=_as_dict(report))


def _end(run_id: int, status: str, *, error: str = "", report: dict | None = None) -> ImportRun:
    fields = {"status": status, "finished_at": timezone.now(), "error": error, "step": "done"}
    if report is not None:
        fields["report"] = report
    ImportRun.objects.filter(pk=run_id).update(**fields)
    _discard_uploads(run_id)
    return ImportRun.objects.get(pk=run_id)


def _discard_uploads(run_id: int) -> None:
    """A browser upload's staged files go when its job ends, however it ends."""
    from .import_uploads import import_uploads_discard_for_run  # noqa: PLC0415

    import_uploads_discard_for_run(run_id=run_id)


def _as_dict(report: importers.ImportReport) -> dict:
    data = asdict(report)
    data["errors"], data["warnings"] = data["errors"][:200], data["warnings"][:200]
    data["lines"] = report.lines()
    return data


def _run(run: ImportRun) -> importers.ImportReport:
    project, params = run.project, run.params
    _progress(run.id, step="planning")
    rows, report = import_plan(project, run.mode, params)
    rows = importers.groups_apply(rows, report, group_by=params.get("group_by", "auto"))  # on the whole import
    report.rows = len(rows) + len(report.errors)
    if report.errors and not params.get("skip_bad_rows"):
        return report
    batch = max(1, int(getattr(settings, "LOUPE_IMPORT_BATCH", 200)))
    det_head = boxes.detection_head(project, params.get("head")) if run.mode == ImportRun.Mode.BOXES else None
    _progress(run.id, step="importing", done=0, total=len(rows))
    for start in range(0, len(rows), batch):
        part = importers.ImportReport()
        with transaction.atomic():
            part = importers.images_import(
                project=project,
                rows=rows[start : start + batch],
                report=part,
                user=run.created_by,
                skip_bad_rows=bool(params.get("skip_bad_rows")),
                group_by="name",  # the groups were chosen above, on the whole import
                update=bool(params.get("update")),
                run_id=run.id,
            )
            if part.written and det_head is not None:  # a box dataset: the batch's box sets with its photos
                boxes.box_rows_write(
                    project=project,
                    head=det_head,
                    rows=rows[start : start + batch],
                    report=part,
                    user=run.created_by,
                    run_id=run.id,
                )
        report.errors += part.errors
        report.warnings += part.warnings
        if not part.written:
            report.written = False
            return report
        for key in COUNTS[1:]:
            setattr(report, key, getattr(report, key) + getattr(part, key))
        _progress(run.id, done=min(len(rows), start + batch), report=_as_dict(report))
    report.written = True
    return report


def import_run_rollback(*, run_id: int) -> dict:
    """Remove what an import job wrote: the labels it set on photos that were already there go back (unless
    someone changed them since), the photos it created go (with their labels and files), and the classes and
    sticky splits left without a photo go too. Returns what was removed."""
    run = ImportRun.objects.select_related("project").get(pk=run_id)
    reason = importers.import_reason(run_id)
    out = {"labels_reverted": 0, "images_removed": 0, "classes_removed": 0}
    with transaction.atomic():
        # box sets it wrote on photos that were there before (those on photos it created go with them)
        out["box_sets_removed"] = boxes.box_sets_rollback(project=run.project, run_id=run_id)
        created = Image.objects.filter(import_run_id=run_id)
        events = (
            LabelEvent.objects.filter(reason__startswith=reason, image__project=run.project)
            .exclude(image__import_run_id=run_id)
            .order_by("-id")
        )
        for e in events:
            n = Label.objects.filter(image_id=e.image_id, head_id=e.head_id, label_class_id=e.new_class_id).update(
                label_class_id=e.old_class_id
            )
            if n:
                LabelEvent.objects.create(
                    image_id=e.image_id,
                    head_id=e.head_id,
                    old_class_id=e.new_class_id,
                    new_class_id=e.old_class_id,
                    reason=f"undo of {reason}",
                )
            out["labels_reverted"] += n
        files = [f for pair in created.values_list("file", "thumbnail") for f in pair if f]
        groups = set(created.values_list("group_key", flat=True))
        out["images_removed"] = created.count()
        created.delete()
        heads = Head.objects.filter(project=run.project)
        unused = LabelClass.objects.filter(
            head__in=heads, created_at__gte=run.created_at, label__isnull=True, boxes__isnull=True
        )
        unused = unused.filter(children__isnull=True, merged_into__isnull=True)
        # A class the kept history of a photo names stays (that photo's history says it was set, then undone).
        named = LabelEvent.objects.filter(Q(old_class__head__in=heads) | Q(new_class__head__in=heads))
        for field in ("old_class_id", "new_class_id"):  # (no NULL in a NOT IN: it would keep every class)
            unused = unused.exclude(pk__in=named.filter(**{f"{field}__isnull": False}).values(field))
        out["classes_removed"] = unused.count()
        unused.delete()
        empty = [g for g in groups if not Image.objects.filter(project=run.project, group_key=g).exists()]
        GroupSplit.objects.filter(project=run.project, group_key__in=empty).delete()
        transaction.on_commit(lambda: storage.delete_quietly(files))
    return out


def import_run_cancel(*, run: ImportRun, user=None) -> ImportRun:
    """Cancel a queued import at once, or ask a running one to stop after its current batch (what it wrote is
    then removed). LabelingError for an import that already ended."""
    run, queued = jobs.cancel_request(ImportRun, run.pk, user=user, error=LabelingError, what="Import")
    if queued:
        _end(run.id, ImportRun.Status.CANCELLED, error="Cancelled before it started.")
    run.refresh_from_db()
    return run


def import_runs_reconcile(*, project: Project | None = None) -> dict:
    """Lost imports start again (after their rollback); queued ones whose message is gone are re-sent; browser
    uploads never started and idle for LOUPE_UPLOAD_ABANDONED_SECONDS are deleted with their staged files."""
    runs = ImportRun.objects.filter(status__in=jobs.ACTIVE_STATUSES)
    if project is not None:
        runs = runs.filter(project=project)

    def cancel(pk: int) -> None:
        import_run_rollback(run_id=pk)
        _end(pk, ImportRun.Status.CANCELLED, error="Cancelled while its worker was lost; what it wrote was removed.")

    def failed(pk: int) -> None:
        import_run_rollback(run_id=pk)
        _discard_uploads(pk)

    out = jobs.rows_reconcile(
        ImportRun,
        runs,
        kind="import_run",
        task="labeling.tasks.import_run",
        resume="what it wrote is removed and it starts again",
        cancel=cancel,
        on_failed=failed,
    )
    from .import_uploads import import_uploads_expire  # noqa: PLC0415

    import_uploads_expire(project=project)  # browser uploads abandoned mid-way, or left by an ended job
    return out
