"""Run a dataset health scan in this process and print the report (the same scan as the UI's Celery task)."""

import json

from django.core.management.base import BaseCommand, CommandError

from labeling import health
from labeling.models import HealthReport, Project
from labeling.services import LabelingError


class Command(BaseCommand):
    help = (
        "Scan a project's images: unreadable/truncated/missing/empty files, too-small images (their whole group is "
        "left out), near-duplicate clusters (conflicting labels first), class distribution, rare classes, "
        "near-identical and unknown-like class names, and the active model's per-class accuracy. The report is "
        "stored and shown on the project's Health page."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("--min-side", type=int, help="minimum short side in px (default: the project's, 224)")
        parser.add_argument("--max-distance", type=int, help="near-duplicate Hamming distance of 64 bits")
        parser.add_argument("--min-samples", type=int, help="classes with fewer images are rare (default 10)")
        parser.add_argument("--workers", type=int, help="processes for hashing (default: all cores)")
        parser.add_argument("--json", action="store_true", help="print the summary and findings as JSON")

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        try:
            report = health.health_report_create(
                project=project,
                queue=False,
                min_side=opts["min_side"],
                max_distance=opts["max_distance"],
                min_samples=opts["min_samples"],
            )
        except LabelingError as exc:
            raise CommandError(str(exc)) from exc
        report = health.health_report_execute(report_id=report.id, workers=opts["workers"])
        if report.status != HealthReport.Status.SUCCEEDED:
            raise CommandError(f"The scan failed: {report.error}")
        if opts["json"]:
            self.stdout.write(json.dumps({"report": report.id, "summary": report.summary, "findings": report.findings}))
            return
        s = report.summary
        seconds = (report.finished_at - report.started_at).total_seconds()
        self.stdout.write(f"Health report {report.id} for {project.slug!r}: {s['images']} images in {seconds:.1f} s")
        self.stdout.write(f"  file problems            {s['file_issues']}")
        for f in report.findings["files"][:20]:
            self.stdout.write(f"    image {f['image_id']}: {f['problem']} ({f['reason']})")
        self.stdout.write(
            f"  too small                {s['too_small_images']} image(s) in {s['too_small_groups']} group(s); "
            f"{s['excluded_by_size_rule']} image(s) left out of dataset versions"
        )
        self.stdout.write(
            f"  duplicate clusters       {s['duplicate_clusters']} "
            f"({s['conflicting_clusters']} with conflicting labels)"
        )
        for c in report.clusters.all()[:10]:
            flag = "CONFLICT" if c.conflicting else "same label"
            self.stdout.write(f"    {flag:10} {c.kind:5} images {c.image_ids}")
        for head, d in report.findings["classes"].items():
            ratio = f", imbalance {d['imbalance_ratio']:.1f}x" if d["imbalance_ratio"] else ""
            self.stdout.write(f"  head {head}: {d['n_classes']} classes, {d['total']} labeled{ratio}")
            if d["rare"]:
                self.stdout.write("    rare: " + ", ".join(f"{r['name']} ({r['count']})" for r in d["rare"][:20]))
            if d["dominant"]:
                self.stdout.write("    over 40%: " + ", ".join(d["dominant"]))
            for sname in d["similar_names"][:20]:
                self.stdout.write(f"    near-identical names: {sname['a']!r} / {sname['b']!r}")
            if d["unknown_like"]:
                self.stdout.write("    unknown-like: " + ", ".join(u["name"] for u in d["unknown_like"]))
        self.stdout.write(f"Open /p/{project.slug}/health/ to resolve.")
