"""Review pages: one queue item at a time, keyboard first (static/loupe/review.js)."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_POST

from labeling.access import current_project
from labeling.boxes import BoxConflict
from labeling.models import Box, Head, Image, Label, LabelClass, Project
from labeling.services import LabelConflict
from labeling.views import staff_required

from . import box_queue, references, selectors, services
from .models import ReviewItem

QUEUES = {q.value: q.label for q in ReviewItem.Queue}


def _queue(queue: str) -> str:
    if queue not in QUEUES:
        raise Http404(f"No review queue {queue!r}.")
    return queue


def _panel_context(request, project: Project, queue: str, *, message: str = "", conflict=None) -> dict:
    item = services.queue_next(project=project, queue=queue, user=request.user)
    ctx = {"project": project, "queue": queue, "item": item, "message": message, "conflict": conflict}
    ctx["remaining"] = ReviewItem.objects.filter(project=project, queue=queue, status=ReviewItem.Status.OPEN).count()
    if queue == ReviewItem.Queue.BOXES:
        return ctx | {"box_queue": True} | _box_context(item)
    if item is not None:
        label = Label.objects.select_related("label_class").get(image_id=item.image_id, head_id=item.head_id)
        ctx |= {
            "item": item,
            "label": label,
            # a blind second look shows what the first reviewer saw, not their decision
            "given": item.given_class if item.second_look_of_id else label.label_class,
            "top_k": [{**t, "key": i} for i, t in enumerate(item.top_k[:5], start=1)],
            "classes": LabelClass.objects.filter(head_id=item.head_id, merged_into__isnull=True)
            .order_by("name")
            .values_list("id", "name", "parent__name"),
        }
    return ctx


def _box_context(item: ReviewItem | None) -> dict:
    """The shelf box queue's panel: the item's photo in the box editor, the box set version it loaded."""
    if item is None:
        return {}
    current = box_queue.box_set_of(item)
    return {
        "box_version": current.version if current else 0,
        "suggestions": current.boxes.filter(source=Box.Source.MODEL).count() if current else 0,
        "n_boxes": current.boxes.count() if current else 0,
        "box_head": item.head,
        "box_classes": LabelClass.objects.filter(head_id=item.head_id, merged_into__isnull=True).order_by("name"),
    }


def _render(request, ctx: dict, status: int = 200):
    if ctx["queue"] == ReviewItem.Queue.BOXES:  # the box editor loads with the page: no partial swaps
        return render(request, "review/boxes.html", ctx, status=status)
    template = "review/_panel.html" if request.headers.get("HX-Request") else "review/queue.html"
    return render(request, template, ctx, status=status)


@login_required
def queue_page(request, slug, queue):
    project = current_project(request, slug)
    ctx = _panel_context(request, project, _queue(queue))
    ctx["refresh_job"] = None if queue == ReviewItem.Queue.BOXES else selectors.refresh_job(project, queue)
    ctx["box_queue"] = project.heads.filter(kind=Head.Kind.DETECTION).exists()  # the shelf box queue's tab
    return _render(request, ctx)


@login_required
@require_POST
def item_resolve(request, slug, queue, item_id):
    project = current_project(request, slug)
    queue = _queue(queue)
    item = get_object_or_404(ReviewItem, project=project, queue=queue, pk=item_id)
    action = request.POST.get("action", "")
    raw_class, raw_version = request.POST.get("class_id", ""), request.POST.get("version", "")
    if (raw_class and not raw_class.isdigit()) or (raw_version and not raw_version.isdigit()):
        return _render(request, _panel_context(request, project, queue, message="The form was incomplete."), 400)
    class_id = int(raw_class) if raw_class else None
    if action == "relabel" and class_id is not None:  # picking the suggestion or the given class by hand
        if class_id == item.suggested_class_id:
            action = "accept"
        elif class_id == item.given_class_id:
            action = "keep"
    status, message, conflict = 200, "", None
    try:
        done = services.item_resolve(
            item=item,
            user=request.user,
            action=action,
            class_id=class_id,
            expected_version=int(raw_version) if raw_version else None,
        )
        message = f"Image {done.image_id}: {done.get_resolution_display().lower()}."
    except LabelConflict as exc:
        status, conflict = 409, exc.current
        message = (
            f"Someone else changed this label meanwhile: it is now "
            f"{exc.current.label_class.name if exc.current.label_class else 'unlabeled'}. Nothing was overwritten."
        )
    except BoxConflict as exc:
        status = 409
        message = (
            f"Someone else changed these boxes meanwhile (now version {exc.current.version}); nothing was "
            "overwritten. Check them again below."
        )
    except services.ReviewError as exc:
        status, message = 400, str(exc)
    if not request.headers.get("HX-Request"):
        (messages.success if status == 200 else messages.error)(request, message)
        return redirect("review:queue", slug=slug, queue=queue)
    return _render(request, _panel_context(request, project, queue, message=message, conflict=conflict), status)


@login_required
@require_POST
def undo(request, slug, queue):
    project = current_project(request, slug)
    queue = _queue(queue)
    status = 200
    try:
        item = services.item_undo(user=request.user, project=project, queue=queue)
        message = f"Undone: image {item.image_id} is back in the queue." if item else "Nothing to undo."
    except LabelConflict:
        status, message = 409, "Cannot undo: someone changed that label since."
    except services.ReviewError as exc:
        status, message = 409, str(exc)
    if not request.headers.get("HX-Request"):
        (messages.success if status == 200 else messages.error)(request, message)
        return redirect("review:queue", slug=slug, queue=queue)
    return _render(request, _panel_context(request, project, queue, message=message), status)


@login_required
def item_references(request, slug, queue, item_id):
    """Reference photos (loaded after the item is shown): the nearest gallery photos of the suggested class and
    of the given class, side by side."""
    project = current_project(request, slug)
    item = get_object_or_404(
        ReviewItem.objects.select_related("given_class__head", "suggested_class__head", "image"),
        project=project,
        pk=item_id,
    )
    shown = [(title, cls) for title, cls in (("Suggested", item.suggested_class), ("Given", item.given_class)) if cls]
    nearest = references.nearest_of_classes(project=project, image=item.image, classes=[c for _, c in shown], k=4)
    images = Image.objects.filter(pk__in=[i for ids in nearest.values() for i in ids]).in_bulk()
    rows = [
        {"title": title, "class": cls, "images": [images[i] for i in nearest[cls.id] if i in images]}
        for title, cls in shown
    ]
    return render(request, "review/_references.html", {"project": project, "rows": rows})


def _threshold(raw: str | None) -> tuple[float | None, bool]:
    """A bulk-rule threshold from the form: (value or None when left empty, whether it was valid)."""
    if raw is None or not raw.strip():
        return None, True
    try:
        value = float(raw)
    except ValueError:
        return None, False
    return (value, True) if 0.0 <= value <= 1.0 else (None, False)


@staff_required
def bulk_rules(request, slug):
    """Admin bulk rules over the open mislabel items: a preview (GET), a confirm page that names the counts
    (GET ?step=confirm), then the apply (POST), which needs the confirm page's token of that very preview."""
    from .selectors import bulk_rule_defaults  # noqa: PLC0415

    project = current_project(request, slug)
    source = request.POST if request.method == "POST" else request.GET
    defaults = bulk_rule_defaults(project=project)
    if "accept_above" in source or "exclude_below" in source:
        (accept_above, ok_a), (exclude_below, ok_e) = (
            _threshold(source.get("accept_above")),
            _threshold(source.get("exclude_below")),
        )
    else:  # first visit: what the model's calibration supports, else nothing
        (accept_above, ok_a), (exclude_below, ok_e) = (
            (defaults["accept_above"], True),
            (defaults["exclude_below"], True),
        )
    ctx = {
        "project": project,
        "queue": "mislabel",
        "accept_above": accept_above if ok_a else source.get("accept_above"),
        "exclude_below": exclude_below if ok_e else source.get("exclude_below"),
        "basis": defaults["basis"],
    }
    if not (ok_a and ok_e):
        messages.error(request, "Thresholds are numbers between 0 and 1 (e.g. 0.9), or empty for no rule.")
        return render(request, "review/rules.html", ctx, status=400)
    if accept_above is None and exclude_below is None:
        if request.method == "POST":
            messages.error(request, "Nothing was applied: set a threshold first.")
            return render(request, "review/rules.html", ctx, status=400)
        return render(request, "review/rules.html", ctx)
    try:
        if request.method == "POST":
            action = services.bulk_rule_apply(
                project=project,
                user=request.user,
                accept_above=accept_above,
                exclude_below=exclude_below,
                confirm=request.POST.get("token", ""),
            )
            if action is None:
                messages.info(request, "Nothing matched the rule; nothing changed.")
            else:
                messages.success(request, f"Done: {action.summary}. Undo it from the Health page's action list.")
            query = urlencode({"accept_above": _form_value(accept_above), "exclude_below": _form_value(exclude_below)})
            return redirect(f"{reverse('review:rules', args=[slug])}?{query}")
        ctx["plan"] = services.bulk_rule_preview(
            project=project, accept_above=accept_above, exclude_below=exclude_below
        )
        ctx["confirming"] = request.GET.get("step") == "confirm" and ctx["plan"]["total"] > 0
    except services.ReviewError as exc:
        messages.error(request, str(exc))
        ctx["plan"] = None
        if request.method == "POST":  # refused: show the current preview to confirm again
            try:
                ctx["plan"] = services.bulk_rule_preview(
                    project=project, accept_above=accept_above, exclude_below=exclude_below
                )
            except services.ReviewError:
                pass
        stale = request.method == "POST" and request.POST.get("token") and ctx["plan"] is not None
        return render(request, "review/rules.html", ctx, status=409 if stale else 400)
    return render(request, "review/rules.html", ctx)


