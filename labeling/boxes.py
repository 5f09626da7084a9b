"""Boxes as labels (issue 18): the boxes of an image for a detection head, edited as one set with optimistic
concurrency (BoxSet.version), each change a BoxEvent (before/after) and a DatasetAction (the action log: undo puts the
previous set back unless the set changed since); YOLO and COCO import and export (labeling.detection_formats parses
and writes, this module maps classes and photos and writes rows, all or nothing)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F

from . import detection_formats as fmt
from . import formats, storage
from .importers import ImportReport, ImportRow, check_root, images_import, import_reason
from .models import Box, BoxEvent, BoxSet, DatasetAction, GroupSplit, Head, Image, LabelClass, Project
from .normalize import clean_label
from .services import LabelingError, label_class_get_or_create

MAX_BOXES = fmt.MAX_BOXES
FORMATS = ("yolo", "coco")


class BoxConflict(Exception):
    """A stale edit: somebody changed the boxes since the editor loaded them. `current` is the set now (unsaved
    with version 0 when it was never set)."""

    def __init__(self, current: BoxSet):
        super().__init__("These boxes were changed by someone else; nothing was overwritten.")
        self.current = current


@dataclass
class BoxSetChange:
    box_set: BoxSet
    changed: bool
    action: DatasetAction | None = None


def box_dicts(box_set: BoxSet | None) -> list[dict]:
    """The set's boxes as the history and the API hold them: x, y, w, h (pixels), class_id, source, score."""
    if box_set is None or box_set.pk is None:
        return []
    return [
        {"x": b.x, "y": b.y, "w": b.w, "h": b.h, "class_id": b.label_class_id, "source": b.source, "score": b.score}
        for b in box_set.boxes.all()
    ]


def check_detection_head(*, image: Image, head: Head) -> None:
    if head.project_id != image.project_id:
        raise LabelingError(f"Head {head.name!r} is not a head of image {image.id}'s project.")
    if head.kind != Head.Kind.DETECTION:
        raise LabelingError(f"Head {head.name!r} is a class head: set its label, not boxes.")


def boxes_clean(*, image: Image, head: Head, boxes) -> list[dict]:
    """Validate a set of boxes for `image` and detection `head`: a list of {x, y, w, h, class_id, source?, score?}
    (pixels, top-left). Every problem is named with the box's index; LabelingError lists them all."""
    check_detection_head(image=image, head=head)
    if not isinstance(boxes, list):
        raise LabelingError(f"boxes must be a list of {{x, y, w, h, class_id}}, got {type(boxes).__name__}.")
    if len(boxes) > MAX_BOXES:
        raise LabelingError(f"{len(boxes)} boxes; at most {MAX_BOXES} per image.")
    if image.width is None or image.height is None:
        raise LabelingError(f"Image {image.id} has no known size ({image.status_reason or 'unreadable'}).")
    classes = {c.id: c for c in LabelClass.objects.filter(head=head)}
    problems, out = [], []
    for i, b in enumerate(boxes):
        if not isinstance(b, dict):
            problems.append(f"box {i}: expected an object {{x, y, w, h, class_id}}, got {b!r:.40}")
            continue
        unknown = set(b) - {"x", "y", "w", "h", "class_id", "source", "score", "class"}
        if unknown:
            problems.append(f"box {i}: unknown field(s) {', '.join(sorted(unknown))}")
            continue
        nums = {}
        for k in ("x", "y", "w", "h"):
            v = b.get(k)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                problems.append(f"box {i}: {k} must be a number of pixels, got {v!r:.40}")
            else:
                nums[k] = float(v)
        cid = b.get("class_id")
        cls = classes.get(cid) if isinstance(cid, int) and not isinstance(cid, bool) else None
        if cls is None:
            names = ", ".join(f"{c.id} {c.name}" for c in classes.values() if c.merged_into_id is None)
            problems.append(f"box {i}: class_id {cid!r} is not a class of {head.name} ({names})")
        elif cls.merged_into_id is not None:
            cls = cls.merged_into
        source = b.get("source", Box.Source.HUMAN)
        if source not in Box.Source.values:
            problems.append(f"box {i}: source must be human or model, got {source!r:.40}")
        score = b.get("score")
        if score is not None and (not isinstance(score, int | float) or isinstance(score, bool) or not 0 <= score <= 1):
            problems.append(f"box {i}: score must be from 0 to 1 or null, got {score!r:.40}")
        if len(nums) == 4 and cls is not None:
            why = fmt.box_problem(nums["x"], nums["y"], nums["w"], nums["h"], image.width, image.height)
            if why:
                problems.append(f"box {i}: {why}")
            else:
                x, y, w, h = fmt.clip_box(nums["x"], nums["y"], nums["w"], nums["h"], image.width, image.height)
                out.append(
                    {
                        "x": x,
                        "y": y,
                        "w": w,
                        "h": h,
                        "class_id": cls.id,
                        "source": source,
                        "score": None if score is None else float(score),
                    }
                )
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise LabelingError("Nothing was saved: " + "; ".join(problems[:20]) + more + ".")
    return out


