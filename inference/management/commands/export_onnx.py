"""Export a model version to ONNX (every head + the embedding, dynamic batch), checked against torch."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from labeling.models import Project
from training import services
from training.engine.onnx_export import export_onnx


class Command(BaseCommand):
    help = (
        "Write model.onnx (+ onnx_meta.json with the preprocessing contract) into a model version's artifact folder "
        "and check onnxruntime against torch (max abs difference <= --atol). Default: the active version."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("--model-version", type=int, help="version number (default: the active one)")
        parser.add_argument("--opset", type=int, default=17)
        parser.add_argument("--atol", type=float, default=1e-4)

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        try:
            version = services.model_version_for(project, opts["model_version"])
        except services.TrainingError as exc:
            raise CommandError(str(exc)) from exc
        try:
            result = export_onnx(Path(version.artifact_dir), opset=opts["opset"], atol=opts["atol"])
        except (ValueError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"v{version.number}: {result['path']} ({result['exporter']}, opset {result['opset']}), max |onnx - torch| "
            f"{result['max_abs_diff']:.2e}"
        )
