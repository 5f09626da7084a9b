"""Recognise a shelf photo from the command line with a shelf project's active detector and its SKU project's active
model (the same code as POST /api/v1/projects/<slug>/shelf; nothing is kept for review)."""

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference import services, shelf
from inference.decode import ImageError, decode_image, oriented_size
from inference.recognizer import ModelUnavailable
from inference.shelf_core import annotate


class Command(BaseCommand):
    help = (
        "Recognise every container of one shelf photo with PROJECT's detector and its SKU project's model: prints "
        "the counts per SKU (and per container class), or the whole answer with --json."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="slug of a shelf project (one with a detection head)")
        parser.add_argument("photo", help="the shelf photo (JPEG, PNG or WebP)")
        parser.add_argument("--annotate", metavar="OUT.jpg", help="also write the photo with the boxes drawn here")
        parser.add_argument("--json", action="store_true", help="print the endpoint's JSON answer")
        parser.add_argument("--mode", choices=["softmax", "retrieval", "fusion"], default=None)

    def handle(self, *args, **opts):
        from inference.apis import SHELF_DECODE_SIDE  # noqa: PLC0415 - one decode size for the API and the command

        try:
            ctx = services.serving_context(slug=opts["project"])
            shelf.check_shelf_project(ctx)
        except (services.NoProject, shelf.NotAShelfProject) as exc:
            raise CommandError(str(exc)) from exc
        path = Path(opts["photo"])
        try:
            data = path.read_bytes()
            image = decode_image(data, max_pixels=settings.LOUPE_MAX_IMAGE_PIXELS, max_side_hint=SHELF_DECODE_SIDE)
            size = oriented_size(data, max_pixels=settings.LOUPE_MAX_IMAGE_PIXELS)
        except OSError as exc:
            raise CommandError(f"{path}: {exc.strerror or exc}") from exc
        except ImageError as exc:
            raise CommandError(f"{path}: {exc}") from exc
        scale = (size[0] / image.width, size[1] / image.height)
        mode = opts["mode"] or settings.LOUPE_RECOGNITION_MODE
        try:
            detector = services.active_detector(project_id=ctx.project_id)
            result = shelf.shelf_recognize(ctx=ctx, detector=detector, image=image, scale=scale, mode=mode)
        except services.NoActiveModel as exc:
            raise CommandError(
                f"Shelf project {ctx.slug!r} has no promoted detector yet: train one and promote it."
            ) from exc
        except (ModelUnavailable, shelf.NoGallery) as exc:
            raise CommandError(str(exc)) from exc
        body = result.body
        if opts["annotate"]:
            out = Path(opts["annotate"])
            out.write_bytes(annotate(image, body["boxes"], scale=scale))
        if opts["json"]:
            self.stdout.write(json.dumps(body, indent=1))
            return
        self.stdout.write(
            f"{body['n_boxes']} boxes (detector v{body['detector']['model_version']}, {body['detector']['runtime']})"
        )
        if body["note"]:
            self.stdout.write(body["note"])
        for label, n in sorted(body["counts"].items(), key=lambda kv: (-kv[1], kv[0])):
            self.stdout.write(f"{n:5d}  {label}")
        if body["unknown"]:
            self.stdout.write(f"{body['unknown']:5d}  (unknown SKU)")
        self.stdout.write("containers: " + ", ".join(f"{k} {v}" for k, v in body["containers"].items()))
        if opts["annotate"]:
            self.stdout.write(f"annotated photo: {opts['annotate']}")
