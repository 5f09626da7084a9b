"""Import photos into a project: a class-per-folder tree, a CSV with column mapping, or placeholder (all
unlabeled). Two phases: plan + read every file (no writes), then, only if nothing is wrong (or the caller
allows skipping bad rows), one transaction that writes rows and files. A failed import writes nothing.

A photo already in the project (same sha256) keeps its labels: the import only fills the heads it has no label
for. In update mode (`images_import(update=True)`, `import_images --update`, the Import page's "update labels")
the labels the file gives replace the photo's current ones through `services.label_set` (a LabelEvent with the
importing user, optimistic concurrency); rows that change nothing are left alone, and an empty (unknown) cell
never clears a label."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from django.core.files.storage import default_storage
from django.db import transaction
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from . import formats, storage
from .models import Head, Image, Label, LabelEvent, Project
from .normalize import clean_label
from .services import LabelConflict, LabelingError, label_class_get_or_create, label_set

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass
class ImportRow:
    where: str  # "line 12" or the relative path: how the report names this row
    path: Path
    labels: dict[str, str | None]
    group: str
    source: str = "real"
    split: str | None = None  # from an export's splits: becomes the group's sticky split
    root: Path | None = None  # the import folder: the file's real path must stay inside it (no symlink escapes)
    group_from: str = "name"  # "name" (<ID>_<seq> file name), "column" (the CSV's group column) or "export"
    storage_name: str = ""  # a browser upload's staged copy, read through the storage API (`path` is its relative path)
    # a box dataset's photo (labeling.boxes): {"sha256": ..., "boxes": [[class name, x, y, w, h], ...] or None}
    boxes: dict | None = None


@dataclass
class ImportReport:
    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    created: int = 0
    existing: int = 0
    unreadable: int = 0
    labels_set: int = 0
    labels_updated: int = 0
    classes_created: int = 0
    written: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        out = [f"ERROR   {where}: {msg}" for where, msg in self.errors]
        out += [f"WARNING {where}: {msg}" for where, msg in self.warnings]
        if self.written:
            out.append(
                f"Imported {self.created} new image(s) ({self.unreadable} unreadable, kept for the health check), "
                f"{self.existing} already present, {self.labels_set} label(s) set, "
                f"{self.labels_updated} label(s) updated, {self.classes_created} new class(es)."
            )
        else:
            out.append(f"Nothing was written: {len(self.errors)} error(s) in {self.rows} row(s).")
        return out


def inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_root(root: Path, allowed_roots: list[Path] | None) -> Path:
    root = Path(root)
    if allowed_roots is not None and not any(inside(a, root) for a in allowed_roots):
        allowed = ", ".join(str(a) for a in allowed_roots)
        raise LabelingError(f"{root} is outside the import folders ({allowed}); copy the photos there first.")
    if not root.is_dir():
        raise LabelingError(f"{root} is not a folder.")
    return root


def plan_folder(
    root: Path, *, head: Head, allowed_roots: list[Path] | None = None
) -> tuple[list[ImportRow], ImportReport]:
    """`root/<class>/<ID>_<seq>.jpg`: the folder name is the class for `head`, the ID is the group."""
    root = check_root(root, allowed_roots)
    report = ImportReport()
    rows: list[ImportRow] = []
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_EXTS:
            report.warnings.append((str(rel), "not an image file name (.jpg/.jpeg/.png/.webp/.bmp); ignored"))
            continue
        if len(rel.parts) != 2:
            report.errors.append((str(rel), "expected <class>/<file>; files must sit in one class folder"))
            continue
        rows.append(
            ImportRow(
                where=str(rel),
                path=path,
                labels={head.name: rel.parts[0]},
                group=formats.group_from_name(path.name),
                root=root,
            )
        )
    if not rows and not report.errors:
        report.errors.append((str(root), "no images found (expected <class>/<ID>_<seq>.jpg)"))
    return rows, report


def plan_export(
    folder: Path, *, project: Project, allowed_roots: list[Path] | None = None
) -> tuple[list[ImportRow], ImportReport]:
    """A folder in the seeds' formats (as `dataset_version export` writes it: car_labels.csv or labels.csv with
    images/, splits.json, metadata.csv, label_maps.json; or an ImageFolder tree with class_to_idx.json). The
    splits become the groups' sticky splits."""
    from .formats import FormatError, read_export
    from .versions import folder_head

    folder = check_root(folder, allowed_roots)
    try:
        data = read_export(folder)
    except FormatError as exc:
        raise LabelingError(str(exc)) from exc
    heads = list(project.heads.order_by("order", "id"))
    names = [h.name for h in heads]
    mapping = {h: h for h in data.heads}
    if data.kind == "imagefolder" and data.heads == ["label"] and "label" not in names:
        mapping = {"label": folder_head(heads).name}  # a plain ImageFolder labels the project's folder head
    unknown = sorted(h for h, target in mapping.items() if target not in names)
    if unknown:
        raise LabelingError(
            f"The export has head(s) {', '.join(unknown)} but project {project.slug!r} has {', '.join(names)}; "
            "import into a project with the same heads."
        )
    report = ImportReport()
    report.warnings.extend(data.notes)
    rows = [
        ImportRow(
            where=r.where,
            path=r.path,
            labels={mapping[h]: v for h, v in r.labels.items()},
            group=r.group,
            source=r.source,
            split=r.split,
            root=folder,
            group_from="export",
        )
        for r in data.rows
    ]
    if not rows:
        report.errors.append((str(folder), "the export lists no images"))
    return rows, report


