"""The loop's chain, in one place: each step is a function of a row id that calls one service of the app that owns
the data, and the order is declared here.

    training run:  claim -> train (+ ONNX)           training.services
                   -> calibrate -> test report        inference.evaluation
                   -> arms probe                      review.services
                   -> complete + register             training.services
                   -> promote gate -> promote         here (first model: always; later: when no worse)
    promote:       -> index build (queue default)     inference.evaluation, then activate
    activate:      -> switch (one transaction)        training.services.model_version_activate, which queues
                   -> out-of-fold + mislabel queue,   review.tasks.mislabel_refresh (queue gpu), and
                      low-confidence queue            review.tasks.uncertain_refresh (queue gpu)

Tasks (pipeline/tasks.py) keep their registered names (training.tasks.*, review.tasks.*) so messages queued by
an earlier release still run; their queues and time limits are in settings (CELERY_TASK_ROUTES,
LOUPE_TASK_TIME_LIMITS). The lower apps queue these steps by name (webapp.jobs.send), never by import."""

from __future__ import annotations

import json
import logging
import time

from django.conf import settings
from django.db import transaction

from inference import evaluation
from labeling import storage
from review import services as review_services
from training import jobs as job_services
from training import selectors as training_selectors
from training import services as training_services
from training.jobs import job_enqueue
from training.models import Job, ModelVersion, TrainingRun
from training.services import TrainingError, model_version_activate
from webapp import jobs

log = logging.getLogger(__name__)


def training_run_execute(*, run_id: int, inline: bool = False, fresh: bool = False) -> TrainingRun:
    """One training run from the Celery task or `manage.py train`. Idempotent: a finished run is left alone; a
    run left 'running' by a killed worker resumes from its checkpoint. `inline` builds the index of an
    auto-promoted model in this process instead of queueing it."""
    run = training_services.training_run_claim(run_id=run_id)
    if run is None:  # claimed by another delivery, finished or cancelled
        return TrainingRun.objects.get(pk=run_id)
    with jobs.heartbeat(TrainingRun, run.id):
        trained = training_services.training_run_train(run=run, fresh=fresh)
        if trained is None:  # failed or cancelled: the row says why
            run.refresh_from_db()
            return run
        manifest, metrics = trained
        version = _evaluate_and_register(run, manifest, metrics)
    if version is not None:
        _promote_if_due(version, inline=inline)
    run.refresh_from_db()
    return run