def _write_boxes(box_set: BoxSet, boxes: list[dict]) -> None:
    box_set.boxes.all().delete()
    Box.objects.bulk_create(
        [
            Box(
                box_set=box_set,
                label_class_id=b["class_id"],
                x=b["x"],
                y=b["y"],
                w=b["w"],
                h=b["h"],
                source=b["source"],
                score=b["score"],
                order=i,
            )
            for i, b in enumerate(boxes)
        ]
    )


def _set_locked(*, image: Image, head: Head) -> BoxSet:
    """The (image, head) set, locked; created with version 0 when it never existed (two racing creators: one
    waits on the unique constraint's row, then locks it)."""
    BoxSet.objects.get_or_create(image=image, head=head)
    return BoxSet.objects.select_for_update().get(image=image, head=head)


def box_set(*, image: Image, head: Head, boxes, expected_version: int, user=None, reason: str = "edit") -> BoxSetChange:
    """Replace the boxes of `image` for detection `head` with `boxes` (see boxes_clean), with optimistic
    concurrency: refuses (BoxConflict, with the current set) when `expected_version` is stale (0 = never set).
    A change bumps the version, appends a BoxEvent (before/after) and a DatasetAction that action_undo reverts."""
    clean = boxes_clean(image=image, head=head, boxes=boxes)
    with transaction.atomic():
        current = _set_locked(image=image, head=head)
        if current.version != expected_version:
            raise BoxConflict(current)
        old = box_dicts(current)
        if current.version > 0 and same_boxes(old, clean):
            return BoxSetChange(box_set=current, changed=False)
        action = _change(current, old, clean, user=user, reason=reason)
    current.refresh_from_db()
    return BoxSetChange(box_set=current, changed=True, action=action)


def same_boxes(a: list[dict], b: list[dict]) -> bool:
    """The same boxes in the same order (box_dicts' fields)."""
    key = ("x", "y", "w", "h", "class_id", "source", "score")
    return [tuple(x[k] for k in key) for x in a] == [tuple(x[k] for k in key) for x in b]


def _change(current: BoxSet, old: list[dict], new: list[dict], *, user, reason: str, undo_of=None) -> DatasetAction:
    _write_boxes(current, new)
    BoxSet.objects.filter(pk=current.pk).update(version=F("version") + 1, updated_by=user)
    version = current.version + 1
    image, head = current.image, current.head
    what = f"boxes of image {image.id} ({head.name}): {len(old)} → {len(new)}"
    action = undo_of
    if action is None:
        action = DatasetAction.objects.create(
            project_id=image.project_id,
            kind=DatasetAction.Kind.BOX_SET,
            user=user,
            summary=what[:500],
            params={"image": image.id, "head": head.name, "reason": reason},
            changes={"box_sets": [{"box_set_id": current.pk, "old": old, "new": new, "version": version}]},
        )
    BoxEvent.objects.create(
        box_set=current, old=old, new=new, version=version, user=user, reason=reason[:200], action=action
    )
    return action