def plan_placeholder(root: Path, *, allowed_roots: list[Path] | None = None) -> tuple[list[ImportRow], ImportReport]:
    """Every image under `root`, all unlabeled."""
    root = check_root(root, allowed_roots)
    report = ImportReport()
    rows = [
        ImportRow(where=str(p.relative_to(root)), path=p, labels={}, group=formats.group_from_name(p.name), root=root)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS
    ]
    if not rows:
        report.errors.append((str(root), "no images found"))
    return rows, report


def plan_csv(
    csv_file: Path | io.TextIOBase,
    *,
    images_dir: Path,
    filename_col: str,
    head_cols: dict[str, str],
    project: Project,
    group_col: str | None = None,
    source_col: str | None = None,
    allowed_roots: list[Path] | None = None,
) -> tuple[list[ImportRow], ImportReport]:
    """A CSV with a filename column and one column per head (`--head make=make`). Rows whose file is
    missing or outside `images_dir` are reported by line number."""
    images_dir = check_root(images_dir, allowed_roots)
    report = ImportReport()
    heads = {h.name for h in project.heads.all()}
    unknown_heads = sorted(set(head_cols) - heads)
    if unknown_heads:
        raise LabelingError(
            f"Project {project.slug!r} has no head(s) {', '.join(unknown_heads)}; heads: {', '.join(sorted(heads))}."
        )
    try:
        handle = open(csv_file, newline="", encoding="utf-8-sig") if isinstance(csv_file, (str, Path)) else csv_file
    except OSError as exc:
        raise LabelingError(f"Cannot read the CSV file: {exc.strerror}: {csv_file}") from exc
    rows: list[ImportRow] = []
    with handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        wanted = [filename_col, *head_cols.values(), *(c for c in (group_col, source_col) if c)]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise LabelingError(
                f"The CSV has no column(s) {', '.join(repr(c) for c in missing)}; its columns are "
                f"{', '.join(repr(c) for c in columns) or '(none: is the file empty?)'}."
            )
        valid_sources = {c.value for c in Image.Source}
        try:
            for line_no, rec in enumerate(reader, start=2):
                where = f"line {line_no}"
                name = (rec.get(filename_col) or "").strip()
                if not name:
                    report.errors.append((where, f"empty {filename_col!r}"))
                    continue
                path = images_dir / name
                if not inside(images_dir, path):
                    report.errors.append((where, f"{name!r} points outside the images folder {images_dir}"))
                    continue
                if not path.is_file():
                    report.errors.append((where, f"no file {name!r} in {images_dir} (unmatched row)"))
                    continue
                source = (rec.get(source_col) or "real").strip().lower() if source_col else "real"
                if source not in valid_sources:
                    report.errors.append((where, f"source {source!r} is not one of {', '.join(sorted(valid_sources))}"))
                    continue
                group = (rec.get(group_col) or "").strip() if group_col else ""
                rows.append(
                    ImportRow(
                        where=where,
                        path=path,
                        labels={head: rec.get(col) for head, col in head_cols.items()},
                        group=group or formats.group_from_name(path.name),
                        source=source,
                        root=images_dir,
                        group_from="column" if group else "name",
                    )
                )
        except (csv.Error, UnicodeDecodeError) as exc:
            raise LabelingError(f"The CSV cannot be parsed near line {reader.line_num}: {exc}") from exc
    if not rows and not report.errors:
        report.errors.append(("csv", "the CSV has no data rows"))
    return rows, report