def _form_value(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


@staff_required
@require_POST
def refresh(request, slug, queue):
    project = current_project(request, slug)
    queue = _queue(queue)
    if queue == ReviewItem.Queue.BOXES:
        n = box_queue.box_queue_sweep(project=project)
        messages.success(request, f"{n} photo{'s' if n != 1 else ''} with unreviewed box suggestions queued.")
        return redirect("review:queue", slug=slug, queue=queue)
    try:
        number = services.queue_refresh(project=project, queue=queue, user=request.user)
        how = (
            "out-of-fold predictions on the worker"
            if queue == "mislabel"
            else "the worker predicts every unlabeled photo"
        )
        messages.success(request, f"Rebuilding the queue from v{number}: {how}, then it refills.")
    except services.ReviewError as exc:
        messages.error(request, str(exc))
    return redirect("review:queue", slug=slug, queue=queue)


@staff_required
def stats(request, slug):
    from .stats import reviewer_stats  # noqa: PLC0415

    project = current_project(request, slug)
    from labeling.forms import ReviewSettingsForm  # noqa: PLC0415

    form = ReviewSettingsForm(request.POST or None, instance=project)
    if request.method == "POST":
        if form.is_valid():
            form.save()
            messages.success(request, "Review settings saved.")
            return redirect("review:stats", slug=slug)
        project.refresh_from_db()
    n_disagree, disagreements = selectors.double_review_disagreements(project=project)
    return render(
        request,
        "review/stats.html",
        {
            "project": project,
            "rows": reviewer_stats(project=project),
            "counts": selectors.queue_counts(project=project),
            "n_disagree": n_disagree,
            "disagreements": disagreements,
            "form": form,
        },
    )


@login_required
def learning_curve(request, slug):
    """Accuracy against the number of labels per model version, and the active vs random arm (review.curve)."""
    from .curve import learning_curve as curve  # noqa: PLC0415

    project = current_project(request, slug)
    return render(request, "review/curve.html", {"project": project, **curve(project=project)})