def box_sets_revert(*, action: DatasetAction, user=None) -> int:
    """action_undo's part for boxes: put back each set the action changed, unless its boxes differ from what the
    action left (changed again since: left as they are, counted as skipped; as for labels, a later undo that
    brought them back makes an earlier action undoable again, so undo steps back one change at a time).
    Returns how many were skipped."""
    skipped = 0
    for c in reversed((action.changes or {}).get("box_sets", [])):
        current = BoxSet.objects.select_for_update().select_related("image", "head").filter(pk=c["box_set_id"]).first()
        if current is None or not same_boxes(box_dicts(current), c["new"]):
            skipped += 1
            continue
        _change(current, c["new"], c["old"], user=user, reason=f"undo: {action.summary}"[:200], undo_of=action)
    return skipped


def box_set_undo(*, image: Image, head: Head, user=None) -> DatasetAction:
    """Undo the last change of this image's boxes for `head` that is not undone yet (through the action log, so the
    Health page's list shows it undone). Refused when there is none, or when the set changed since."""
    from .health import action_undo  # noqa: PLC0415 (health imports this module)

    action = (
        DatasetAction.objects.filter(
            project_id=image.project_id,
            kind=DatasetAction.Kind.BOX_SET,
            undone_at__isnull=True,
            box_events__box_set__image=image,
            box_events__box_set__head=head,
        )
        .order_by("-created_at", "-id")
        .first()
    )
    if action is None:
        raise LabelingError(f"Nothing to undo for image {image.id}'s {head.name} boxes.")
    with transaction.atomic():
        result = action_undo(action=action, user=user)
        if result["skipped"]:
            raise LabelingError("These boxes were changed again since; undo that change first.")
    action.refresh_from_db()
    return action


# ----------------------------------------------------------------------------------------------- import / export
PARSERS = {"yolo": fmt.parse_yolo, "coco": fmt.parse_coco}
WRITERS = {"yolo": fmt.write_yolo, "coco": fmt.write_coco}


def detection_head(project: Project, head: str | None) -> Head:
    """The project's detection head named `head`, or its only one; LabelingError naming the choices otherwise."""
    heads = list(project.heads.filter(kind=Head.Kind.DETECTION))
    if head is not None:
        heads = [h for h in heads if h.name == head]
    if len(heads) != 1:
        names = ", ".join(project.heads.filter(kind=Head.Kind.DETECTION).values_list("name", flat=True)) or "none"
        raise LabelingError(f"Name one detection head of project {project.slug!r} (detection heads: {names}).")
    return heads[0]


def boxes_plan(
    *,
    project: Project,
    folder: Path,
    format: str,
    allowed_roots: list[Path] | None = None,  # noqa: A002
) -> tuple[list[ImportRow], ImportReport]:
    """Read and check a YOLO or COCO folder (nothing written): import rows for the image importer, each carrying its
    photo's sha256, boxes ([class name, x, y, w, h] in pixels; None = not annotated) and the dataset's class list.
    Every problem is in the report's errors (file and line)."""
    if format not in PARSERS:
        raise LabelingError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    root = check_root(Path(folder), allowed_roots)
    report = ImportReport()
    try:
        dataset = PARSERS[format](root)
    except fmt.FormatError as exc:
        report.errors.extend(exc.errors)
        return [], report
    for i, name in enumerate(dataset.classes):
        if clean_label(name) is None:
            report.errors.append(("classes", f"class {i} {name!r} means unknown and cannot be a class"))
    # One photo's content twice with different boxes cannot be stored (photos are content-addressed).
    sha_of: dict[str, str] = {}
    seen: dict[str, fmt.DetImage] = {}
    for image in dataset.images:
        sha = hashlib.sha256(image.path.read_bytes()).hexdigest()
        sha_of[image.name] = sha
        other = seen.setdefault(sha, image)
        if other is not image and other.boxes != image.boxes:
            report.errors.append((f"images/{image.name}", f"the same photo as images/{other.name} with other boxes"))
    if report.errors:
        return [], report
    images_dir = root / "images" if (root / "images").is_dir() else root
    rows = _rows(dataset, images_dir, report)
    for row, image in zip(rows, dataset.images, strict=True):
        boxes = None
        if image.boxes is not None:
            boxes = [[dataset.classes[b.cls], b.x, b.y, b.w, b.h] for b in image.boxes]
        row.boxes = {"sha256": sha_of[image.name], "boxes": boxes, "classes": dataset.classes}
    return rows, report


