"""Recognise one object from image files with a project's active model (the same code as the REST endpoint)."""

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference import services
from inference.decode import ImageError, decode_image
from inference.recognizer import ModelUnavailable
from labeling.models import Project


class Command(BaseCommand):
    help = "Recognise ONE object from 1-10 photos (files) with PROJECT's active model; prints JSON per head."

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument("images", nargs="+", help="image files: several photos of the same object")
        parser.add_argument("--top-k", type=int, default=5)

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        if len(opts["images"]) > settings.LOUPE_MAX_IMAGES_PER_REQUEST:
            raise CommandError(f"Give at most {settings.LOUPE_MAX_IMAGES_PER_REQUEST} photos of one object.")
        images = []
        for name in opts["images"]:
            path = Path(name)
            try:
                images.append(
                    decode_image(path.read_bytes(), max_pixels=settings.LOUPE_MAX_IMAGE_PIXELS, max_side_hint=512)
                )
            except OSError as exc:
                raise CommandError(f"{path}: {exc.strerror or exc}") from exc
            except ImageError as exc:
                raise CommandError(f"{path}: {exc}") from exc
        try:
            served = services.active_model(project_id=project.id)
        except (services.NoActiveModel, ModelUnavailable) as exc:
            raise CommandError(str(exc)) from exc
        thresholds = dict(project.heads.values_list("name", "threshold"))
        result = served.recognizer.recognize(images, thresholds=thresholds, top_k=opts["top_k"])
        body = {
            "model_version": served.number,
            "backend": served.recognizer.backend,
            "runtime": served.recognizer.runtime,
            "n_images": len(images),
            **result,
        }
        self.stdout.write(json.dumps(body, indent=1))
