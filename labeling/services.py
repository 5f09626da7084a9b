"""Writes for the labeling domain. Views, commands and tasks call these; reads live in selectors.py."""

from dataclasses import dataclass

from django.db import transaction
from django.db.models import F
from django.utils.text import slugify

from .models import Head, Image, Label, LabelClass, LabelEvent, Project
from .normalize import clean_label, normalize_key
from .presets import PRESETS


class LabelConflict(Exception):
    """A stale edit: somebody changed the label since the editor loaded it."""

    def __init__(self, current: Label):
        super().__init__("This label was changed by someone else; nothing was overwritten.")
        self.current = current


class LabelingError(ValueError):
    """Bad input from a person: the message says what to fix."""


@transaction.atomic
def project_create(*, name: str, preset: str, slug: str | None = None, description: str = "") -> Project:
    if preset not in PRESETS:
        raise LabelingError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    slug = slug or slugify(name)
    if not slug:
        raise LabelingError("A project needs a name with at least one letter or digit.")
    if Project.objects.filter(slug=slug).exists():
        raise LabelingError(f"A project with slug {slug!r} already exists.")
    project = Project.objects.create(name=name, slug=slug, preset=preset, description=description)
    heads: dict[str, Head] = {}
    for order, spec in enumerate(PRESETS[preset]):
        heads[spec["name"]] = Head.objects.create(
            project=project,
            name=spec["name"],
            parent=heads.get(spec.get("parent")),
            optional=spec.get("optional", False),
            order=order,
        )
    return project


def label_class_get_or_create(
    *, head: Head, raw_name: str, parent: LabelClass | None = None
) -> tuple[LabelClass, bool]:
    """The class for a spelling, created if new; other spellings of the same name become aliases.

    Raises LabelingError when the class already belongs to a different parent class (model under two makes).
    """
    display = clean_label(raw_name)
    if display is None:
        raise LabelingError(f"{raw_name!r} means unknown and cannot be a class.")
    key = normalize_key(display)
    obj, created = LabelClass.objects.get_or_create(
        head=head, normalized_name=key, defaults={"name": display, "parent": parent}
    )
    while obj.merged_into_id is not None:  # a merged class's spellings label its target
        obj, created = obj.merged_into, False
    changed = False
    raw_stripped = str(raw_name).strip()
    if not created and raw_stripped != obj.name and raw_stripped not in obj.aliases:
        obj.aliases = sorted({*obj.aliases, raw_stripped})
        changed = True
    if created and raw_stripped != display:
        obj.aliases = [raw_stripped]
        changed = True
    if parent is not None:
        if obj.parent_id is None:
            obj.parent = parent
            changed = True
        elif obj.parent_id != parent.id:
            raise LabelingError(
                f"{head.name} {obj.name!r} belongs to {obj.parent.head.name} {obj.parent.name!r}, not {parent.name!r}."
            )
    if changed:
        obj.save(update_fields=["aliases", "parent"])
    return obj, created


@dataclass
class LabelChange:
    label: Label
    changed: bool


def label_set(
    *, label_id: int, class_id: int | None, expected_version: int, user=None, reason: str = "edit"
) -> LabelChange:
    """Set one label with optimistic concurrency: refuses (LabelConflict) when `expected_version` is stale."""
    with transaction.atomic():
        label = Label.objects.select_for_update(of=("self",)).select_related("head", "label_class").get(pk=label_id)
        if label.version != expected_version:
            raise LabelConflict(label)
        if class_id is not None and not LabelClass.objects.filter(pk=class_id, head_id=label.head_id).exists():
            raise LabelingError(f"Class {class_id} does not belong to head {label.head.name!r}.")
        if label.label_class_id == class_id:
            return LabelChange(label=label, changed=False)
        old_class_id = label.label_class_id
        Label.objects.filter(pk=label.pk).update(label_class_id=class_id, version=F("version") + 1, updated_by=user)
        LabelEvent.objects.create(
            image_id=label.image_id,
            head_id=label.head_id,
            old_class_id=old_class_id,
            new_class_id=class_id,
            user=user,
            reason=reason,
        )
    label.refresh_from_db()
    return LabelChange(label=label, changed=True)


def image_labels_ensure(*, image: Image) -> None:
    """Every image has one Label row per head (null = unlabeled), so edits always have a version to check."""
    existing = set(image.labels.values_list("head_id", flat=True))
    missing = [Label(image=image, head=h) for h in image.project.heads.all() if h.id not in existing]
    Label.objects.bulk_create(missing, ignore_conflicts=True)
