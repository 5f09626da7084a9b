"""Writes for training: create, claim, train, cancel and complete runs, register and activate model versions,
out-of-fold predictions. The chain around them (calibration, test report, promote gate, index, queues) is the
pipeline's (pipeline/chain.py); its steps are queued here by task name, never imported."""

import datetime as dt
import json
import logging
import time
import traceback
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from labeling import storage
from labeling.models import DatasetVersion, Head, Project
from labeling.services import LabelingError
from labeling.versions import dataset_version_create, version_detection_manifest, version_manifest
from training.engine.atomic import write_json_atomic
from webapp import jobs

from .errors import TrainingError
from .jobs import job_enqueue
from .models import Job, ModelVersion, TrainingRun, normalise_pretrained_source
from .selectors import oof_mode_for, run_config

log = logging.getLogger(__name__)


class TrainingCancelled(Exception):
    """Raised by a run's progress callback when an admin cancelled the run: the engine stops where it is."""


def training_run_create(
    *,
    project: Project,
    user=None,
    config: dict | None = None,
    queue: bool = True,
    dataset_version: DatasetVersion | None = None,
) -> TrainingRun:
    """Check the config, freeze the data (a new dataset version, or the latest when nothing changed) unless
    `dataset_version` is given, then queue the run (after commit). A quick run (config "quick": heads only, on
    cached frozen features) needs pretrained weights; whether they resolve is checked when it runs."""
    resolved = run_config(project, config or {})
    if resolved["quick"] and not (resolved["pretrained"] or resolved["pretrained_path"]):
        raise TrainingError(
            "quick retrain needs a pretrained backbone (its heads train on frozen features): set pretrained = true "
            "or pretrained_path, or run a full fine-tune."
        )
    if resolved.get("tail_from_block") is not None and not (resolved["pretrained"] or resolved["pretrained_path"]):
        raise TrainingError(
            "the tail fine-tune (tail_from_block) needs a pretrained backbone (its first blocks stay frozen): set "
            "pretrained = true or pretrained_path, or tail_from_block = null for a whole-network fine-tune."
        )
    if dataset_version is not None and dataset_version.project_id != project.id:
        raise TrainingError("That dataset version belongs to another project.")
    from .reconcile import jobs_reconcile

    jobs_reconcile(project=project)  # a run lost by a killed worker or a restarted broker no longer blocks
    with transaction.atomic():
        active = project.training_runs.filter(status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING])
        if active.exists():
            note = " (resumed after its worker was lost)" if active.filter(attempts__gt=0).exists() else ""
            raise TrainingError(f"A training run is already queued or running for this project{note}.")
        if dataset_version is None:
            try:
                dataset_version, _created = dataset_version_create(project=project, user=user, note="for a retrain")
            except LabelingError as exc:
                raise TrainingError(str(exc)) from exc
        if not dataset_version.counts.get("splits", {}).get("train"):
            raise TrainingError(
                f"Dataset version {dataset_version.number} has no train images; label more groups first."
            )
        try:
            with transaction.atomic():  # a savepoint: the constraint settles a race the check above lost
                run = TrainingRun.objects.create(
                    project=project, created_by=user, config=config or {}, dataset_version=dataset_version
                )
        except IntegrityError:
            raise TrainingError("A training run is already queued or running for this project.") from None
        if queue:
            rid = run.id
            jobs.send_on_commit(
                "training.tasks.train_run",  # pipeline/tasks.py, by name
                rid,
                kind="train_run",
                pk=rid,
                what=f"training run {rid}",
                undo=lambda: TrainingRun.objects.filter(pk=rid).delete(),
            )
    return run


def _canceller(run: TrainingRun) -> str:
    who = run.cancel_requested_by.get_username() if run.cancel_requested_by_id else "the command line"
    return f"Cancelled by {who}"