GROUP_BY = ("auto", "name", "image", "column")
# A name-derived group holding more than this share of the import is no group (`car_000001.jpg` → "car").
_MOST_OF_THE_PROJECT = 0.5


def swallowing_groups(rows: list[ImportRow]) -> list[str]:
    """What is wrong with the groups that `<ID>_<seq>` file names give these rows, one sentence each: a class
    (any head; at least 2 photos) whose photos all fall in one name group, so no split could ever test it
    (grocery's `Granny-Smith_001.jpg`), or one name group holding most of the import (`car_000001.jpg`).
    Groups given explicitly (a CSV group column, an export) are not judged."""
    named = [r for r in rows if r.group_from == "name"]
    if len(named) < 4:
        return []
    problems: list[str] = []
    biggest, size = Counter(r.group for r in named).most_common(1)[0]
    if size > _MOST_OF_THE_PROJECT * len(named):
        problems.append(f"group {biggest!r} would hold {size} of the {len(named)} photos")
    groups_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    count: Counter = Counter()
    for r in named:
        for head, raw in r.labels.items():
            value = clean_label(raw)
            if value is not None:
                groups_of[(head, value)].add(r.group)
                count[(head, value)] += 1
    swallowed = sorted(k for k, groups in groups_of.items() if len(groups) == 1 and count[k] >= 2)
    if swallowed:
        head, value = swallowed[0]
        more = f" (and {len(swallowed) - 1} more class(es))" if len(swallowed) > 1 else ""
        problems.append(
            f"every photo of {head} {value!r} ({count[swallowed[0]]}) would be in the one group "
            f"{next(iter(groups_of[swallowed[0]]))!r}{more}, so no split could test it"
        )
    return problems


def groups_apply(rows: list[ImportRow], report: ImportReport, *, group_by: str = "auto") -> list[ImportRow]:
    """Choose the rows' groups (photos of one group never cross train/val/test splits):
    - "name": `<ID>_<seq>` file names (or the CSV's group column where it has a value), as they are;
    - "image": one group per photo (its path under the import folder);
    - "column": the CSV's group column; a row without a value is an error;
    - "auto" (default): "name", unless the name groups would swallow a class or most of the import
      (`swallowing_groups`); then one group per photo, and the report says why and how to keep the names."""
    if group_by not in GROUP_BY:
        raise LabelingError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}.")
    if group_by == "column":
        for r in rows:
            if r.group_from == "name":
                report.errors.append((r.where, "no group value (group by column needs the CSV's group column)"))
        return rows
    if group_by == "name":
        return rows
    problems = swallowing_groups(rows) if group_by == "auto" else []
    if group_by == "auto" and not problems:
        return rows
    if problems:
        report.warnings.append(
            (
                "groups",
                "file names would give groups that swallow a class: "
                + "; ".join(problems)
                + ". Each photo is its own group instead (group by: image). If photos that share a name prefix "
                "really are one object or one shoot, import with group by: name (--group-by name), or give a "
                "group column (--group-col, --group-by column).",
            )
        )
    for r in rows:
        if r.group_from == "name":
            rel = r.path.relative_to(r.root) if r.root is not None and r.path.is_relative_to(r.root) else r.path
            r.group = f"img:{rel.as_posix()}"[:200]
            r.group_from = "image"
    return rows


@dataclass
class _ReadFile:
    row: ImportRow
    data: bytes
    sha256: str
    ext: str
    width: int | None
    height: int | None
    problem: str  # "" when the image decodes