def boxes_import(
    *,
    project: Project,
    folder: Path,
    format: str,  # noqa: A002 (the command's --format)
    head: str | None = None,
    user=None,
    allowed_roots: list[Path] | None = None,
) -> ImportReport:
    """Import a YOLO or COCO folder into `project` in one transaction: the photos through the image importer
    (content-addressed storage; a train/val/test folder becomes the group's sticky split), the class list mapped by
    name onto the detection head's classes (new names become classes), the boxes as each photo's box set.
    Everything is checked first; any problem → nothing written, every problem in the report (up to a cap). A photo
    whose boxes were set before keeps them when they differ (a warning names it). Any size: the ImportRun mode
    `boxes` (labeling.import_jobs) writes the same in batches."""
    det_head = detection_head(project, head)
    rows, report = boxes_plan(project=project, folder=folder, format=format, allowed_roots=allowed_roots)
    if report.errors:
        return report
    shas = {r.boxes["sha256"] for r in rows}
    existing = set(Image.objects.filter(project=project, sha256__in=shas).values_list("sha256", flat=True))
    try:
        with transaction.atomic():
            report = images_import(project=project, rows=rows, report=report, user=user, group_by="name")
            if not report.written:
                raise _NothingWritten
            box_rows_write(project=project, head=det_head, rows=rows, report=report, user=user)
    except _NothingWritten:
        report.written = False
        return report
    except Exception:
        names = []  # rolled back: delete the files that the photos new to the project left behind
        for row in rows:
            sha = row.boxes["sha256"]
            if sha not in existing:
                ext = row.path.suffix.lower()
                names += [storage.image_name(project.slug, sha, ".jpg" if ext == ".jpeg" else ext)]
                names += [storage.thumb_name(project.slug, sha)]
        storage.delete_quietly(names)
        raise
    return report


class _NothingWritten(Exception):
    pass


def _rows(dataset: fmt.DetDataset, images_dir: Path, report: ImportReport) -> list[ImportRow]:
    """Import rows: the group from the `<ID>_<seq>` file name, unless that group spans two given splits — then each
    of its photos is its own group (the given splits win; a warning says so)."""
    group = {i.name: formats.group_from_name(Path(i.name).name) for i in dataset.images}
    splits_of: dict[str, set] = {}
    for i in dataset.images:
        splits_of.setdefault(group[i.name], set()).add(i.split)
    crossing = sorted(g for g, s in splits_of.items() if len(s) > 1)
    if crossing:
        report.warnings.append(
            (
                "groups",
                f"{len(crossing)} name group(s) ({', '.join(crossing[:5])}) have photos in several splits; each of "
                "their photos is its own group, so the given splits stay as they are.",
            )
        )
    rows = []
    for i in dataset.images:
        g = group[i.name] if group[i.name] not in crossing else f"img:{i.name}"
        rows.append(
            ImportRow(
                where=f"images/{i.name}",
                path=i.path,
                labels={},
                group=g,
                split=i.split,
                root=images_dir,
                group_from="export",
            )
        )
    return rows


