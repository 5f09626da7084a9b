"""Admin pages for dataset health (scan, report, fixing actions with undo) and dataset versions (list, detail,
diff, export). Thin: they call labeling.health and labeling.versions."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from . import health, selectors, versions
from .access import current_project
from .models import DatasetAction, DuplicateCluster, HealthReport, Image, LabelClass, Project
from .services import LabelingError
from .views import _partial, staff_required

CLUSTERS_PER_PAGE = 20


def _int_or_none(raw: str | None, name: str) -> int | None:
    raw = (raw or "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise LabelingError(f"{name} must be a whole number (got {raw!r}).") from None


def _cluster_rows(clusters: list[DuplicateCluster], project: Project) -> list[dict]:
    ids = {i for c in clusters for i in c.image_ids}
    images = {
        im.id: im
        for im in Image.objects.filter(pk__in=ids, project=project).prefetch_related(
            "labels__label_class", "labels__head"
        )
    }
    rows = []
    for c in clusters:
        members = []
        for i in c.image_ids:
            im = images.get(i)
            if im is None:
                continue
            labels = sorted(im.labels.all(), key=lambda lb: (lb.head.order, lb.head_id))
            members.append({"image": im, "labels": labels})
        rows.append({"cluster": c, "members": members})
    return rows


MAX_BARS = 80


def _with_bars(findings: dict) -> dict:
    """Add chart rows (bar width relative to the largest class) to each head's class distribution."""
    for d in (findings.get("classes") or {}).values():
        counts = d.get("counts") or []
        top = max((n for _name, n in counts), default=0) or 1
        rare = {r["name"] for r in d.get("rare", [])}
        excluded = set(d.get("excluded", []))
        d["bars"] = [
            {
                "name": name,
                "count": n,
                "pct": round(100 * n / top, 1),
                "rare": name in rare,
                "excluded": name in excluded,
            }
            for name, n in counts[:MAX_BARS]
        ]
        d["bars_more"] = max(0, len(counts) - MAX_BARS)
    return findings


@staff_required
def health_page(request, slug):
    project = current_project(request, slug)
    health.health_reports_reconcile(project=project)  # a scan lost by its worker or the broker shows so, at once
    current = selectors.health_report_latest(project)
    # The last finished scan's findings stay on the page while a newer scan waits or runs.
    report = (
        current
        if current and current.status == HealthReport.Status.SUCCEEDED
        else selectors.health_report_last_good(project)
    )
    context = {"project": project, "current": current, "report": report, "polling": bool(current and current.is_active)}
    if report and report.status == HealthReport.Status.SUCCEEDED:
        clusters = report.clusters.select_related("action").order_by("-conflicting", "id")
        page = Paginator(clusters, CLUSTERS_PER_PAGE).get_page(request.GET.get("page"))
        heads = list(project.heads.order_by("order", "id"))
        context.update(
            page=page,
            cluster_rows=_cluster_rows(list(page.object_list), project),
            heads=heads,
            head_classes={
                h.id: list(h.classes.filter(merged_into__isnull=True).order_by("name").values_list("id", "name"))
                for h in heads
            },
            findings=_with_bars(report.findings),
            summary=report.summary,
        )
    context["actions"] = list(project.dataset_actions.select_related("user", "undone_by")[:30])
    context["options"] = {
        "class_weighting": "none",
        "per_class_cap": None,
        "resize": "crop",
        **(project.training_options or {}),
    }
    context["resize_choices"] = health.RESIZE_CHOICES
    context["weighting_choices"] = health.CLASS_WEIGHTING_CHOICES
    if _partial(request):
        response = render(request, "labeling/_health_status.html", context)
        if not context["polling"]:
            response["HX-Refresh"] = "true"  # the scan finished: show the whole report
        return response
    return render(request, "labeling/health.html", context)


@staff_required
@require_POST
def health_scan_start(request, slug):
    project = current_project(request, slug)
    try:
        report = health.health_report_create(
            project=project,
            user=request.user,
            min_side=_int_or_none(request.POST.get("min_side"), "Minimum side"),
            max_distance=_int_or_none(request.POST.get("max_distance"), "Near-duplicate distance"),
            min_samples=_int_or_none(request.POST.get("min_samples"), "Minimum images per class"),
        )
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Health scan {report.id} queued.")
    return redirect("labeling:health", slug=slug)


@staff_required
@require_POST
def cluster_resolve(request, slug, cluster_id):
    project = current_project(request, slug)
    cluster = get_object_or_404(DuplicateCluster, pk=cluster_id, report__project=project)
    mode = request.POST.get("mode", "")
    try:
        labels = {
            key.removeprefix("head_"): value
            for key, value in request.POST.items()
            if key.startswith("head_") and value != "keep"
        }
        action = health.cluster_resolve(
            cluster=cluster,
            mode=mode,
            user=request.user,
            keep_image_id=_int_or_none(request.POST.get("keep"), "The photo to keep"),
            labels=labels,
        )
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Done: {action.summary}.")
    return redirect(reverse("labeling:health", kwargs={"slug": slug}) + "#clusters")


