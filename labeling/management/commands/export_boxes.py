"""Export a project's photos and boxes as a YOLO or COCO folder (labeling.boxes.boxes_export)."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from labeling.boxes import FORMATS, boxes_export
from labeling.models import Project
from labeling.services import LabelingError


class Command(BaseCommand):
    help = (
        "Write a project's photos and their boxes for a detection head into a new folder: YOLO (images/, labels/, "
        "classes.txt, data.yaml) or COCO (annotations.json + images/); sticky splits become train/val/test folders."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("out", help="a new (or empty) folder")
        parser.add_argument("--format", choices=FORMATS, required=True)
        parser.add_argument("--head", help="the detection head (default: the project's only one)")

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        try:
            counts = boxes_export(project=project, out=Path(opts["out"]), format=opts["format"], head=opts["head"])
        except LabelingError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Wrote {counts['images']} photo(s), {counts['annotated']} annotated, {counts['boxes']} box(es), "
            f"{counts['classes']} class(es) to {opts['out']}."
        )
