"""Reads for the labeling domain."""

from django.db.models import Count, Exists, OuterRef, QuerySet

from . import storage
from .models import Head, Image, Label, Project


def project_list_with_counts() -> QuerySet[Project]:
    return Project.objects.annotate(n_images=Count("images", distinct=True)).prefetch_related("heads").order_by("name")


def image_list(
    *, project: Project, head: Head | None = None, class_id: int | None = None, unlabeled: bool = False
) -> QuerySet[Image]:
    """Images of a project filtered by a head's class or by being unlabeled for that head (or any head)."""
    qs = Image.objects.filter(project=project)
    if class_id is not None:
        qs = qs.filter(labels__label_class_id=class_id)
    if unlabeled:
        missing = Label.objects.filter(image=OuterRef("pk"), label_class__isnull=True)
        if head is not None:
            missing = missing.filter(head=head)
        qs = qs.filter(Exists(missing))
    return qs.order_by("id")


def image_labels(*, image: Image) -> list[Label]:
    return list(image.labels.select_related("head", "label_class").order_by("head__order", "head_id"))


def training_manifest(*, project: Project, split_of) -> dict:
    """The engine's manifest for every usable image: labels by class name (None = unknown), the group, the
    source and the split given by `split_of(group_key) -> "train" | "val" | "test"`."""
    heads = list(project.heads.order_by("order", "id"))
    classes = {h.id: list(h.classes.order_by("name").values_list("name", flat=True)) for h in heads}
    images = (
        Image.objects.filter(project=project, status=Image.Status.OK)
        .prefetch_related("labels__label_class")
        .order_by("id")
    )
    items = []
    for im in images:
        by_head = {lb.head_id: lb.label_class.name if lb.label_class_id else None for lb in im.labels.all()}
        if all(v is None for v in by_head.values()):
            continue
        items.append(
            {
                "id": im.id,
                "path": storage.local_path(im.file),
                "labels": {h.name: by_head.get(h.id) for h in heads},
                "group": im.group_key,
                "source": im.source,
                "split": split_of(im.group_key),
            }
        )
    return {
        "heads": [
            {"name": h.name, "classes": classes[h.id], "parent": h.parent.name if h.parent_id else None} for h in heads
        ],
        "items": items,
    }
