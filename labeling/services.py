"""Writes for the labeling domain. Views, commands and tasks call these; reads live in selectors.py."""

import re
from dataclasses import dataclass

from django.db import transaction
from django.db.models import F, Q
from django.utils.text import slugify

from .models import DatasetAction, Head, Image, ImageEvent, Label, LabelClass, LabelEvent, Project
from .normalize import clean_label, normalize_key
from .presets import PRESETS


class LabelConflict(Exception):
    """A stale edit: somebody changed the label since the editor loaded it."""

    def __init__(self, current: Label):
        super().__init__("This label was changed by someone else; nothing was overwritten.")
        self.current = current


class LabelingError(ValueError):
    """Bad input from a person: the message says what to fix."""


HEAD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
MAX_HEADS = 10


def parse_heads(text: str) -> list[dict]:
    """A project's own heads, one per line: `make`, `model < make` (a child head: each model class belongs to one
    make class), `color?` (optional: photos may stay unlabeled for it). LabelingError names every bad line."""
    heads, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, parent = (part.strip() for part in line.partition("<"))
        optional = name.endswith("?")
        name = name.rstrip("?").strip().lower()
        if not HEAD_NAME.match(name):
            problems.append(f"line {n}: {name!r} is not a head name (lowercase letters, digits and _, from a letter)")
            continue
        heads.append({"name": name, "parent": parent.lower() or None, "optional": optional, "line": n})
    names = [h["name"] for h in heads]
    for h in heads:
        if names.count(h["name"]) > 1:
            problems.append(f"line {h['line']}: head {h['name']!r} is given twice")
        if h["parent"] and h["parent"] not in names[: names.index(h["name"])]:
            problems.append(f"line {h['line']}: parent {h['parent']!r} must be a head given on an earlier line")
    if not heads and not problems:
        problems.append("give at least one head")
    if len(heads) > MAX_HEADS:
        problems.append(f"at most {MAX_HEADS} heads")
    if problems:
        raise LabelingError("Heads: " + "; ".join(dict.fromkeys(problems)) + ".")
    return [{k: v for k, v in h.items() if k != "line"} for h in heads]


def parse_classes(text: str, heads: list[dict]) -> list[tuple[str, str, str | None]]:
    """Classes to create with the project, one per line: `make: Toyota`, `model: Corolla < Toyota` (a child
    head's class names its parent class). Returns [(head, class, parent class or None)] in order."""
    by_name = {h["name"]: h for h in heads}
    out, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        head = head.strip().lower()
        name, _, parent = (part.strip() for part in rest.partition("<"))
        if not sep or head not in by_name:
            problems.append(
                f"line {n}: start with one of the heads ({', '.join(by_name)}) and a colon, e.g. "
                f"'{next(iter(by_name), 'make')}: Toyota'"
            )
            continue
        if not name:
            problems.append(f"line {n}: no class name after {head}:")
            continue
        if by_name[head]["parent"] and not parent:
            problems.append(
                f"line {n}: {head} is under {by_name[head]['parent']}: write '{head}: {name} < <its "
                f"{by_name[head]['parent']}>'"
            )
            continue
        if parent and not by_name[head]["parent"]:
            problems.append(f"line {n}: {head} has no parent head, so {name!r} takes no '< {parent}'")
            continue
        out.append((head, name, parent or None))
    if problems:
        raise LabelingError("Classes: " + "; ".join(problems) + ".")
    return out


