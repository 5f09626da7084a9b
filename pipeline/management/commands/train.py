"""Train a model for a project in the foreground (the same code the Celery task runs)."""

import json

from django.core.management.base import BaseCommand, CommandError

from labeling.models import Project
from pipeline import chain
from training import services


def parse_set(items: list[str]) -> dict:
    config = {}
    for item in items:
        if "=" not in item:
            raise CommandError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=5")
        key, raw = item.split("=", 1)
        try:
            config[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            config[key.strip()] = raw  # a bare string such as a backbone name
    return config


class Command(BaseCommand):
    help = (
        "Train a model for PROJECT in the foreground (the first model of a project is promoted, a later one when it "
        "passes the promote gate); --cancel ID stops a queued or running run."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override an engine config value (repeatable), e.g. --set epochs=5 --set backbone=resnet18",
        )
        parser.add_argument(
            "--run",
            type=int,
            metavar="ID",
            help="continue an interrupted or failed run from its latest checkpoint instead of starting a new one",
        )
        parser.add_argument("--fresh", action="store_true", help="with --run: ignore its checkpoints, start over")
        parser.add_argument(
            "--cancel",
            type=int,
            metavar="ID",
            help="cancel run ID: a queued run at once, a running one at its next progress report (then exit)",
        )
        parser.add_argument(
            "--quick",
            action="store_true",
            help="quick retrain: only the heads, on cached features of the frozen pretrained backbone (seconds once "
            "the feature cache is warm); same as --set quick=true",
        )

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        if opts["cancel"]:
            run = project.training_runs.filter(pk=opts["cancel"]).first()
            if run is None:
                raise CommandError(f"Project {project.slug!r} has no training run {opts['cancel']}.")
            try:
                run = services.training_run_cancel(run=run)
            except services.TrainingError as exc:
                raise CommandError(str(exc)) from exc
            done = run.status == run.Status.CANCELLED
            self.stdout.write(f"Training run {run.id} {'cancelled' if done else 'stops at its next progress report'}.")
            return
        if opts["quick"] and opts["run"]:
            raise CommandError("--quick starts a new run; --run ID continues one with its own config.")
        if opts["fresh"] and not opts["run"]:
            raise CommandError("--fresh only applies with --run ID (a new run always starts fresh).")
        try:
            if opts["run"]:
                run = services.training_run_reopen(project=project, run_id=opts["run"])
            else:
                config = parse_set(opts["set"])
                if opts["quick"]:
                    config["quick"] = True
                run = services.training_run_create(project=project, config=config, queue=False)
        except services.TrainingError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Training run {run.id} for {project.slug}…")
        run = chain.training_run_execute(run_id=run.id, inline=True, fresh=opts["fresh"])
        if run.status != run.Status.SUCCEEDED:
            raise CommandError(f"Training run {run.id} {run.status}: {run.error}")
        version = run.model_version
        if version.is_active:
            state = "active"
        elif version.evaluated_on != "val":
            state = "not promoted (no validation photos: its figures are optimistic; promote it in the UI)"
        else:
            gate = (version.metrics or {}).get("gate") or {}
            state = f"not promoted ({gate.get('reason') or 'an active model exists'}; promote it in the UI)"
        self.stdout.write(
            f"Model v{version.number}: mean top-1 on {version.evaluated_on} {version.metrics.get('primary')} — {state}"
        )
