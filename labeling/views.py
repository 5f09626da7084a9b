"""Server-rendered labeling pages (Django templates + htmx). Views are thin: they call services/selectors."""

from functools import wraps
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from . import importers, selectors, services, storage, upload_views
from .access import current_project
from .forms import ImportForm, ProjectForm
from .models import BoxEvent, Head, Image, ImageEvent, Label, LabelEvent
from .presets import PRESETS

PAGE_SIZE = 100


def staff_required(view):
    """Admins only: site admins, or on a project's pages (a `slug` argument) that project's admin members
    (request.project_role, set by labeling.access.ProjectAccessMiddleware). Reviewers get 403."""

    @wraps(view)
    @login_required
    def wrapper(request, *args, **kwargs):
        role = getattr(request, "project_role", None) if "slug" in kwargs else None
        if not (request.user.is_staff or role == "admin"):
            raise PermissionDenied("Only admins can do this.")  # the styled templates/403.html
        return view(request, *args, **kwargs)

    return wrapper


def _partial(request) -> bool:
    return request.headers.get("HX-Request") == "true" and request.headers.get("HX-Boosted") != "true"


def _preset_heads(preset: str) -> list[dict]:
    return [{"parent": None, **h} for h in PRESETS.get(preset, [])]


@login_required
def project_list(request):
    form = ProjectForm(request.POST or None)
    if request.method == "POST":
        if not request.user.is_staff:
            raise PermissionDenied("Only admins can create projects.")
        if form.is_valid():
            data = form.cleaned_data
            try:
                heads = services.parse_heads(data["heads"]) if data["heads"].strip() else None
                classes = services.parse_classes(data["classes"], heads or _preset_heads(data["preset"]))
                project = services.project_create(
                    name=data["name"], preset=data["preset"], heads=heads, classes=classes
                )
            except services.LabelingError as exc:
                form.add_error(None, str(exc))
            else:
                return redirect("labeling:image-grid", slug=project.slug)
    projects = selectors.project_list_with_counts(request.user)
    return render(request, "labeling/project_list.html", {"projects": projects, "form": form})


GRID_FILTERS = ("head", "class", "unlabeled", "split", "source", "status", "flagged", "disagrees", "sort")


@login_required
def image_grid(request, slug):
    review_selectors = selectors.grid_hooks  # review's filters and sorts (installed by ReviewConfig.ready)
    project = current_project(request, slug)
    heads = list(project.heads.prefetch_related("classes"))
    get = request.GET
    head = next((h for h in heads if str(h.id) == get.get("head")), None)
    class_id = get.get("class")
    class_id = int(class_id) if class_id and class_id.isdigit() else None
    f = {
        "unlabeled": get.get("unlabeled") == "1",
        "split": get.get("split") if get.get("split") in ("train", "val", "test") else "",
        "source": get.get("source") if get.get("source") in Image.Source.values else "",
        "status": get.get("status") if get.get("status") in Image.Status.values else "",
        "flagged": get.get("flagged") == "1",
        "disagrees": get.get("disagrees") == "1",
        "sort": get.get("sort") if get.get("sort") in review_selectors.SORTS else "id",
    }
    qs = selectors.image_list(
        project=project,
        head=head,
        class_id=class_id,
        unlabeled=f["unlabeled"],
        split=f["split"] or None,
        source=f["source"] or None,
        status=f["status"] or None,
    )
    qs = review_selectors.filter_images(qs, flagged=f["flagged"], disagrees=f["disagrees"])
    qs = review_selectors.sort_images(qs, f["sort"])
    page = Paginator(qs, PAGE_SIZE).get_page(get.get("page"))
    labels = selectors.labels_by_image([im.id for im in page])
    tiles = [
        {
            "image": im,
            "labels": [(h.name, labels.get(im.id, {}).get(h.id)) for h in heads],
            "selected_label": labels.get(im.id, {}).get(head.id) if head else None,
        }
        for im in page
    ]
    query = get.copy()
    query.pop("page", None)
    context = {
        "project": project,
        "heads": heads,
        "head": head,
        "class_id": class_id,
        "unlabeled": f["unlabeled"],
        "f": f,
        "sorts": review_selectors.SORTS,
        "sort_note": review_selectors.sort_note(project, f["sort"]),
        "sources": Image.Source.values,
        "statuses": Image.Status.values,
        "page": page,
        "tiles": tiles,
        "query": query.urlencode(),
    }
    template = "labeling/_grid.html" if _partial(request) else "labeling/image_grid.html"
    return render(request, template, context)