@transaction.atomic
def project_create(
    *,
    name: str,
    preset: str,
    slug: str | None = None,
    description: str = "",
    heads: list[dict] | None = None,
    classes: list[tuple[str, str, str | None]] | None = None,
    sku_project: Project | None = None,
) -> Project:
    """A new project. Its heads are the preset's unless `heads` gives its own (parse_heads); the preset still
    chooses the training recipe (backbone, augmentations). `classes` (parse_classes) are created with it, after the
    preset's own (a detection head's container classes). `sku_project`: a shelf project's SKU project."""
    if preset not in PRESETS:
        raise LabelingError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    slug = slug or slugify(name)
    if not slug:
        raise LabelingError("A project needs a name with at least one letter or digit.")
    if Project.objects.filter(slug=slug).exists():
        raise LabelingError(f"A project with slug {slug!r} already exists.")
    project = Project.objects.create(
        name=name, slug=slug, preset=preset, description=description, sku_project=sku_project
    )
    created: dict[str, Head] = {}
    for order, spec in enumerate(heads or PRESETS[preset]):
        created[spec["name"]] = Head.objects.create(
            project=project,
            name=spec["name"],
            parent=created.get(spec.get("parent")),
            optional=spec.get("optional", False),
            kind=spec.get("kind", Head.Kind.CLASS),
            order=order,
        )
        for class_name in spec.get("classes", []):
            label_class_get_or_create(head=created[spec["name"]], raw_name=class_name)
    for head, class_name, parent in classes or []:
        parent_class = None
        if parent is not None:
            parent_class, _ = label_class_get_or_create(head=created[head].parent, raw_name=parent)
        label_class_get_or_create(head=created[head], raw_name=class_name, parent=parent_class)
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
    heads = image.project.heads.filter(kind=Head.Kind.CLASS)  # a detection head's labels are boxes (labeling.boxes)
    missing = [Label(image=image, head=h) for h in heads if h.id not in existing]
    Label.objects.bulk_create(missing, ignore_conflicts=True)


# ------------------------------------------------------------------------------------------ project settings
# The settings an admin edits on the project's Settings page (and over the API): field -> (check, what it must be).
# Who sees the project (members_only) is the Members page's.
SETTINGS_FIELDS: dict[str, tuple] = {
    "name": (lambda v: isinstance(v, str) and 0 < len(v.strip()) <= 200, "a name of 1 to 200 characters"),
    "description": (lambda v: isinstance(v, str) and len(v) <= 5000, "text of at most 5,000 characters"),
    "min_image_side": (lambda v: _int_between(v, 1, 100_000), "a whole number of pixels from 1 to 100,000"),
    "min_samples_per_class": (lambda v: _int_between(v, 1, 1_000_000), "a whole number from 1 to 1,000,000"),
    "near_duplicate_distance": (lambda v: _int_between(v, 0, 32), "a whole number of bits from 0 to 32"),
    "keep_low_confidence_photos": (lambda v: isinstance(v, bool), "true or false"),
    "production_retention_days": (lambda v: _int_between(v, 1, 3650), "a whole number of days from 1 to 3,650"),
    "uncertainty_strategy": (
        lambda v: v in ("least_confidence", "margin", "entropy"),
        "least_confidence, margin or entropy",
    ),
    "random_control_share": (lambda v: _fraction(v, 0.0, 0.5), "a share from 0 to 0.5"),
    "double_review_share": (lambda v: _fraction(v, 0.0, 1.0), "a share from 0 to 1"),
}
HEAD_SETTINGS_FIELDS: dict[str, tuple] = {
    "threshold": (lambda v: _fraction(v, 0.0, 1.0), "a confidence from 0 to 1"),
    "optional": (lambda v: isinstance(v, bool), "true or false"),
}


