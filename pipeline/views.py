"""Training runs and model versions pages (admins); live progress by htmx polling."""

import json

from django.contrib import messages
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from labeling.access import current_project
from labeling.views import _partial, staff_required
from training import selectors, services
from training.jobs import JobError
from training.models import Job, ModelVersion
from training.reconcile import jobs_reconcile

from . import chain
from . import jobs as pipeline_jobs

# Retrain form fields: name -> type. Any engine config key can be set from `manage.py train --set`.
RETRAIN_FIELDS = {"epochs": int, "backbone": str, "image_size": int, "batch_size": int, "lr": float}


def parse_more_options(text: str) -> dict:
    """Any engine option from the Retrain form: one `key = value` per line, values in JSON (strings may be bare),
    e.g. `head_type = arcface` or `early_stopping = {"metric": "val_loss", "patience": 5}`."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ValueError(f"More options, line {n}: expected key = value, e.g. scheduler = cosine_restarts")
        key, raw = (part.strip() for part in line.split("=", 1))
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            if raw[:1] in "[{":
                raise ValueError(f"More options, line {n}: {raw!r} is not valid JSON") from None
            out[key] = raw
    return out


@staff_required
def run_list(request, slug):
    project = current_project(request, slug)
    jobs_reconcile(project=project)  # a run whose worker was lost shows so (and is resumed) without waiting for beat
    runs = list(project.training_runs.select_related("created_by", "model_version")[:50])
    context = {
        "project": project,
        "runs": runs,
        "polling": any(r.is_active for r in runs),
        "fields": RETRAIN_FIELDS,
        "preset": selectors.preset_config(project.preset),
    }
    if not _partial(request):  # the recipe the Retrain button would run (reads the disk: not on every poll)
        context["recipe"] = selectors.training_recipe(project=project)
    template = "training/_runs.html" if _partial(request) else "training/runs.html"
    return render(request, template, context)


@staff_required
@require_POST
def run_create(request, slug):
    project = current_project(request, slug)
    config = {}
    for name, kind in RETRAIN_FIELDS.items():
        raw = request.POST.get(name, "").strip()
        if raw:
            try:
                config[name] = kind(raw)
            except ValueError:
                expected = {int: "an integer", float: "a number"}.get(kind, "text")
                messages.error(request, f"{name} must be {expected} (got {raw!r}).")
                return redirect("training:run-list", slug=slug)
    if request.POST.get("quick"):
        config["quick"] = True
    try:
        config.update(parse_more_options(request.POST.get("more", "")))
    except ValueError as exc:
        messages.error(request, str(exc))
        return redirect("training:run-list", slug=slug)
    try:
        run = services.training_run_create(project=project, user=request.user, config=config)
    except services.TrainingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Training run {run.id} queued.")
    return redirect("training:run-list", slug=slug)


@staff_required
def version_list(request, slug):
    project = current_project(request, slug)
    versions = list(project.model_versions.select_related("run", "promoted_by"))
    polling = any(v.index_status == ModelVersion.IndexStatus.BUILDING for v in versions)
    builds = {j.version_id: j for j in Job.objects.filter(project=project, kind=Job.Kind.INDEX_BUILD).order_by("id")}
    for v in versions:  # "promoting…" says which job, where it stands, and why it failed
        v.index_job = builds.get(v.id) if v.promote_requested or v.index_status == "failed" else None
    heads = list(project.heads.all())
    current = {h.name: h.threshold for h in heads}
    for v in versions:
        temps = ((v.metrics or {}).get("calibration") or {}).get("temperature") or {}
        v.cal_rows = [
            {"head": h, "temperature": temps.get(h, 1.0), "suggested": t, "current": current.get(h)}
            for h, t in v.suggested_thresholds.items()
        ]
    context = {"project": project, "versions": versions, "polling": polling, "heads": heads}
    template = "training/_versions.html" if _partial(request) else "training/versions.html"
    return render(request, template, context)


@staff_required
def version_detail(request, slug, number):
    """The model page: what a version scores on val and test, per class, where it errs, how well it is
    calibrated, how it was trained, and its files."""
    project = current_project(request, slug)
    version = get_object_or_404(
        ModelVersion.objects.select_related("run__dataset_version", "promoted_by"), project=project, number=number
    )
    context = {"project": project, "version": version, **selectors.model_version_evaluation(version=version)}
    return render(request, "training/version_detail.html", context)


@staff_required
def version_file(request, slug, number, name):
    """One of a version's artifact files, by allow-listed name only (selectors.model_version_file_names)."""
    project = current_project(request, slug)
    version = get_object_or_404(ModelVersion, project=project, number=number)
    found = selectors.model_version_file(version=version, name=name)
    if found is None:
        raise Http404("No such file.")
    path, content_type, attachment = found
    filename = f"{project.slug}-v{version.number}-{name}" if attachment else name
    return FileResponse(path.open("rb"), content_type=content_type, as_attachment=attachment, filename=filename)


