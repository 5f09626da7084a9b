"""Out-of-fold predicted probabilities for the mislabel queue, from the command line."""

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from labeling.models import Project
from training import selectors, services
from training.jobs import job_enqueue
from training.models import Job


class Command(BaseCommand):
    help = (
        "Group-aware K-fold cross-validation on the frozen dataset of a model version (default: the active one): "
        "every labeled image, test split included, gets predicted probabilities from a model that never saw it. "
        "Writes <artifact>/oof/oof_predictions.npz and oof_meta.json. --mode cheap trains each fold "
        "for 30 percent of the epochs; --mode quick trains only heads on cached frozen-backbone features."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("--model-version", type=int, help="model version number (default: the active one)")
        parser.add_argument("--k", type=int, default=5, help="folds (default 5)")
        parser.add_argument(
            "--mode",
            choices=["auto", "quick", "full", "cheap"],
            default="auto",
            help="auto (default): quick (heads on cached frozen features) when the backbone is pretrained, else cheap",
        )
        parser.add_argument(
            "--queue", action="store_true", help="run it on the worker as a job (queue gpu; see the Jobs page)"
        )

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        try:
            version = selectors.model_version_for(project, opts["model_version"])
        except services.TrainingError as exc:
            raise CommandError(str(exc)) from exc
        if opts["queue"]:
            with transaction.atomic():
                job = job_enqueue(
                    project=project,
                    kind=Job.Kind.OOF,
                    version=version,
                    params={"k": opts["k"], "mode": opts["mode"]},
                    what="out-of-fold predictions",
                )
            self.stdout.write(
                f"Out-of-fold predictions of v{version.number}: job {job.id} {job.status} (manage.py jobs)."
            )
            return
        try:
            summary = services.model_version_oof(version=version, k=opts["k"], mode=opts["mode"])
        except services.TrainingError as exc:
            raise CommandError(str(exc)) from exc
        heads = ", ".join(
            f"{h} top-1 {m['top1']:.3f} (n={m['n']})" for h, m in summary["heads"].items() if m["top1"] is not None
        )
        self.stdout.write(
            f"Out-of-fold predictions for {summary['n']} images ({summary['k']} folds, {summary['mode']}): {heads}"
        )
        self.stdout.write(f"Written to {summary['path']}")