def _int_between(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _fraction(v, lo: float, hi: float) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and lo <= float(v) <= hi


def project_settings_update(*, project: Project, values: dict, heads: dict | None = None, user=None):
    """Change the project's settings (`values`: field -> new value, SETTINGS_FIELDS) and its heads' serving
    threshold / optional flag (`heads`: head name -> {field: value}) in one transaction, recorded as one
    DatasetAction that the Health page's action list can undo (a setting changed again since is left alone).
    Unknown fields, unknown heads and bad values are refused together, each named, and nothing changes.
    Returns the action, or None when nothing changed."""
    problems = [f"unknown setting {k!r}" for k in values if k not in SETTINGS_FIELDS]
    problems += [
        f"{k} must be {SETTINGS_FIELDS[k][1]}, got {v!r}"
        for k, v in values.items()
        if k in SETTINGS_FIELDS and not SETTINGS_FIELDS[k][0](v)
    ]
    if heads is not None and not isinstance(heads, dict):
        problems.append(f'heads must be {{"<head>": {{"threshold": 0.7, "optional": false}}}}, got {heads!r:.80}')
        heads = {}
    heads = heads or {}
    with transaction.atomic():
        project = Project.objects.select_for_update().get(pk=project.pk)
        by_name = {h.name: h for h in Head.objects.select_for_update().filter(project=project)}
        for name, fields in heads.items():
            if name not in by_name:
                problems.append(f"the project has no head {name!r}")
                continue
            if not isinstance(fields, dict):
                problems.append(f"head {name}: expected {{field: value}}, got {fields!r}")
                continue
            for k, v in fields.items():
                if k not in HEAD_SETTINGS_FIELDS:
                    problems.append(f"head {name}: unknown setting {k!r}")
                elif not HEAD_SETTINGS_FIELDS[k][0](v):
                    problems.append(f"head {name}: {k} must be {HEAD_SETTINGS_FIELDS[k][1]}, got {v!r}")
        if problems:
            raise LabelingError("Nothing was changed: " + "; ".join(problems) + ".")
        fields_changed = []
        for k, v in values.items():
            v = v.strip() if k == "name" else v
            old = getattr(project, k)
            if old != v:
                fields_changed.append({"field": k, "old": old, "new": v})
                setattr(project, k, v)
        head_changes, thresholds = [], []
        for name, fields in heads.items():
            head = by_name[name]
            for k, v in fields.items():
                old = getattr(head, k)
                v = float(v) if k == "threshold" else v
                if old == v:
                    continue
                change = {"head_id": head.id, "head": name, "old": old, "new": v}
                (thresholds if k == "threshold" else head_changes).append(change)
                setattr(head, k, v)
        if not (fields_changed or head_changes or thresholds):
            return None
        if fields_changed:
            project.save(update_fields=[c["field"] for c in fields_changed])
        for head in {by_name[c["head"]] for c in head_changes + thresholds}:
            head.save(update_fields=["threshold", "optional"])  # post_save drops the cached serving settings
        parts = [f"{c['field']} {c['old']!r} → {c['new']!r}" for c in fields_changed]
        parts += [f"{c['head']} threshold {c['old']:g} → {c['new']:g}" for c in thresholds]
        parts += [f"{c['head']} optional {c['old']} → {c['new']}" for c in head_changes]
        return DatasetAction.objects.create(
            project=project,
            kind=DatasetAction.Kind.PROJECT_SETTINGS,
            user=user,
            summary=("settings: " + ", ".join(parts))[:500],
            changes={"project_fields": fields_changed, "thresholds": thresholds, "heads_optional": head_changes},
        )


def image_exclude(*, image: Image, excluded: bool, reason: str = "", user=None) -> Image:
    """Leave a photo out of training and the review queues (excluded) or bring it back (ok), with an ImageEvent.
    An unreadable photo stays unreadable: it cannot be brought back by hand (the health scan re-checks files)."""
    new = Image.Status.EXCLUDED if excluded else Image.Status.OK
    with transaction.atomic():
        image = Image.objects.select_for_update().get(pk=image.pk)
        if image.status == Image.Status.UNREADABLE:
            raise LabelingError(f"Image {image.id} is unreadable ({image.status_reason}); a health scan re-checks it.")
        if image.status == new:
            return image
        why = (reason or ("excluded" if excluded else "included again")).strip()[:300]
        ImageEvent.objects.create(image=image, old_status=image.status, new_status=new, user=user, reason=why)
        Image.objects.filter(pk=image.pk).update(status=new, status_reason=why if excluded else "")
    image.refresh_from_db()
    return image


def label_class_update(*, cls: LabelClass, name: str | None = None, add_aliases: list[str] | None = None) -> LabelClass:
    """Rename a class (the old spelling becomes an alias, so imports that use it still find the class) and/or add
    aliases (other spellings an import or the picker maps to it). A name or alias that is another class's of the
    same head is refused: merge the two classes instead (Health page, or the API's merge_into)."""
    with transaction.atomic():
        cls = LabelClass.objects.select_for_update().get(pk=cls.pk)
        if cls.merged_into_id:
            raise LabelingError(f"{cls.name!r} was merged into another class; change that one.")
        others = LabelClass.objects.filter(head_id=cls.head_id).exclude(pk=cls.pk)
        aliases = list(cls.aliases)
        if name is not None:
            display = clean_label(name)
            if display is None or len(display) > 200:
                raise LabelingError(f"{name!r} cannot be a class name (empty, 'unknown'-like or over 200 characters).")
            key = normalize_key(display)
            clash = others.filter(normalized_name=key).first()
            if clash is not None:
                raise LabelingError(f"{clash.name!r} is already a class of {cls.head.name}: merge the two instead.")
            if display != cls.name:
                aliases = [a for a in dict.fromkeys([*aliases, cls.name]) if a != display]
                cls.name, cls.normalized_name = display, key
        for alias in add_aliases or []:
            alias = str(alias).strip()
            if not alias or len(alias) > 200:
                raise LabelingError(f"{alias!r} cannot be an alias (empty or over 200 characters).")
            clash = others.filter(Q(normalized_name=normalize_key(alias)) | Q(aliases__contains=[alias])).first()
            if clash is not None:
                raise LabelingError(f"{alias!r} already means {clash.name!r} of {cls.head.name}.")
            if alias != cls.name and alias not in aliases:
                aliases.append(alias)
        cls.aliases = aliases
        cls.save(update_fields=["name", "normalized_name", "aliases"])
    return cls


def head_create(
    *, project: Project, name: str, parent: str | None = None, optional: bool = False, kind: str = "class", user=None
) -> Head:
    """Add a head to a project that already has photos: every photo gets an unlabeled label row for it (the grid's
    "unlabeled" filter and the review queues find them), recorded in the action log. The training runs after it
    learn it; versions frozen before keep their heads. A detection head (`kind`) takes boxes instead of labels."""
    if kind not in Head.Kind.values:
        raise LabelingError(f"A head's kind is one of {', '.join(Head.Kind.values)}, got {kind!r}.")
    if kind == Head.Kind.DETECTION and parent:
        raise LabelingError("A detection head has no parent head.")
    spec = parse_heads(
        "\n".join(
            [
                *(h.name for h in project.heads.all()),
                f"{name}{'?' if optional else ''}" + (f" < {parent}" if parent else ""),
            ]
        )
    )[-1]
    with transaction.atomic():
        project = Project.objects.select_for_update().get(pk=project.pk)
        if project.heads.filter(name=spec["name"]).exists():
            raise LabelingError(f"Project {project.slug!r} already has a head {spec['name']!r}.")
        parent_head = project.heads.filter(name=spec["parent"]).first() if spec["parent"] else None
        order = (project.heads.order_by("-order").values_list("order", flat=True).first() or 0) + 1
        head = Head.objects.create(
            project=project, name=spec["name"], parent=parent_head, optional=spec["optional"], order=order, kind=kind
        )
        if kind == Head.Kind.CLASS:
            Label.objects.bulk_create(
                [Label(image_id=i, head=head) for i in project.images.values_list("id", flat=True).iterator()],
                batch_size=2000,
            )
        DatasetAction.objects.create(
            project=project,
            kind=DatasetAction.Kind.PROJECT_SETTINGS,
            user=user,
            summary=f"new {'detection ' if kind == Head.Kind.DETECTION else ''}head {head.name}"
            + (f" under {parent_head.name}" if parent_head else "")
            + (" (optional)" if head.optional else ""),
            params={"head": head.name},
            changes={"head_created": head.id},
        )
    return head