@staff_required
@require_POST
def classes_merge(request, slug):
    project = current_project(request, slug)
    try:
        source_id = _int_or_none(request.POST.get("source"), "source")
        target_id = _int_or_none(request.POST.get("target"), "target")
        if target_id is None and request.POST.get("pair"):
            # a near-identical pair of the report: `source` picks the direction, the other one is the target
            pair = [_int_or_none(p, "pair") for p in request.POST["pair"].split(",")]
            if len(pair) == 2 and source_id in pair and pair[0] != pair[1]:
                target_id = pair[1] if source_id == pair[0] else pair[0]
        source = LabelClass.objects.get(pk=source_id, head__project=project)
        target = LabelClass.objects.get(pk=target_id, head__project=project)
        action = health.classes_merge(source=source, target=target, user=request.user)
    except LabelClass.DoesNotExist:
        messages.error(request, "Choose two classes of this project to merge.")
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Done: {action.summary}. Run the scan again to refresh the report.")
    return redirect("labeling:health", slug=slug)


@staff_required
@require_POST
def classes_exclude(request, slug):
    project = current_project(request, slug)
    try:
        ids = [int(v) for v in request.POST.getlist("class_id")]
        action = health.classes_set_excluded(
            project=project, class_ids=ids, excluded=request.POST.get("excluded", "1") == "1", user=request.user
        )
    except ValueError:
        messages.error(request, "Choose one or more classes.")
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Done: {action.summary}.")
    return redirect("labeling:health", slug=slug)


@staff_required
@require_POST
def training_options(request, slug):
    project = current_project(request, slug)
    try:
        action = health.training_options_set(
            project=project,
            class_weighting=request.POST.get("class_weighting", "none"),
            per_class_cap=_int_or_none(request.POST.get("per_class_cap"), "The per-class cap"),
            resize=request.POST.get("resize") or None,
            user=request.user,
        )
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Training options saved: {action.summary}.")
    return redirect("labeling:health", slug=slug)


@staff_required
@require_POST
def splits_unleak(request, slug):
    project = current_project(request, slug)
    try:
        action = versions.splits_unleak(project=project, user=request.user)
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Done: {action.summary}.")
    return redirect(reverse("labeling:health", kwargs={"slug": slug}) + "#leaky-splits")


@staff_required
@require_POST
def action_undo(request, slug, action_id):
    project = current_project(request, slug)
    action = get_object_or_404(DatasetAction, pk=action_id, project=project)
    try:
        result = health.action_undo(action=action, user=request.user)
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        extra = f" ({result['skipped']} change(s) edited since were left as they are)" if result["skipped"] else ""
        messages.success(request, f"Undone: {action.summary}{extra}.")
    return redirect("labeling:health", slug=slug)


# ------------------------------------------------------------------------------------------- versions
@staff_required
def version_list(request, slug):
    project = current_project(request, slug)
    return render(
        request,
        "labeling/versions.html",
        {"project": project, "versions": list(selectors.dataset_version_list(project)[:100])},
    )


@staff_required
@require_POST
def version_create(request, slug):
    project = current_project(request, slug)
    try:
        version, created = versions.dataset_version_create(
            project=project,
            user=request.user,
            note=request.POST.get("note", ""),
            allow_empty_eval=request.POST.get("allow_empty_eval") == "1",
        )
    except LabelingError as exc:
        messages.error(request, str(exc))
        return redirect("labeling:version-list", slug=slug)
    if created:
        messages.success(request, f"Dataset version {version.number} frozen: {version.counts['images']} images.")
    else:
        messages.info(request, f"Nothing changed since dataset version {version.number} (same content hash).")
    return redirect("labeling:version-detail", slug=slug, number=version.number)


@staff_required
def version_detail(request, slug, number):
    project = current_project(request, slug)
    version = get_object_or_404(project.dataset_versions, number=number)
    others = list(project.dataset_versions.exclude(pk=version.pk).values_list("number", flat=True))
    has_export = versions.export_paths(version)[1].is_file()
    return render(
        request,
        "labeling/version_detail.html",
        {"project": project, "version": version, "others": others, "has_export": has_export},
    )


@staff_required
def version_diff(request, slug, old, new):
    project = current_project(request, slug)
    a = get_object_or_404(project.dataset_versions, number=old)
    b = get_object_or_404(project.dataset_versions, number=new)
    diff = versions.dataset_version_diff(old=a, new=b)
    if request.GET.get("format") == "json":
        return JsonResponse(diff)
    return render(request, "labeling/version_diff.html", {"project": project, "diff": diff, "old": a, "new": b})


@staff_required
@require_POST
def version_export(request, slug, number):
    """Write the version in the seeds' formats under LOUPE_EXPORT_ROOT and zip it for download."""
    project = current_project(request, slug)
    version = get_object_or_404(project.dataset_versions, number=number)
    try:
        versions.dataset_version_archive(version=version)
    except LabelingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Exported to {versions.export_paths(version)[0]}.")
    return redirect("labeling:version-detail", slug=slug, number=number)


@staff_required
def version_download(request, slug, number):
    project = current_project(request, slug)
    version = get_object_or_404(project.dataset_versions, number=number)
    _folder, archive = versions.export_paths(version)
    if not archive.is_file():
        raise Http404("Export this version first.")
    return FileResponse(archive.open("rb"), as_attachment=True, filename=f"{slug}-dataset-v{number}.zip")