def _read_bytes(row: ImportRow) -> bytes | str:
    """The file's bytes, or why they cannot be read."""
    too_big = "file is {:.0f} MB, more than the {} MiB limit"
    if row.storage_name:  # a staged upload: through the storage API (the worker may not share the web's disk)
        try:
            size = default_storage.size(row.storage_name)
            if size > MAX_FILE_BYTES:
                return too_big.format(size / 1e6, MAX_FILE_BYTES // 2**20)
            with default_storage.open(row.storage_name, "rb") as fh:
                return fh.read()
        except OSError as exc:
            return f"cannot read the uploaded file: {exc.strerror or exc}"
    # The real path is checked and then read (not the link), so a symbolic link (to a file or through a folder)
    # can never bring a file from outside the import folder in: /etc/passwd renamed car_1.jpg is refused.
    real = row.path.resolve()
    if row.root is not None and not inside(row.root, real):
        return f"{str(row.where)!r} points outside the images folder {row.root} (a symbolic link?); refused"
    try:
        size = real.stat().st_size
        if size > MAX_FILE_BYTES:
            return too_big.format(size / 1e6, MAX_FILE_BYTES // 2**20)
        return real.read_bytes()
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"


def _read(row: ImportRow) -> _ReadFile | str:
    data = _read_bytes(row)
    if isinstance(data, str):
        return data
    width = height = None
    problem = ""
    if not data:
        problem = "empty file"
    else:
        try:
            with PILImage.open(io.BytesIO(data)) as img:
                width, height = img.size
                img.draft("RGB", (64, 64))  # decode at reduced size: enough to catch truncation
                img.load()
        except UnidentifiedImageError:
            problem = "not a readable image"
        except (OSError, SyntaxError, ValueError) as exc:
            problem = f"truncated or damaged image ({exc})"
        except PILImage.DecompressionBombError as exc:
            problem = f"too many pixels ({exc})"
    ext = row.path.suffix.lower()
    ext = ".jpg" if ext == ".jpeg" else ext
    return _ReadFile(row, data, hashlib.sha256(data).hexdigest(), ext, width, height, problem)


def images_import(
    *,
    project: Project,
    rows: list[ImportRow],
    report: ImportReport,
    user=None,
    skip_bad_rows: bool = False,
    group_by: str = "auto",
    update: bool = False,
    run_id: int | None = None,
) -> ImportReport:
    """Write the planned rows, their groups chosen by `group_by` (see groups_apply). With errors in the plan
    nothing is written unless `skip_bad_rows`. `update`: photos already in the project get the labels the rows
    give (see the module doc), each change a LabelEvent by `user`, counted in `labels_updated`."""
    report.rows = len(rows) + len(report.errors)
    rows = groups_apply(rows, report, group_by=group_by)
    heads = {h.name: h for h in project.heads.select_related("parent")}
    read: list[_ReadFile] = []
    for row in rows:
        result = _read(row)
        if isinstance(result, str):
            report.errors.append((row.where, result))
        else:
            read.append(result)
    # Validate label values before writing anything.
    for item in read:
        for head_name, raw in item.row.labels.items():
            if raw is not None and len(str(raw).strip()) > 200:
                report.errors.append((item.row.where, f"{head_name} label is longer than 200 characters"))
            head = heads.get(head_name)
            if head is not None and head.kind == Head.Kind.DETECTION and clean_label(raw) is not None:
                report.errors.append(
                    (item.row.where, f"{head_name} is a detection head: its labels are boxes (manage.py import_boxes)")
                )
    if report.errors and not skip_bad_rows:
        return report
    bad = {where for where, _ in report.errors}
    read = [r for r in read if r.row.where not in bad]

    written_files: list[str] = []
    try:
        with transaction.atomic():
            _write(project, heads, read, report, user, written_files, update=update, run_id=run_id)
    except LabelingError as exc:
        storage.delete_quietly(written_files)
        report.errors.append(("import", str(exc)))
        report.created = report.existing = report.unreadable = report.labels_set = report.labels_updated = 0
        report.classes_created = 0
        return report
    except Exception:
        storage.delete_quietly(written_files)
        raise
    report.written = True
    return report


def _write_group_splits(project, read) -> None:
    """Record the splits an export carried as the groups' sticky splits; a group that already has a different
    split refuses the import (groups never cross splits)."""
    from .models import GroupSplit

    wanted: dict[str, str] = {}
    for item in read:
        if item.row.split is None:
            continue
        group = item.row.group[:200]
        if wanted.setdefault(group, item.row.split) != item.row.split:
            raise LabelingError(f"{item.row.where}: group {group!r} is in two splits; a group must stay in one.")
    if not wanted:
        return
    existing = dict(
        GroupSplit.objects.filter(project=project, group_key__in=list(wanted)).values_list("group_key", "split")
    )
    for group, split in wanted.items():
        if group in existing and existing[group] != split:
            raise LabelingError(
                f"group {group!r} is in {split!r} in this export but already in {existing[group]!r} in the project; "
                "splits are sticky, so nothing was imported."
            )
    GroupSplit.objects.bulk_create(
        [GroupSplit(project=project, group_key=g, split=s) for g, s in wanted.items() if g not in existing],
        batch_size=5000,
    )


def _write(project, heads, read, report, user, written_files, *, update: bool = False, run_id=None) -> None:
    """Write the read rows. `run_id`: an import job's, recorded on every image it creates and in the reason of every
    label it sets (import_jobs rolls them back by these if the job fails or is cancelled)."""
    _write_group_splits(project, read)
    by_sha: dict[str, Image] = {
        im.sha256: im for im in Image.objects.filter(project=project, sha256__in=[r.sha256 for r in read])
    }
    for item in read:
        image = by_sha.get(item.sha256)
        if image is None:
            name = storage.image_name(project.slug, item.sha256, item.ext)
            if storage.store_bytes(name, item.data):
                written_files.append(name)
            thumb = ""
            if not item.problem:
                thumb_bytes = storage.make_thumbnail(item.data)
                if thumb_bytes:
                    thumb = storage.thumb_name(project.slug, item.sha256)
                    if storage.store_bytes(thumb, thumb_bytes):
                        written_files.append(thumb)
            image = Image.objects.create(
                project=project,
                sha256=item.sha256,
                file=name,
                thumbnail=thumb,
                original_name=item.row.path.name,
                width=item.width,
                height=item.height,
                byte_size=len(item.data),
                group_key=item.row.group[:200],
                source=item.row.source,
                status=Image.Status.UNREADABLE if item.problem else Image.Status.OK,
                status_reason=item.problem[:300],
                import_run_id=run_id,
            )
            # a detection head's labels are boxes (labeling.boxes), not a Label row
            Label.objects.bulk_create([Label(image=image, head=h) for h in heads.values() if h.kind == Head.Kind.CLASS])
            by_sha[item.sha256] = image
            report.created += 1
            if item.problem:
                report.unreadable += 1
                report.warnings.append(
                    (item.row.where, f"{item.problem}; imported as unreadable (excluded from training)")
                )
        else:
            report.existing += 1
        _apply_labels(image, heads, item.row, report, user, update=update, reason=import_reason(run_id))


def import_reason(run_id: int | None) -> str:
    """The label history's reason for labels an import sets (an import job's names the job)."""
    return f"import job {run_id}" if run_id else "import"


def _apply_labels(
    image: Image,
    heads: dict[str, Head],
    row: ImportRow,
    report: ImportReport,
    user,
    *,
    update: bool = False,
    reason: str = "import",
) -> None:
    labels = {lb.head_id: lb for lb in image.labels.select_related("label_class")}
    chosen: dict[str, object] = {}
    # Parents first, so a child class (model) can point at its parent class (make).
    for head in sorted(heads.values(), key=lambda h: h.parent_id is not None):
        if head.name not in row.labels:
            continue
        display = clean_label(row.labels[head.name])
        if display is None:
            continue  # unknown: unlabeled for this head
        parent_class = chosen.get(head.parent.name) if head.parent_id else None
        try:
            cls, created = label_class_get_or_create(
                head=head, raw_name=str(row.labels[head.name]), parent=parent_class
            )
        except LabelingError as exc:
            raise LabelingError(f"{row.where}: {exc}") from exc
        report.classes_created += int(created)
        chosen[head.name] = cls
        label = labels[head.id]
        if label.label_class_id == cls.id:
            continue
        if label.label_class_id is not None:
            if update:
                _update_label(label, head, cls, row, report, user, reason=f"{reason} update")
            else:
                report.warnings.append(
                    (row.where, f"{head.name} is already {label.label_class.name!r}; kept (the file says {display!r})")
                )
            continue
        Label.objects.filter(pk=label.pk).update(label_class=cls, version=label.version + 1, updated_by=user)
        LabelEvent.objects.create(image=image, head=head, old_class=None, new_class=cls, user=user, reason=reason)
        report.labels_set += 1


def _update_label(
    label: Label, head: Head, cls, row: ImportRow, report: ImportReport, user, *, reason: str = "import update"
) -> None:
    """Update mode: replace a label through the label service (history + optimistic concurrency). A label somebody
    changed since this import read it is theirs: kept, with a warning."""
    try:
        change = label_set(label_id=label.pk, class_id=cls.id, expected_version=label.version, user=user, reason=reason)
    except LabelConflict as exc:
        current = exc.current.label_class.name if exc.current.label_class_id else "unlabeled"
        report.warnings.append(
            (row.where, f"{head.name} was changed by someone else during the import (now {current!r}); kept")
        )
        return
    except LabelingError as exc:
        raise LabelingError(f"{row.where}: {exc}") from exc
    if change.changed:
        report.labels_updated += 1


def demo_import(*, project: Project, csv_path: Path, images_dir: Path, user=None) -> ImportReport:
    """Import the demo generator's output (labels.csv: image_filename, part, color, source, group)."""
    rows, report = plan_csv(
        csv_path,
        images_dir=images_dir,
        filename_col="image_filename",
        head_cols={"part": "part", "color": "color"},
        project=project,
        group_col="group",
        source_col="source",
    )
    return images_import(project=project, rows=rows, report=report, user=user)
