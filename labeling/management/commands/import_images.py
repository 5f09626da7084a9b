"""Import photos into a project: folder (<class>/<ID>_<seq>.jpg), CSV with column mapping, or placeholder."""

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from labeling import importers
from labeling.import_jobs import import_run_create
from labeling.models import Project
from labeling.presets import PRESETS
from labeling.services import LabelingError, project_create


class Command(BaseCommand):
    help = (
        "Import images into a project. Modes: folder (<root>/<class>/<ID>_<seq>.jpg; ID = group), csv (a filename "
        "column + one column per head, e.g. --csv labels.csv --filename-col image_filename --head make=make "
        "--head model=model), placeholder (all images under the folder, unlabeled), export (a folder in the "
        "seeds' formats as `dataset_version export` writes it: labels CSV + images/ + splits.json, or an "
        "ImageFolder tree; its splits become sticky). With any bad row nothing is "
        "written unless --skip-bad-rows. Re-importing the same files is a no-op, unless --update: then the labels "
        "the file gives replace those of photos already in the project (each change in the label history)."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("folder", help="the images folder")
        parser.add_argument(
            "--mode",
            choices=["folder", "csv", "placeholder", "export"],
            default=None,
            help="default: csv when --csv is given, else folder",
        )
        parser.add_argument("--csv", dest="csv_path", help="CSV file (csv mode)")
        parser.add_argument("--filename-col", default="image_filename")
        parser.add_argument(
            "--head",
            action="append",
            default=[],
            metavar="HEAD=COLUMN",
            help="map a CSV column to a head (repeat per head)",
        )
        parser.add_argument("--group-col", help="CSV column with the group/ID (default: from <ID>_<seq> file names)")
        parser.add_argument(
            "--group-by",
            choices=("auto", "name", "image", "column"),
            default="auto",
            help="groups (never split across train/val/test): <ID>_<seq> file names (name), one per photo (image), "
            "the --group-col column (column); auto (default) = name, unless those groups would swallow a class or "
            "most of the import, then image",
        )
        parser.add_argument("--source-col", help="CSV column with the source (real/synthetic/legacy)")
        parser.add_argument("--class-head", help="folder mode: the head the folder names label (default: first head)")
        parser.add_argument(
            "--create",
            metavar="PRESET",
            choices=sorted(PRESETS),
            help="create the project with this preset if it does not exist",
        )
        parser.add_argument("--name", help="project name when creating (default: the slug)")
        parser.add_argument("--skip-bad-rows", action="store_true", help="import good rows, report bad ones")
        parser.add_argument(
            "--update",
            action="store_true",
            help="for photos already in the project (same file), set the labels the CSV/export/folder gives; each "
            "change is a label history entry, rows that change nothing are left alone, an empty cell clears nothing "
            "(default: existing labels are kept)",
        )
        parser.add_argument("--user", help="username recorded in the label history (default: none)")
        parser.add_argument(
            "--background",
            action="store_true",
            help="queue it as an import job on the worker (any size: written in batches, progress on the Import and "
            "Jobs pages, cancel; a failed or cancelled job removes what it wrote)",
        )

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            if not opts["create"]:
                raise CommandError(f"No project {opts['project']!r}; pass --create PRESET to create it.")
            project = project_create(name=opts["name"] or opts["project"], slug=opts["project"], preset=opts["create"])
            self.stdout.write(f"Created project {project.slug!r} ({project.preset}).")
        mode = opts["mode"] or ("csv" if opts["csv_path"] else "folder")
        user = None
        if opts["user"]:
            user = get_user_model().objects.filter(username=opts["user"]).first()
            if user is None:
                raise CommandError(f"No user {opts['user']!r}.")
        folder = Path(opts["folder"])
        if opts["background"]:
            self._background(project, mode, folder, opts, user)
            return
        try:
            if mode == "csv":
                if not opts["csv_path"] or not opts["head"]:
                    raise CommandError("csv mode needs --csv FILE and at least one --head HEAD=COLUMN.")
                head_cols = {}
                for item in opts["head"]:
                    if "=" not in item:
                        raise CommandError(f"--head {item!r}: expected HEAD=COLUMN, e.g. --head make=make")
                    head, col = item.split("=", 1)
                    head_cols[head.strip()] = col.strip()
                rows, report = importers.plan_csv(
                    Path(opts["csv_path"]),
                    images_dir=folder,
                    filename_col=opts["filename_col"],
                    head_cols=head_cols,
                    project=project,
                    group_col=opts["group_col"],
                    source_col=opts["source_col"],
                )
            elif mode == "placeholder":
                rows, report = importers.plan_placeholder(folder)
            elif mode == "export":
                rows, report = importers.plan_export(folder, project=project)
            else:
                head = (
                    project.heads.filter(name=opts["class_head"]).first()
                    if opts["class_head"]
                    else project.heads.first()
                )
                if head is None:
                    raise CommandError(f"Project {project.slug!r} has no head {opts['class_head']!r}.")
                rows, report = importers.plan_folder(folder, head=head)
            report = importers.images_import(
                project=project,
                rows=rows,
                report=report,
                user=user,
                skip_bad_rows=opts["skip_bad_rows"],
                group_by=opts["group_by"],
                update=opts["update"],
            )
        except LabelingError as exc:
            raise CommandError(str(exc)) from exc
        for line in report.lines():
            self.stdout.write(line)
        if not report.written:
            raise CommandError(f"Import failed with {len(report.errors)} error(s); nothing was written.")

    def _background(self, project, mode, folder, opts, user) -> None:
        params = {
            "folder": str(folder.resolve()),
            "group_by": opts["group_by"],
            "skip_bad_rows": opts["skip_bad_rows"],
            "update": opts["update"],
            "class_head": opts["class_head"],
        }
        if mode == "csv":
            heads = dict(item.split("=", 1) for item in opts["head"] if "=" in item)
            params.update(
                csv=str(Path(opts["csv_path"] or "").resolve()) if opts["csv_path"] else "",
                head_cols={k.strip(): v.strip() for k, v in heads.items()},
                filename_col=opts["filename_col"],
                group_col=opts["group_col"],
                source_col=opts["source_col"],
            )
        try:
            with transaction.atomic():
                run = import_run_create(project=project, mode=mode, params=params, user=user)
        except LabelingError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Import {run.id} queued on the worker: `manage.py jobs {project.slug}` (or the Jobs page) shows its "
            f"progress; `manage.py jobs {project.slug} --cancel importrun/{run.id}` cancels it."
        )