@staff_required
def version_compare(request, slug):
    """Two versions side by side on the newer one's frozen test split (top-1/top-5 per head)."""
    project = current_project(request, slug)
    versions = list(project.model_versions.order_by("-number"))
    context = {"project": project, "versions": versions, "a": None, "b": None, "rows": [], "result": None}
    a_raw, b_raw = request.GET.get("a"), request.GET.get("b")
    if a_raw and b_raw:
        by_number = {str(v.number): v for v in versions}
        a, b = by_number.get(a_raw), by_number.get(b_raw)
        if a is None or b is None:
            messages.error(request, f"No version {a_raw if a is None else b_raw} in this project.")
        elif a == b:
            messages.error(request, "Pick two different versions.")
        else:
            try:
                result = chain.evaluation.model_versions_compare(a=a, b=b)
            except ValueError as exc:
                messages.error(request, str(exc))
            else:
                ra, rb = result["versions"][str(a.number)], result["versions"][str(b.number)]
                context["rows"] = [
                    {
                        "head": h,
                        "a": ra[h],
                        "b": rb.get(h),
                        "delta": f"{rb[h]['top1'] - ra[h]['top1']:+.3f}"
                        if h in rb and rb[h]["top1"] is not None and ra[h]["top1"] is not None
                        else None,
                    }
                    for h in ra
                ]
                context |= {"a": a, "b": b, "result": result}
    return render(request, "training/compare.html", context)


@staff_required
def version_thresholds_apply(request, slug, number):
    """ "Use suggested thresholds": GET shows what would change (head: now -> suggested) with a confirm button;
    the POST applies it only with that page's confirmation token, as an undoable action."""
    from labeling.health import plan_token  # noqa: PLC0415
    from training.selectors import head_thresholds_plan  # noqa: PLC0415

    project = current_project(request, slug)
    version = get_object_or_404(ModelVersion, project=project, number=number)
    status = 200
    if request.method == "POST":
        try:
            changed = services.head_thresholds_apply(
                version=version, user=request.user, confirm=request.POST.get("confirm", "")
            )
        except ValueError as exc:
            messages.error(request, str(exc))
            status = 400
        else:
            if changed:
                text = ", ".join(f"{h} {old:g} → {new:g}" for h, (old, new) in changed.items())
                messages.success(
                    request,
                    f"Thresholds set from v{version.number}'s calibration: {text}. "
                    "Undo it from the Health page's action list.",
                )
            else:
                messages.info(request, f"The thresholds already are v{version.number}'s calibrated ones.")
            return redirect("training:version-list", slug=slug)
    plan = head_thresholds_plan(version=version)
    context = {"project": project, "version": version, "plan": plan, "token": plan_token(plan)}
    return render(request, "training/thresholds_confirm.html", context, status=status)


@staff_required
@require_POST
def version_promote(request, slug, number):
    project = current_project(request, slug)
    version = get_object_or_404(ModelVersion, project=project, number=number)
    try:
        version = chain.model_version_promote(
            version=version, user=request.user, confirm_drop=request.POST.get("confirm_drop") == "1"
        )
    except chain.PromoteNeedsConfirmation as exc:  # worse than the active one on the same test split: ask
        context = {"project": project, "version": version, "gate": exc.gate}
        return render(request, "training/promote_confirm.html", context, status=409)
    if version.is_active:
        messages.success(request, f"Model v{version.number} is now active.")
    else:
        messages.success(request, f"Building the index for v{version.number}; it becomes active when done.")
    return redirect("training:version-list", slug=slug)


@staff_required
@require_POST
def version_mobile_export(request, slug, number):
    project = current_project(request, slug)
    version = get_object_or_404(ModelVersion, project=project, number=number)
    try:
        chain.model_version_mobile_export(version=version, user=request.user)
    except services.TrainingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Exporting v{version.number} to TFLite on the worker; model.tflite appears here.")
    return redirect("training:version-detail", slug=slug, number=number)


@staff_required
@require_POST
def run_cancel(request, slug, run_id):
    project = current_project(request, slug)
    run = get_object_or_404(project.training_runs, pk=run_id)
    try:
        run = services.training_run_cancel(run=run, user=request.user)
    except services.TrainingError as exc:
        messages.error(request, str(exc))
    else:
        if run.status == run.Status.CANCELLED:
            messages.success(request, f"Training run {run.id} cancelled.")
        else:
            messages.success(request, f"Training run {run.id} stops at its next progress report.")
    return redirect("training:run-list", slug=slug)


@staff_required
def job_list(request, slug):
    """Every background job of the project: what waits, what runs (step, progress, ETA, jobs ahead on its queue),
    what ended and why; cancel buttons."""
    project = current_project(request, slug)
    jobs_reconcile(project=project)
    rows = pipeline_jobs.project_jobs(project=project)
    context = {"project": project, "rows": rows, "polling": any(r["status"] in ("queued", "running") for r in rows)}
    return render(request, "training/_jobs.html" if _partial(request) else "training/jobs.html", context)


@staff_required
@require_POST
def job_cancel(request, slug, type_, pk):
    project = current_project(request, slug)
    try:
        row = pipeline_jobs.job_cancel_any(project=project, type_=type_, pk=pk, user=request.user)
    except pipeline_jobs.JobNotFound as exc:
        raise Http404(str(exc)) from None
    except JobError as exc:
        messages.error(request, str(exc))
    else:
        done = row.status == "cancelled"
        messages.success(request, f"{row.what.capitalize()} {row.pk} {'cancelled' if done else 'is stopping'}.")
    back = request.POST.get("next", "")
    return redirect(back if back.startswith(f"/p/{project.slug}/") else "training:job-list", slug=slug)
