"""Dataset versions from the command line: create, list, diff, export."""

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from labeling import selectors, versions
from labeling.models import Project
from labeling.services import LabelingError


class Command(BaseCommand):
    help = (
        "create: freeze the usable images, labels and sticky group-aware splits (no-op when nothing changed); "
        "list; diff OLD NEW; export N FOLDER (car_labels.csv/labels.csv, splits.json, label_maps.json, "
        "splits/*_ids.json, class_to_idx.json, an ImageFolder tree)."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create")
        create.add_argument("--note", default="")
        create.add_argument(
            "--ratios",
            default="0.7,0.15,0.15",
            help="train,val,test shares for groups that have no split yet (sticky groups keep theirs)",
        )
        create.add_argument(
            "--allow-empty-eval",
            action="store_true",
            help="freeze even if a head would have no labeled photos in val or test (figures become optimistic)",
        )
        sub.add_parser("list")
        diff = sub.add_parser("diff")
        diff.add_argument("old", type=int)
        diff.add_argument("new", type=int)
        export = sub.add_parser("export")
        export.add_argument("number", type=int)
        export.add_argument("folder")
        export.add_argument("--link", choices=["hardlink", "copy", "symlink"], default="hardlink")

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        try:
            getattr(self, f"_{opts['action']}")(project, opts)
        except LabelingError as exc:
            raise CommandError(str(exc)) from exc

    def _create(self, project, opts):
        try:
            ratios = tuple(float(x) for x in opts["ratios"].split(","))
        except ValueError:
            raise CommandError(f"--ratios {opts['ratios']!r}: expected three numbers like 0.7,0.15,0.15") from None
        version, created = versions.dataset_version_create(
            project=project, note=opts["note"], ratios=ratios, allow_empty_eval=opts["allow_empty_eval"]
        )
        c = version.counts
        verb = "Created" if created else "Nothing changed; the latest is"
        self.stdout.write(
            f"{verb} dataset version {version.number}: {c['images']} images, {c['groups']} groups, "
            f"train {c['splits']['train']} / val {c['splits']['val']} / test {c['splits']['test']}, "
            f"hash {version.content_hash[:12]}"
        )
        if c.get("left_out"):
            self.stdout.write("  left out: " + ", ".join(f"{k} {n}" for k, n in c["left_out"].items()))

    def _list(self, project, opts):
        for v in selectors.dataset_version_list(project):
            s = v.counts.get("splits", {})
            self.stdout.write(
                f"v{v.number}  {v.counts.get('images', 0):>7} images  "
                f"train {s.get('train', 0)} / val {s.get('val', 0)} "
                f"/ test {s.get('test', 0)}  {v.content_hash[:12]}  {v.created_at:%Y-%m-%d %H:%M}  {v.note}"
            )

    def _diff(self, project, opts):
        diff = versions.dataset_version_diff(
            old=selectors.dataset_version_get(project, opts["old"]),
            new=selectors.dataset_version_get(project, opts["new"]),
        )
        self.stdout.write(json.dumps(diff, indent=1))

    def _export(self, project, opts):
        summary = versions.dataset_version_export(
            version=selectors.dataset_version_get(project, opts["number"]),
            out_dir=Path(opts["folder"]),
            link=opts["link"],
        )
        self.stdout.write(f"Exported {summary['images']} images to {opts['folder']}.")