@login_required
@require_POST
def labels_bulk_relabel(request, slug):
    """Multi-select on the grid: set one head's label of the selected images (one undoable action). The grid's
    button shows a confirm page naming the images and the new class; only its "confirm" post changes labels."""
    from . import health  # noqa: PLC0415

    project = current_project(request, slug)
    head = get_object_or_404(Head, project=project, pk=request.POST.get("head") or 0)
    raw_class = request.POST.get("label_class", "")
    expected: dict[int, int] = {}
    for item in request.POST.getlist("item"):
        image_id, _, version = item.partition(":")
        if image_id.isdigit() and version.isdigit():
            expected[int(image_id)] = int(version)
    back = request.POST.get("next") or reverse("labeling:image-grid", args=[slug])
    if not url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}):
        back = reverse("labeling:image-grid", args=[slug])
    if not expected:
        messages.error(request, "Select at least one image.")
        return redirect(back)
    if raw_class != "none" and not raw_class.isdigit():  # no default target: clearing the labels is a choice too
        messages.error(request, "Choose the new class (or “unlabeled” to clear the labels).")
        return redirect(back)
    class_id = int(raw_class) if raw_class.isdigit() else None
    target = head.classes.filter(pk=class_id, merged_into__isnull=True).first() if class_id else None
    if class_id and target is None:
        messages.error(request, "Pick a class from the list.")
        return redirect(back)
    if request.POST.get("confirm") != "1":
        labels = list(
            Label.objects.filter(head=head, image_id__in=list(expected))
            .select_related("image", "label_class")
            .order_by("image_id")
        )
        context = {
            "project": project,
            "head": head,
            "target": target,
            "raw_class": raw_class,
            "items": request.POST.getlist("item"),
            "back": back,
            "labels": labels[:60],
            "n": len(expected),
            "n_change": sum(1 for lb in labels if lb.label_class_id != class_id),
        }
        return render(request, "labeling/bulk_relabel_confirm.html", context)
    try:
        out = health.labels_bulk_set(head=head, class_id=class_id, expected=expected, user=request.user)
    except services.LabelingError as exc:
        messages.error(request, str(exc))
        return redirect(back)
    if out["changed"]:
        messages.success(request, f"{out['action'].summary}. Undo it from the Health page's action list.")
    else:
        messages.info(request, "No label changed.")
    if out["stale"]:
        messages.error(
            request,
            f"{len(out['stale'])} image(s) were changed by someone else since you loaded the page and were left "
            f"as they are now: {', '.join(map(str, out['stale'][:20]))}.",
        )
    return redirect(back)


def _editor_context(image: Image, label: Label, *, message: str = "", conflict: Label | None = None) -> dict:
    return {
        "image": image,
        "label": label,
        "classes": label.head.classes.filter(merged_into__isnull=True).order_by("name").only("id", "name", "parent_id"),
        "message": message,
        "conflict": conflict,
    }