def training_run_cancel(*, run: TrainingRun, user=None) -> TrainingRun:
    """Cancel a queued run at once, or ask a running one to stop: its worker stops at its next progress report
    (at most a few seconds of training; the finished epochs' checkpoints stay, so `manage.py train PROJECT --run
    ID` resumes it). TrainingError for a run that already finished."""
    now = timezone.now()
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if run.status == TrainingRun.Status.QUEUED:
            run.status, run.finished_at = TrainingRun.Status.CANCELLED, now
            run.cancel_requested_at, run.cancel_requested_by = now, user
            run.error = f"{_canceller(run)} before it started."
            run.save(update_fields=["status", "finished_at", "cancel_requested_at", "cancel_requested_by", "error"])
        elif run.status == TrainingRun.Status.RUNNING:
            if run.cancel_requested_at is None:
                run.cancel_requested_at, run.cancel_requested_by = now, user
                run.save(update_fields=["cancel_requested_at", "cancel_requested_by"])
        else:
            raise TrainingError(f"Training run {run.id} already {run.status}; there is nothing to cancel.")
    return run


def _mark_cancelled(run_id: int) -> None:
    run = TrainingRun.objects.select_related("cancel_requested_by").get(pk=run_id)
    where = f" at epoch {run.epoch}/{run.epochs}" if run.epochs else ""
    TrainingRun.objects.filter(pk=run_id).update(
        status=TrainingRun.Status.CANCELLED,
        finished_at=timezone.now(),
        error=f"{_canceller(run)}{where}. Its checkpoints are kept: manage.py train {run.project.slug} --run "
        f"{run.id} resumes it.",
    )


def _progress_writer(run_id: int):
    def write(p: dict) -> None:
        fields = {
            "epoch": p.get("epoch", 0),
            "epochs": p.get("epochs", 0),
            "step": p.get("step", 0),
            "steps_per_epoch": p.get("steps_per_epoch", 0),
            "loss": p.get("loss"),
            "eta_s": p.get("eta_s"),
            "heartbeat_at": timezone.now(),
        }
        if p.get("metrics"):
            fields["metrics"] = p["metrics"]
        fields.update(_pretrained_fields(p.get("pretrained")))
        if not TrainingRun.objects.filter(pk=run_id, cancel_requested_at__isnull=True).update(**fields):
            raise TrainingCancelled(run_id)  # an admin cancelled the run: stop here
        if p.get("metrics") and p.get("step") == p.get("steps_per_epoch"):
            run = TrainingRun.objects.only("history").get(pk=run_id)
            run.history = [*run.history, {"epoch": p.get("epoch"), "loss": p.get("loss"), "metrics": p["metrics"]}]
            run.save(update_fields=["history"])

    return write


def _pretrained_fields(weights: dict | None) -> dict:
    """The run's pretrained_source/detail from the engine's {"source", "detail"} ({} when it did not say)."""
    if not weights or "source" not in weights:
        return {}
    return {
        "pretrained_source": normalise_pretrained_source(weights["source"]),
        "pretrained_detail": (weights.get("detail") or "")[:500],
    }


def training_run_reopen(*, project: Project, run_id: int) -> TrainingRun:
    """Make a failed (or stuck) run runnable again; executing it resumes from its latest checkpoint."""
    run = project.training_runs.filter(pk=run_id).first()
    if run is None:
        raise TrainingError(f"Project {project.slug!r} has no training run {run_id}.")
    if run.status == TrainingRun.Status.SUCCEEDED:
        raise TrainingError(f"Run {run_id} already succeeded (model v{run.model_version.number}); start a new run.")
    try:
        with transaction.atomic():
            TrainingRun.objects.filter(pk=run.pk).update(
                status=TrainingRun.Status.QUEUED, error="", finished_at=None, cancel_requested_at=None
            )
    except IntegrityError:
        raise TrainingError("Another training run is queued or running for this project; wait for it.") from None
    run.refresh_from_db()
    return run


def training_run_claim(*, run_id: int) -> TrainingRun | None:
    """Claim the run for this process: queued, or running with a stale heartbeat (its worker is gone). A second
    delivery of the same message (a re-send, or the broker's redelivery after its visibility timeout) finds it
    claimed and gets None, so one run never trains twice at once. A lost run with a cancel request is cancelled."""
    run = TrainingRun.objects.select_related("project", "dataset_version").get(pk=run_id)
    out_dir = Path(settings.ARTIFACT_ROOT) / run.project.slug / f"run-{run.id}"
    stale = timezone.now() - dt.timedelta(seconds=jobs.lost_after_seconds())
    lost = Q(Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True), status=TrainingRun.Status.RUNNING)
    if TrainingRun.objects.filter(lost, pk=run.id, cancel_requested_at__isnull=False).exists():
        _mark_cancelled(run.id)  # cancelled while its worker was gone: not resumed
    claimable = Q(status=TrainingRun.Status.QUEUED) | Q(lost, cancel_requested_at__isnull=True)
    claimed = TrainingRun.objects.filter(claimable, pk=run.id).update(
        status=TrainingRun.Status.RUNNING,
        started_at=Coalesce(F("started_at"), timezone.now()),
        heartbeat_at=timezone.now(),
        artifact_dir=str(out_dir),
        finished_at=None,
    )
    run.refresh_from_db()
    if not claimed:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return run


