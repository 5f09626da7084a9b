"""The project's Settings page (admins): the project's own settings and its heads' serving thresholds, each save
one entry of the action log (undo on the Health page)."""

from django.contrib import messages
from django.shortcuts import redirect, render

from . import services
from .access import current_project
from .views import staff_required

# Form field -> how its text becomes the setting's value (a ValueError names the field).
INTS = ("min_image_side", "min_samples_per_class", "near_duplicate_distance", "production_retention_days")
FLOATS = ("random_control_share", "double_review_share")
BOOLS = ("keep_low_confidence_photos",)
TEXTS = ("name", "description", "uncertainty_strategy")


def _number(raw: str, kind, label: str):
    try:
        return kind(raw.strip())
    except ValueError:
        raise ValueError(f"{label}: {raw!r} is not a {'whole number' if kind is int else 'number'}") from None


def parse_settings_form(post, heads) -> tuple[dict, dict]:
    """(project values, {head name: {threshold, optional}}) from the form; ValueError names every bad field."""
    values, problems = {}, []
    for name in INTS + FLOATS:
        if name in post:
            try:
                values[name] = _number(post[name], int if name in INTS else float, name.replace("_", " "))
            except ValueError as exc:
                problems.append(str(exc))
    for name in TEXTS:
        if name in post:
            values[name] = post[name]
    for name in BOOLS:
        values[name] = post.get(name) == "1"
    head_values = {}
    for head in heads:
        fields = {"optional": post.get(f"head-{head.id}-optional") == "1"}
        raw = post.get(f"head-{head.id}-threshold")
        if raw is not None:
            try:
                fields["threshold"] = _number(raw, float, f"{head.name} threshold")
            except ValueError as exc:
                problems.append(str(exc))
        head_values[head.name] = fields
    if problems:
        raise ValueError("; ".join(problems))
    return values, head_values


@staff_required
def settings_page(request, slug):
    project = current_project(request, slug)
    heads = list(project.heads.select_related("parent").order_by("order", "id"))
    if request.method == "POST" and request.POST.get("action") == "add_head":
        try:
            head = services.head_create(
                project=project,
                name=request.POST.get("head_name", ""),
                parent=request.POST.get("head_parent") or None,
                optional=request.POST.get("head_optional") == "1",
                user=request.user,
            )
        except services.LabelingError as exc:
            messages.error(request, f"No head was added. {exc}")
        else:
            messages.success(request, f"Head {head.name} added: every photo is unlabeled for it.")
        return redirect("labeling:settings", slug=project.slug)
    if request.method == "POST":
        try:
            values, head_values = parse_settings_form(request.POST, heads)
            action = services.project_settings_update(
                project=project, values=values, heads=head_values, user=request.user
            )
        except (ValueError, services.LabelingError) as exc:
            messages.error(request, f"Nothing was saved. {exc}")
        else:
            messages.success(request, action.summary if action else "Nothing changed.")
            return redirect("labeling:settings", slug=project.slug)
        project.refresh_from_db()
    strategies = [("least_confidence", "least confidence"), ("margin", "margin"), ("entropy", "entropy")]
    return render(
        request,
        "labeling/settings.html",
        {"project": project, "heads": heads, "strategies": strategies, "form": request.POST or None},
    )