def box_rows_write(
    *, project: Project, head: Head, rows: list[ImportRow], report: ImportReport, user=None, run_id: int | None = None
) -> None:
    """Write the box sets of imported rows (boxes_plan's), whose photos are in the project already: a photo never
    set gets the file's boxes (version 1, a BoxEvent whose reason names the import or its job); one set before keeps
    its boxes (a warning when the file's differ). Counts boxes in `report.labels_set`."""
    classes: dict[str, LabelClass] = {}
    for name in rows[0].boxes["classes"] if rows and rows[0].boxes else []:  # the whole class list, in its order
        classes[name], created = label_class_get_or_create(head=head, raw_name=name)
        report.classes_created += int(created)
    shas = {r.boxes["sha256"] for r in rows if r.boxes}
    images = {im.sha256: im for im in Image.objects.filter(project=project, sha256__in=shas)}
    sets = {s.image_id: s for s in BoxSet.objects.filter(head=head, image__in=images.values())}
    reason = import_reason(run_id)
    done = set()
    for row in rows:
        if not row.boxes or row.boxes["boxes"] is None or row.boxes["sha256"] not in images:
            continue
        image = images[row.boxes["sha256"]]
        if image.id in done:
            continue
        done.add(image.id)
        new = [
            {"x": x, "y": y, "w": w, "h": h, "class_id": classes[name].id, "source": "human", "score": None}
            for name, x, y, w, h in row.boxes["boxes"]
        ]
        current = sets.get(image.id)
        if current is not None and current.version > 0:
            if not same_boxes(box_dicts(current), new):
                report.warnings.append((row.where, "its boxes were set before; kept (the file differs)"))
            continue
        current = current or BoxSet.objects.create(image=image, head=head)
        _write_boxes(current, new)
        BoxSet.objects.filter(pk=current.pk).update(version=1, updated_by=user)
        BoxEvent.objects.create(box_set=current, old=[], new=new, version=1, user=user, reason=reason)
        report.labels_set += len(new)


def box_sets_rollback(*, project: Project, run_id: int) -> int:
    """An import job's rollback (import_jobs.import_run_rollback), for boxes: the sets it wrote on photos that were
    there before go again, unless someone changed them since. (Sets on the photos it created go with them.)"""
    events = BoxEvent.objects.filter(
        reason=import_reason(run_id), version=1, box_set__version=1, box_set__image__project=project
    ).exclude(box_set__image__import_run_id=run_id)
    return BoxSet.objects.filter(pk__in=events.values("box_set_id")).delete()[1].get("labeling.BoxSet", 0)


def boxes_export(*, project: Project, out: Path, format: str, head: str | None = None) -> dict:  # noqa: A002
    """Write the project's photos and their boxes for a detection head as a YOLO or COCO folder under `out` (empty
    or new). A group's sticky split becomes the photo's train/val/test folder. Returns counts."""
    if format not in WRITERS:
        raise LabelingError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    det_head = detection_head(project, head)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LabelingError(f"{out} is not empty; export into a new folder.")
    classes = list(LabelClass.objects.filter(head=det_head, merged_into=None).order_by("id"))
    index = {c.id: i for i, c in enumerate(classes)}
    splits = dict(GroupSplit.objects.filter(project=project).values_list("group_key", "split"))
    sets = {
        s.image_id: s
        for s in BoxSet.objects.filter(head=det_head, version__gt=0).prefetch_related("boxes__label_class")
    }
    dataset = fmt.DetDataset(classes=[c.name for c in classes])
    used: set[str] = set()
    files: dict[str, str] = {}
    for image in Image.objects.filter(project=project).exclude(status=Image.Status.UNREADABLE).order_by("id"):
        split = splits.get(image.group_key)
        name = Path(image.original_name).name or f"{image.sha256[:16]}{Path(image.file).suffix}"
        rel = f"{split}/{name}" if split else name
        if str(Path(rel).with_suffix("")) in used:
            name = f"{image.sha256[:12]}_{name}"
            rel = f"{split}/{name}" if split else name
        used.add(str(Path(rel).with_suffix("")))
        files[rel] = image.file
        s = sets.get(image.id)
        boxes = None
        if s is not None:
            boxes = []
            for b in s.boxes.all():
                cls = b.label_class
                while cls.merged_into_id is not None:
                    cls = cls.merged_into
                boxes.append(fmt.DetBox(index[cls.id], b.x, b.y, b.w, b.h))
        dataset.images.append(
            fmt.DetImage(name=rel, path=None, width=image.width, height=image.height, split=split, boxes=boxes)
        )

    def read_bytes(item: fmt.DetImage) -> bytes:
        with default_storage.open(files[item.name], "rb") as fh:
            return fh.read()

    WRITERS[format](dataset, out, read_bytes=read_bytes)
    annotated = [i for i in dataset.images if i.boxes is not None]
    return {
        "images": len(dataset.images if format == "yolo" else annotated),
        "annotated": len(annotated),
        "boxes": sum(len(i.boxes) for i in annotated),
        "classes": len(classes),
    }