def _failed(run: TrainingRun, exc: Exception) -> None:
    message = (
        str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
    )
    TrainingRun.objects.filter(pk=run.id).update(
        status=TrainingRun.Status.FAILED, finished_at=timezone.now(), error=message[:5000]
    )


def training_run_train(*, run: TrainingRun, fresh: bool = False) -> tuple[dict, dict] | None:
    """Train a claimed run (the engine: full fine-tune, tail fine-tune or quick retrain) into its artifact folder and
    export ONNX. Returns (manifest, metrics); None when it failed or was cancelled (the row says so). A full
    fine-tune with config "devices" > 1 trains in that many processes under torchrun (training.engine.launch)."""
    from training.engine.launch import train_run

    project = run.project
    out_dir = Path(run.artifact_dir)
    try:
        config = run_config(project, run.config)
        if run.dataset_version_id is None:  # a run queued before dataset versions existed
            version, _ = dataset_version_create(project=project, note="for a retrain")
            TrainingRun.objects.filter(pk=run.id).update(dataset_version=version)
        else:
            version = run.dataset_version
        if config.get("task") == "detection":  # a shelf project: its model is a box detector
            return _train_detector(run, config, version, out_dir, fresh=fresh)
        manifest = version_manifest(
            version=version, per_class_cap=(project.training_options or {}).get("per_class_cap")
        )
        _write_json(out_dir / "manifest.json", manifest)
        n_train = sum(1 for it in manifest["items"] if it["split"] == "train")
        n_val = sum(1 for it in manifest["items"] if it["split"] == "val")
        epochs = config["quick_epochs"] if config["quick"] else config["epochs"]
        TrainingRun.objects.filter(pk=run.id).update(n_train=n_train, n_val=n_val, epochs=epochs)
        # The quick retrain (heads on cached features), or train_model, in one process or in config "devices"
        # processes. Resumes from out_dir/checkpoints/latest.pt when a worker was killed mid-run (same data and
        # config). With a pretrained backbone fully frozen in phase 1, phase 1 trains the heads on cached features.
        metrics = train_run(
            manifest,
            config,
            out_dir,
            progress=_progress_writer(run.id),
            fresh=fresh,
            cache_dir=settings.LOUPE_FEATURE_CACHE,
        )
    except TrainingCancelled:
        log.info("training run %s cancelled", run.id)
        _mark_cancelled(run.id)
        return None
    except Exception as exc:  # noqa: BLE001 - the row must say why, whatever went wrong
        log.exception("training run %s failed", run.id)
        _failed(run, exc)
        return None
    try:
        from training.engine.onnx_export import export_onnx

        onnx = export_onnx(out_dir)  # every head + the embedding, dynamic batch, checked against torch (parity)
        parity = ("max_abs_diff", "max_rel_diff", "top1_agreement", "atol", "rtol")
        metrics["onnx"] = {k: onnx[k] for k in ("exporter", "opset", *parity, "seconds")}
    except Exception as exc:  # noqa: BLE001 - serving falls back to torch; the reason is kept
        log.exception("ONNX export for run %s failed", run.id)
        metrics["onnx"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return manifest, metrics


def _detector_progress(run_id: int):
    """The detector's reports in the shape the run row takes (an epoch's val mAP@50, recall … as its metrics)."""
    write = _progress_writer(run_id)

    def report(p: dict) -> None:
        if p.get("phase") != "epoch":
            write(p)
            return
        val = p.get("val") or {}
        scalars = {k: v for k, v in val.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        write({**p, "step": 1, "steps_per_epoch": 1, "loss": p.get("train_loss"), "metrics": scalars or None})

    return report


def _train_detector(
    run: TrainingRun, config: dict, version: DatasetVersion, out_dir: Path, *, fresh: bool
) -> tuple[dict, dict] | None:
    """A detection project's run: its frozen boxes → training.engine.detection (checkpoints and resume like the
    classifier), evaluated on the test split, exported to ONNX with a parity check. Raises like the engine; the
    caller marks the row."""
    from training.engine.detection import evaluate_detector, export_detector_onnx, train_detector

    manifest = version_detection_manifest(version=version)
    _write_json(out_dir / "manifest.json", manifest)
    n = {s: sum(1 for it in manifest["items"] if it["split"] == s) for s in ("train", "val", "test")}
    if not n["train"] or not manifest["classes"]:
        raise TrainingError(
            f"Dataset v{version.number} has no training photos with boxes: draw boxes (or import YOLO/COCO) first."
        )
    TrainingRun.objects.filter(pk=run.id).update(n_train=n["train"], n_val=n["val"], epochs=config["epochs"])
    engine_config = {k: v for k, v in config.items() if k not in ("task", "quick")}
    metrics = train_detector(manifest, engine_config, out_dir, progress=_detector_progress(run.id), fresh=fresh)
    metrics["task"] = "detection"
    metrics["metrics_on"] = "test" if n["test"] else ("val" if n["val"] else "train")
    if n["test"]:
        metrics["test"] = evaluate_detector(out_dir, manifest, split="test")
    try:
        val_photos = [it["path"] for it in manifest["items"] if it["split"] in ("val", "test")][:2]
        onnx = export_detector_onnx(out_dir, images=val_photos or None)
        metrics["onnx"] = {k: v for k, v in onnx.items() if k != "path"}
    except Exception as exc:  # noqa: BLE001 - serving falls back to torch; the reason is kept
        log.exception("detector ONNX export for run %s failed", run.id)
        metrics["onnx"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return manifest, metrics


def training_run_complete(*, run: TrainingRun, metrics: dict) -> ModelVersion | None:
    """Mark the run succeeded and register its model version (one transaction); None when a cancel was asked for
    meanwhile (the run is cancelled, nothing is registered). A model evaluated on its training photos (no
    validation split) gets a note: it is never promoted without an admin."""
    if TrainingRun.objects.filter(pk=run.id, cancel_requested_at__isnull=False).exists():
        _mark_cancelled(run.id)  # cancelled after the last epoch: no model is registered
        return None
    try:  # a remote store gets the artifacts before the version exists: no process can load a half-published one
        storage.artifact_publish(run.artifact_dir)
    except Exception as exc:  # noqa: BLE001 - the row must say why
        log.exception("publishing the artifacts of run %s failed", run.id)
        _failed(run, OSError(f"The model could not be published to the file store: {exc}"))
        return None
    with transaction.atomic():
        TrainingRun.objects.filter(pk=run.id).update(
            status=TrainingRun.Status.SUCCEEDED,
            finished_at=timezone.now(),
            metrics=metrics.get("heads", {}),
            **_pretrained_fields(
                {"source": metrics.get("pretrained_source"), "detail": metrics.get("pretrained_detail")}
            ),
        )
        version = model_version_register(
            project=run.project, run=run, artifact_dir=Path(run.artifact_dir), metrics=metrics
        )
    if metrics.get("metrics_on") == "train":
        TrainingRun.objects.filter(pk=run.id).update(
            error="Not promoted automatically: the dataset version has no validation photos, so this model was "
            "evaluated on its training photos (train, optimistic). Promote it on the Models page if you accept that."
        )
    return version


def _write_json(path: Path, data) -> None:
    write_json_atomic(path, data)


def model_version_register(
    *, project: Project, run: TrainingRun | None, artifact_dir: Path, metrics: dict
) -> ModelVersion:
    with transaction.atomic():
        # Lock the project row so two concurrent registrations cannot take the same number.
        Project.objects.select_for_update().get(pk=project.pk)
        number = (project.model_versions.aggregate(m=Max("number"))["m"] or 0) + 1
        # A detector has no gallery to index: it is ready to serve as soon as it exists.
        ready = {"index_status": ModelVersion.IndexStatus.READY} if metrics.get("task") == "detection" else {}
        return ModelVersion.objects.create(
            project=project, run=run, number=number, artifact_dir=str(artifact_dir), metrics=metrics, **ready
        )


def head_thresholds_apply(
    *, version: ModelVersion, user=None, confirm: str, heads: list[str] | None = None
) -> dict[str, tuple[float, float]]:
    """Set the project's head thresholds to the version's calibrated suggestions (95 % precision on its
    validation split), as one undoable DatasetAction (the Health page's action list). `confirm` is the token of
    the change the admin confirmed (labeling.health.plan_token of training.selectors.head_thresholds_plan): the
    change is refused unless it is still exactly that one. Returns {head: (old, new)} for the heads changed.
    ValueError when the version was not calibrated or the confirmation is missing or stale."""
    from labeling.health import plan_token
    from labeling.models import DatasetAction

    from .selectors import head_thresholds_plan

    if not version.suggested_thresholds:
        raise ValueError(f"v{version.number} has no calibrated thresholds (its validation split was empty).")
    with transaction.atomic():
        locked = {h.id: h for h in Head.objects.select_for_update().filter(project_id=version.project_id)}
        plan = head_thresholds_plan(version=version, heads=heads)
        if not confirm or confirm != plan_token(plan):
            raise ValueError(
                "Nothing changed: confirm the new thresholds first."
                if not confirm
                else "Nothing changed: the thresholds changed since you confirmed; check the new list."
            )
        if not plan:
            return {}
        text = ", ".join(f"{r['head']} {r['old']:g} → {r['new']:g}" for r in plan)
        DatasetAction.objects.create(
            project_id=version.project_id,
            kind=DatasetAction.Kind.SERVING_THRESHOLDS,
            user=user,
            summary=f"serving thresholds from v{version.number}'s calibration: {text}"[:500],
            params={"version": version.number},
            changes={"thresholds": plan},
        )
        for r in plan:
            head = locked[r["head_id"]]
            head.threshold = r["new"]
            head.save(update_fields=["threshold"])  # post_save drops the cached serving settings
    return {r["head"]: (r["old"], r["new"]) for r in plan}


def model_version_activate(*, version: ModelVersion) -> ModelVersion:
    with transaction.atomic():
        Project.objects.select_for_update().get(pk=version.project_id)
        ModelVersion.objects.filter(project_id=version.project_id, is_active=True).exclude(pk=version.pk).update(
            is_active=False
        )
        ModelVersion.objects.filter(pk=version.pk).update(
            is_active=True, promote_requested=False, promoted_at=timezone.now()
        )
        # The review queues follow the active model: rebuilt on every promote and rollback, never by a run that was
        # not promoted. Each job checks that its version is still the active one when it runs (training.jobs).
        classifier = version.metrics.get("task") != "detection"  # the queues below rank class labels
        if classifier and settings.LOUPE_MISLABEL_AFTER_PROMOTE:  # out-of-fold predictions (reused if computed)
            job_enqueue(
                project=version.project,
                kind=Job.Kind.MISLABEL_REFRESH,
                version=version,
                what="the mislabel queue",
                undo_on_broker_error=False,
            )
        if classifier and settings.LOUPE_UNCERTAIN_AFTER_PROMOTE:  # the new model re-ranks the low-confidence queue
            job_enqueue(
                project=version.project,
                kind=Job.Kind.UNCERTAIN_REFRESH,
                what="the low-confidence queue",
                undo_on_broker_error=False,
            )
    version.refresh_from_db()
    return version


def model_version_oof(*, version: ModelVersion, k: int = 5, mode: str = "auto", progress=None) -> dict:
    """Out-of-fold predicted probabilities for every labeled image of the version's frozen dataset, test split
    included (group-aware K-fold over all of them: the fold models are throwaway, and a wrong test label is what a
    reviewer must find), written to <artifact>/oof/ for the mislabel queue; the summary is kept in the version's
    metrics["oof"]. mode "auto": oof_mode_for(version)."""
    from training.engine.oof import out_of_fold_predictions

    art = storage.artifact_local(version.artifact_dir)
    manifest = storage.manifest_localize(json.loads((art / "manifest.json").read_text()))
    config = json.loads((art / "config.json").read_text())
    started = time.time()
    if mode == "auto":
        mode = oof_mode_for(version)
    try:
        summary = out_of_fold_predictions(
            manifest, config, art / "oof", k=k, mode=mode, cache_dir=settings.LOUPE_FEATURE_CACHE, progress=progress
        )
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    storage.artifact_publish(art, since=started)  # oof/ for the mislabel refresh, wherever it runs
    ModelVersion.objects.filter(pk=version.pk).update(metrics={**version.metrics, "oof": summary})
    return summary