@login_required
def image_detail(request, slug, pk):
    project = current_project(request, slug)
    image = get_object_or_404(Image, project=project, pk=pk)
    services.image_labels_ensure(image=image)
    labels = selectors.image_labels(image=image)
    editors = [_editor_context(image, lb) for lb in labels]
    label_events = LabelEvent.objects.filter(image=image).select_related("head", "old_class", "new_class", "user")[:50]
    status_events = ImageEvent.objects.filter(image=image).select_related("user")[:50]
    box_events = BoxEvent.objects.filter(box_set__image=image).select_related("box_set__head", "user")[:50]
    events = sorted([*label_events, *status_events, *box_events], key=lambda e: (e.created_at, e.id), reverse=True)[:50]
    siblings = Image.objects.filter(project=project)
    prev_id = siblings.filter(id__lt=image.id).order_by("-id").values_list("id", flat=True).first()
    next_id = siblings.filter(id__gt=image.id).order_by("id").values_list("id", flat=True).first()
    # Detection heads get the box editor (static/loupe/box_editor.js); it reads and saves the set over REST.
    box_heads = project.heads.filter(kind=Head.Kind.DETECTION).order_by("order", "id").prefetch_related("classes")
    box_editors = [
        {"head": h, "classes": sorted((c for c in h.classes.all() if c.merged_into_id is None), key=lambda c: c.id)}
        for h in box_heads
    ]
    return render(
        request,
        "labeling/image_detail.html",
        {
            "project": project,
            "image": image,
            "editors": editors,
            "box_editors": box_editors,
            "events": events,
            "prev_id": prev_id,
            "next_id": next_id,
        },
    )


@login_required
@require_POST
def label_update(request, slug, pk, head_id):
    project = current_project(request, slug)
    image = get_object_or_404(Image, project=project, pk=pk)
    head = get_object_or_404(Head, project=project, pk=head_id)
    label = get_object_or_404(Label.objects.select_related("head", "label_class"), image=image, head=head)
    raw_class = request.POST.get("label_class", "")
    raw_version = request.POST.get("version", "")
    status = 200
    if not raw_version.isdigit() or (raw_class and not raw_class.isdigit()):
        ctx = _editor_context(image, label, message="The form was incomplete; reload the page and try again.")
        status = 400
    else:
        try:
            change = services.label_set(
                label_id=label.id,
                class_id=int(raw_class) if raw_class else None,
                expected_version=int(raw_version),
                user=request.user,
                reason="edit",
            )
            ctx = _editor_context(image, change.label, message="Saved." if change.changed else "No change.")
        except services.LabelConflict as exc:
            current = exc.current
            ctx = _editor_context(image, current, conflict=current)
            status = 409
        except services.LabelingError as exc:
            ctx = _editor_context(image, label, message=str(exc))
            status = 400
    if _partial(request):
        ctx["can_create"] = request.user.is_staff or getattr(request, "project_role", None) == "admin"
        return render(request, "labeling/_label_editor.html", ctx, status=status)
    if ctx.get("conflict"):
        messages.error(request, f"{head.name}: changed by someone else meanwhile; current value kept.")
    elif status == 400:
        messages.error(request, ctx["message"])
    return redirect("labeling:image-detail", slug=slug, pk=pk)


@login_required
def image_file(request, slug, pk, kind):
    image = get_object_or_404(Image, project__slug=slug, pk=pk)
    name = image.thumbnail if kind == "thumb" else image.file
    if kind not in ("thumb", "full") or not name:
        raise Http404("No such file.")
    try:  # a remote store: through this process's read-through cache (content-addressed, so never stale)
        fh = open(storage.local_path(name), "rb")  # noqa: SIM115 - FileResponse closes it
    except FileNotFoundError:
        raise Http404("No such file.") from None
    content_type = "image/jpeg" if kind == "thumb" else None
    response = FileResponse(fh, content_type=content_type)
    response["Cache-Control"] = "private, max-age=86400, immutable"  # content-addressed
    return response


