"""Import a YOLO or COCO box dataset into a project's detection head (labeling.boxes.boxes_import)."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from labeling.boxes import FORMATS, boxes_import
from labeling.models import Project
from labeling.services import LabelingError


class Command(BaseCommand):
    help = (
        "Import photos and their boxes into a project's detection head. YOLO: images/ + labels/ (class xc yc w h, "
        "normalised), the class list in data.yaml or classes.txt; COCO: annotations.json + images/. train/val/test "
        "folders become sticky splits; class names new to the head become classes. Any bad line → nothing written, "
        "every problem listed with its file and line."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("folder", help="the dataset folder")
        parser.add_argument("--format", choices=FORMATS, required=True)
        parser.add_argument("--head", help="the detection head (default: the project's only one)")

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        try:
            report = boxes_import(
                project=project, folder=Path(opts["folder"]), format=opts["format"], head=opts["head"]
            )
        except LabelingError as exc:
            raise CommandError(str(exc)) from None
        for where, msg in report.warnings:
            self.stdout.write(f"WARNING {where}: {msg}")
        if not report.written:
            for where, msg in report.errors:
                self.stderr.write(f"ERROR   {where}: {msg}")
            raise CommandError(f"Nothing was written: {len(report.errors)} problem(s).")
        self.stdout.write(
            f"Imported {report.created} new photo(s) ({report.existing} already present), {report.labels_set} "
            f"box(es), {report.classes_created} new class(es)."
        )