def _step(metrics: dict, key: str, what: str, run_id: int, fn) -> None:
    """metrics[key] = fn(); a failure is kept as {"error"}: the model is fine, only this report failed."""
    try:
        metrics[key] = fn()
    except Exception as exc:  # noqa: BLE001
        log.exception("%s for run %s failed", what, run_id)
        metrics[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def _evaluate_and_register(run: TrainingRun, manifest: dict, metrics: dict) -> ModelVersion | None:
    from pathlib import Path  # noqa: PLC0415

    out_dir = Path(run.artifact_dir)
    if metrics.get("task") == "detection":  # the detector's own evaluation ran in the engine (val, test)
        return training_services.training_run_complete(run=run, metrics=metrics)
    _step(metrics, "calibration", "calibration", run.id, lambda: evaluation.calibrate_version(out_dir, manifest))
    _step(metrics, "test", "test-split report", run.id, lambda: evaluation.test_split_report(out_dir, manifest))
    frozen_at = run.dataset_version.created_at
    _step(
        metrics,
        "arms",
        "arms probe",
        run.id,
        lambda: review_services.arms_probe_report(
            out_dir=out_dir, manifest=manifest, project=run.project, frozen_at=frozen_at
        ),
    )
    return training_services.training_run_complete(run=run, metrics=metrics)


def _promote_if_due(version: ModelVersion, *, inline: bool) -> None:
    """The first model of a project is promoted; a later one when it passes the promote gate (and
    LOUPE_AUTO_PROMOTE is "gate"); a model evaluated on its training photos never."""
    if version.metrics.get("metrics_on") == "train":
        return  # its figures are on photos it trained on: an admin decides
    active = ModelVersion.objects.filter(project_id=version.project_id, is_active=True).exclude(pk=version.pk).first()
    if active is None:
        model_version_promote(version=version, user=None, inline=inline)
        return
    if version.metrics.get("task") == "detection":  # no shared test split to compare detectors on yet
        reason = f"a new detector (v{version.number}) is promoted by an admin (Models page), after checking its mAP"
        version.refresh_from_db()
        ModelVersion.objects.filter(pk=version.pk).update(
            metrics={**version.metrics, "gate": {"passed": False, "reason": reason}}
        )
        return
    gate = promote_gate(version=version, active=active)
    version.refresh_from_db()
    ModelVersion.objects.filter(pk=version.pk).update(metrics={**version.metrics, "gate": gate})
    if gate["passed"] and settings.LOUPE_AUTO_PROMOTE == "gate":
        model_version_promote(version=version, user=None, inline=inline, confirm_drop=True)


class PromoteNeedsConfirmation(TrainingError):
    """Promoting this version would serve a model that is worse than the active one on the same test split."""

    def __init__(self, gate: dict):
        self.gate = gate
        super().__init__(f"{gate['reason']}. Promote it anyway only if you accept that drop (confirm it).")


def _mean_top1(heads: dict) -> float | None:
    values = [m["top1"] for m in heads.values() if m and m.get("top1") is not None]
    return sum(values) / len(values) if values else None


def promote_gate(*, version: ModelVersion, active: ModelVersion) -> dict:
    """DESIGN step 4: is `version` no worse than the `active` one on the primary metric (mean top-1 over the
    heads) of the same frozen test split (the newer version's; model_versions_compare)? Returns {"against",
    "passed", "new", "active", "drop", "n_test", "split_of", "reason"}; "passed" is False when they cannot be
    compared (no test split), with the reason. Tolerance: LOUPE_PROMOTE_TOLERANCE (top-1, default 0)."""
    out = {"against": active.number, "passed": False, "new": None, "active": None, "drop": None}
    try:
        cmp = evaluation.model_versions_compare(a=active, b=version)
    except (ValueError, OSError) as exc:
        out["reason"] = f"v{version.number} could not be compared with active v{active.number}: {exc}"
        return out
    new = _mean_top1(cmp["versions"][str(version.number)])
    old = _mean_top1(cmp["versions"][str(active.number)])
    out.update(split_of=cmp["test_split_of"], n_test=cmp["n_test"], new=new, active=old)
    where = f"v{cmp['test_split_of']}'s frozen test split ({cmp['n_test']} photos)"
    if new is None or old is None:
        out["reason"] = (
            f"v{version.number} could not be compared with active v{active.number}: no labeled photo in {where}"
        )
        return out
    out["drop"] = round(old - new, 4)
    out["passed"] = new >= old - float(settings.LOUPE_PROMOTE_TOLERANCE)
    verdict = "no worse" if new >= old else f"{(old - new) * 100:.1f} points of mean top-1 worse"
    out["reason"] = (
        f"v{version.number} scores {new:.3f} mean top-1 on {where} against {old:.3f} for active v{active.number}: "
        f"{verdict}"
    )
    return out


def model_version_promote(
    *, version: ModelVersion, user=None, inline: bool = False, confirm_drop: bool = False
) -> ModelVersion:
    """Ask for `version` to become active: the index is built first (Celery, queue default), then the switch
    is one transaction. Promoting a version whose index is ready switches at once (rollback). A version that is
    worse than the active one on the same frozen test split (promote_gate) is refused with
    PromoteNeedsConfirmation, naming the drop, unless `confirm_drop`."""
    if not confirm_drop and not version.is_active:
        active = ModelVersion.objects.filter(project_id=version.project_id, is_active=True).exclude(pk=version.pk)
        active = active.first()
        if active is not None and version.metrics.get("task") != "detection":  # detectors: the admin's call
            gate = promote_gate(version=version, active=active)
            if not gate["passed"] and gate["drop"] is not None:
                raise PromoteNeedsConfirmation(gate)
    with transaction.atomic():
        version = ModelVersion.objects.select_for_update().get(pk=version.pk)
        before = {f: getattr(version, f) for f in ("promote_requested", "promoted_by", "index_status", "index_error")}
        version.promote_requested = True
        version.promoted_by = user
        if version.index_status == ModelVersion.IndexStatus.READY:
            version.save(update_fields=["promote_requested", "promoted_by"])
            return model_version_activate(version=version)
        version.index_status = ModelVersion.IndexStatus.BUILDING
        version.index_error = ""
        version.save(update_fields=["promote_requested", "promoted_by", "index_status", "index_error"])
        vid = version.id
        if not inline:
            job_enqueue(
                project=version.project,
                kind=Job.Kind.INDEX_BUILD,
                version=version,
                user=user,
                what=f"the promote of v{version.number} (its index build)",
                undo=lambda: ModelVersion.objects.filter(pk=vid).update(**before),
            )
    if inline:
        return model_version_index_build(version_id=vid)
    return version


def model_version_index_build(*, version_id: int) -> ModelVersion:
    """Embed the run's train split and write the Faiss index into the artifact folder (atomically), then
    activate the version if a promote was requested. Idempotent."""
    version = evaluation.index_build(ModelVersion.objects.get(pk=version_id))
    if version.index_status == ModelVersion.IndexStatus.READY and version.promote_requested:
        version = model_version_activate(version=version)
    return version


def mislabel_refresh(*, version_id: int, k: int = 5, mode: str = "auto", report=None) -> dict:
    """Out-of-fold predictions of the version's frozen dataset (heads on cached frozen features when the backbone
    is pretrained, else K fresh models: GPU work; reused when the version already has them, e.g. a rollback), then
    the project's mislabel queue from them. Queued when a version becomes active (LOUPE_MISLABEL_AFTER_PROMOTE) or
    by an admin; a version that is no longer the active one when the step runs leaves the queue alone."""
    version = ModelVersion.objects.get(pk=version_id)
    if not version.is_active:
        return {"skipped": f"v{version.number} is not the active version"}
    report = report or (lambda **_: None)
    if not training_selectors.model_version_has_oof(version=version, k=k):
        report(step="out-of-fold predictions", done=0, total=k)
        training_services.model_version_oof(
            version=version, k=k, mode=mode, progress=lambda p: report(done=p.get("fold"), total=p.get("folds"))
        )
    report(step="ranking label issues (cleanlab)")
    version.refresh_from_db()
    if not version.is_active:  # promoted away while the fold models trained
        return {"skipped": f"v{version.number} is not the active version"}
    return review_services.mislabel_refresh(version=version)


# ------------------------------------------------------------------------------------------------- job rows
def _index_build_step(job: Job, report) -> dict:
    report(step="embedding the gallery and building the index")
    version = model_version_index_build(version_id=job.version_id)
    if version.index_status == ModelVersion.IndexStatus.FAILED:
        raise training_services.TrainingError(version.index_error or "the index build failed")
    return {"index_size": version.index_size, "activated": version.is_active}


def _oof_step(job: Job, report) -> dict:
    k = int(job.params.get("k", 5))
    report(step="out-of-fold predictions", done=0, total=k)
    return training_services.model_version_oof(
        version=job.version,
        k=k,
        mode=job.params.get("mode", "auto"),
        progress=lambda p: report(done=p.get("fold"), total=p.get("folds")),
    )


def _mislabel_step(job: Job, report) -> dict:
    active = ModelVersion.objects.filter(project_id=job.project_id, is_active=True).first()
    version_id = job.version_id or (active.id if active else None)
    if version_id is None:
        return {"skipped": "no active model"}
    params = job.params
    return mislabel_refresh(
        version_id=version_id, k=int(params.get("k", 5)), mode=params.get("mode", "auto"), report=report
    )


def _uncertain_step(job: Job, report) -> dict:
    return review_services.uncertain_refresh(project=job.project, report=report)


def _mobile_export_step(job: Job, report) -> dict:
    """model.tflite (+ model_tflite.json) in the version's artifact folder, checked with the LiteRT runtime
    (training.engine.mobile runs the converter in its own environment), then published to the store."""
    from training.engine.mobile import mobile_export  # noqa: PLC0415

    version = job.version
    art = storage.artifact_local(version.artifact_dir)
    report(step="converting to TFLite and checking it with LiteRT")
    t0 = time.time()
    limit = float(settings.LOUPE_TASK_TIME_LIMITS["pipeline.job.mobile_export"]) - 60
    result = mobile_export(art, timeout=limit, images=_detector_check_photos(version, art))
    storage.artifact_publish(art, since=t0)
    return {k: result.get(k) for k in ("reference", "max_abs_diff", "photos_checked", "size_bytes", "seconds")}


def _detector_check_photos(version: ModelVersion, art, n: int = 3) -> list[str] | None:
    """A detector's export is checked on a few of its own photos (val first, from the run's manifest.json, read
    through the store); None for a classifier, or when none can be read (the check then uses random images)."""
    if (version.metrics or {}).get("task") != "detection":
        return None
    try:
        items = json.loads((art / "manifest.json").read_text())["items"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    order = {"val": 0, "test": 1, "train": 2}
    items = sorted((it for it in items if it.get("file")), key=lambda it: order.get(it.get("split"), 3))[:n]
    paths = [p for p in storage.local_paths([it["file"] for it in items]) if p]
    return [str(p) for p in paths] or None


def model_version_mobile_export(*, version: ModelVersion, user=None) -> Job:
    """Queue the TFLite export of a version: the classifier's model.tflite, or the detector's detector.tflite (a job
    on the default queue; the one already waiting or running for this version otherwise). TrainingError for a
    version without artifacts."""
    if not version.artifact_dir:
        raise TrainingError(f"Model v{version.number} has no artifact folder to export.")
    with transaction.atomic():
        return job_services.job_enqueue(
            project=version.project,
            kind=Job.Kind.MOBILE_EXPORT,
            version=version,
            user=user,
            what=f"the TFLite export of v{version.number}",
        )


JOB_STEPS = {
    Job.Kind.INDEX_BUILD: _index_build_step,
    Job.Kind.MOBILE_EXPORT: _mobile_export_step,
    Job.Kind.OOF: _oof_step,
    Job.Kind.MISLABEL_REFRESH: _mislabel_step,
    Job.Kind.UNCERTAIN_REFRESH: _uncertain_step,
}


def job_execute(*, job_id: int) -> Job:
    """Run one job row (the Celery task of its kind, or the command line). Idempotent: a job another delivery
    holds, an ended or cancelled one is left alone; one left running by a lost worker starts its step again (each
    step is idempotent: an index is rewritten atomically, out-of-fold predictions already on disk are reused, a
    queue refresh replaces the queue). Asked for again while it ran, it queues one more when it ends."""
    job = job_services.job_claim(job_id=job_id)
    if job is None:
        return Job.objects.get(pk=job_id)
    report = job_services.job_report(job.id)
    try:
        with jobs.heartbeat(Job, job.id):
            result = JOB_STEPS[job.kind](job, report)
    except jobs.JobCancelled:
        job = job_services.job_mark_cancelled(job_id=job.id)
    except Exception as exc:  # noqa: BLE001 - the row says why; the worker goes on with the next job
        log.exception("%s failed", job)
        if job.kind == Job.Kind.INDEX_BUILD:
            ModelVersion.objects.filter(pk=job.version_id, index_status=ModelVersion.IndexStatus.BUILDING).update(
                index_status=ModelVersion.IndexStatus.FAILED, index_error=f"{type(exc).__name__}: {exc}"[:5000]
            )
        job = job_services.job_fail(job_id=job.id, error=f"{type(exc).__name__}: {exc}")
    else:
        job = job_services.job_finish(job_id=job.id, result=result or {})
    if job.rerun_requested and job.kind not in job_services.PER_VERSION:
        Job.objects.filter(pk=job.id).update(rerun_requested=False)
        with transaction.atomic():
            job_services.job_enqueue(
                project=job.project,
                kind=job.kind,
                version=ModelVersion.objects.filter(project_id=job.project_id, is_active=True).first()
                if job.version_id
                else None,
                params=job.params,
                what=f"the next {job.get_kind_display()}",
                undo_on_broker_error=False,
            )
    return job