@staff_required
def import_page(request, slug):
    project = current_project(request, slug)
    form = ImportForm(request.POST or None, project=project)
    report = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        roots = settings.IMPORT_ROOTS
        if data["background"]:
            return _import_in_background(request, project, data, form)
        try:
            if data["mode"] == "folder":
                head = data["head"] or project.heads.first()
                rows, report = importers.plan_folder(Path(data["folder"]), head=head, allowed_roots=roots)
            elif data["mode"] == "placeholder":
                rows, report = importers.plan_placeholder(Path(data["folder"]), allowed_roots=roots)
            elif data["mode"] == "export":
                rows, report = importers.plan_export(Path(data["folder"]), project=project, allowed_roots=roots)
            else:
                csv_path = Path(data["csv_path"])
                if not any(importers.inside(r, csv_path) for r in roots):
                    raise services.LabelingError(f"{csv_path} is outside the import folders.")
                rows, report = importers.plan_csv(
                    csv_path,
                    images_dir=Path(data["folder"]),
                    filename_col=data["filename_col"],
                    head_cols=data["head_map"],
                    project=project,
                    group_col=data["group_col"] or None,
                    source_col=data["source_col"] or None,
                    allowed_roots=roots,
                )
            report = importers.images_import(
                project=project,
                rows=rows,
                report=report,
                user=request.user,
                skip_bad_rows=data["skip_bad_rows"],
                group_by=data["group_by"] or "auto",
                update=data["update"],
            )
        except services.LabelingError as exc:
            form.add_error(None, str(exc))
            report = None
    return render(
        request,
        "labeling/import.html",
        {
            "project": project,
            "form": form,
            "report": report,
            "roots": settings.IMPORT_ROOTS,
            **upload_views.import_page_context(project),
        },
    )


def _import_in_background(request, project, data, form):
    """The Import page's "in the background": an import job (labeling.import_jobs), then the Jobs page."""
    from . import import_jobs  # noqa: PLC0415

    params = {
        "folder": data["folder"],
        "restrict_roots": True,
        "group_by": data["group_by"] or "auto",
        "skip_bad_rows": data["skip_bad_rows"],
        "update": data["update"],
        "class_head": data["head"].name if data.get("head") else None,
    }
    if data["mode"] == "csv":
        params.update(
            csv=data["csv_path"],
            head_cols=data["head_map"],
            filename_col=data["filename_col"] or "image_filename",
            group_col=data["group_col"] or None,
            source_col=data["source_col"] or None,
        )
    try:
        with transaction.atomic():
            run = import_jobs.import_run_create(project=project, mode=data["mode"], params=params, user=request.user)
    except services.LabelingError as exc:
        form.add_error(None, str(exc))
        return render(
            request,
            "labeling/import.html",
            {
                "project": project,
                "form": form,
                "report": None,
                "roots": settings.IMPORT_ROOTS,
                **upload_views.import_page_context(project),
            },
        )
    messages.success(request, f"Import {run.id} queued: its progress is on this page.")
    return redirect("training:job-list", slug=project.slug)


@staff_required
@require_POST
def class_create(request, slug, head_id):
    """A new class from the label picker (admins only), once the admin confirmed it (confirm=1): JSON {"id",
    "name", "parent"} or {"error"}."""
    from django.http import JsonResponse  # noqa: PLC0415

    project = current_project(request, slug)
    head = get_object_or_404(Head, project=project, pk=head_id)
    name = (request.POST.get("name") or "").strip()
    parent = None
    raw_parent = request.POST.get("parent", "")
    if head.parent_id:
        if not raw_parent.isdigit():
            return JsonResponse({"error": f"Choose the {head.parent.name} first."}, status=400)
        parent = head.parent.classes.filter(pk=int(raw_parent)).first()
        if parent is None:
            return JsonResponse({"error": f"No such {head.parent.name}."}, status=400)
    if not name or len(name) > 200:
        return JsonResponse({"error": "A class name is 1 to 200 characters."}, status=400)
    if request.POST.get("confirm") != "1":  # the picker asks before it posts; a bare or replayed post creates nothing
        return JsonResponse({"error": f"Confirm creating the new class {name!r} first."}, status=400)
    try:
        cls, created = services.label_class_get_or_create(head=head, raw_name=name, parent=parent)
    except services.LabelingError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"id": cls.id, "name": cls.name, "parent": cls.parent_id, "created": created})
