"""Reads for the labeling domain."""

from django.db.models import Count, Exists, OuterRef, QuerySet

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
