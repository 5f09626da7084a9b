"""Export a model version to ONNX (every head + the embedding, dynamic batch), checked against torch."""

import time

from django.core.management.base import BaseCommand, CommandError

from labeling import storage
from labeling.models import Project
from training import selectors, services
from training.engine.onnx_export import ATOL, RTOL, export_onnx
from training.models import ModelVersion


class Command(BaseCommand):
    help = (
        "Write model.onnx (+ onnx_meta.json with the preprocessing contract) into a model version's artifact folder "
        "and check onnxruntime against torch (|onnx - torch| <= --atol x magnitude + --rtol x |torch|, same predicted "
        "class per head). Default: the active version."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("--model-version", type=int, help="version number (default: the active one)")
        parser.add_argument("--opset", type=int, default=17)
        parser.add_argument("--atol", type=float, default=ATOL)
        parser.add_argument("--rtol", type=float, default=RTOL)

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        try:
            version = selectors.model_version_for(project, opts["model_version"])
        except services.TrainingError as exc:
            raise CommandError(str(exc)) from exc
        try:
            started = time.time()
            result = export_onnx(version.local_dir, opset=opts["opset"], atol=opts["atol"], rtol=opts["rtol"])
            storage.artifact_publish(version.local_dir, since=started)
        except (ValueError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from exc
        keys = ("exporter", "opset", "max_abs_diff", "max_rel_diff", "top1_agreement", "atol", "rtol", "seconds")
        if result["path"].endswith("/model.onnx"):  # the served file: the model page shows its parity figures
            onnx = {k: result[k] for k in keys}
            ModelVersion.objects.filter(pk=version.pk).update(metrics={**version.metrics, "onnx": onnx})
        self.stdout.write(
            f"v{version.number}: {result['path']} ({result['exporter']}, opset {result['opset']}), max |onnx - torch| "
            f"{result['max_abs_diff']:.2e} ({result['max_rel_diff']:.2e} of the output's magnitude), same predicted "
            f"class on {result['top1_agreement']:.0%} of the check rows"
        )
