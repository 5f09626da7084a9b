"""Reads for the labeling domain."""

from django.db.models import Count, Exists, OuterRef, QuerySet

from .models import DatasetVersion, GroupSplit, Head, HealthReport, Image, Label, Project
from .services import LabelingError


def project_list_with_counts(user=None) -> QuerySet[Project]:
    """Projects with their image counts; only those `user` may see when given (labeling.access)."""
    from .access import visible_projects  # noqa: PLC0415

    qs = visible_projects(user) if user is not None else Project.objects.all()
    return qs.annotate(n_images=Count("images", distinct=True)).prefetch_related("heads").order_by("name")


def image_list(
    *,
    project: Project,
    head: Head | None = None,
    class_id: int | None = None,
    unlabeled: bool = False,
    split: str | None = None,
    source: str | None = None,
    status: str | None = None,
) -> QuerySet[Image]:
    """Images of a project filtered by a head's class or by being unlabeled for that head (or any head), by the
    sticky split of their group, by source and by status."""
    qs = Image.objects.filter(project=project)
    if class_id is not None:
        qs = qs.filter(labels__label_class_id=class_id)
    if unlabeled:
        missing = Label.objects.filter(image=OuterRef("pk"), label_class__isnull=True)
        if head is not None:
            missing = missing.filter(head=head)
        qs = qs.filter(Exists(missing))
    if split:
        qs = qs.filter(Exists(GroupSplit.objects.filter(project=project, group_key=OuterRef("group_key"), split=split)))
    if source:
        qs = qs.filter(source=source)
    if status:
        qs = qs.filter(status=status)
    return qs.order_by("id")


def labels_by_image(image_ids: list[int]) -> dict[int, dict[int, Label]]:
    """{image_id: {head_id: Label}} for a page of images, in one query."""
    out: dict[int, dict[int, Label]] = {}
    for lb in Label.objects.filter(image_id__in=image_ids).select_related("label_class"):
        out.setdefault(lb.image_id, {})[lb.head_id] = lb
    return out


def image_labels(*, image: Image) -> list[Label]:
    return list(image.labels.select_related("head", "label_class").order_by("head__order", "head_id"))


class GridHooks:
    """The image grid's filters and sorts that need data of an app above labeling (review: open queue items, the
    model's disagreement, label quality and confidence sorts). Labeling's own: no extra filter, id order; review
    installs its own in ReviewConfig.ready, so labeling never imports it."""

    SORTS: dict[str, str] = {"id": "image id"}

    @staticmethod
    def filter_images(qs, *, flagged: bool = False, disagrees: bool = False):
        return qs

    @staticmethod
    def sort_images(qs, sort: str):
        return qs.order_by("id")

    @staticmethod
    def sort_note(project, sort: str) -> dict | None:
        return None


grid_hooks = GridHooks()


def dataset_version_list(project: Project):
    return project.dataset_versions.select_related("parent", "created_by").order_by("-number")


def dataset_version_get(project: Project, number: int) -> DatasetVersion:
    version = project.dataset_versions.filter(number=number).first()
    if version is None:
        raise LabelingError(f"Project {project.slug!r} has no dataset version {number}.")
    return version


def health_report_latest(project: Project) -> HealthReport | None:
    return project.health_reports.order_by("-created_at", "-id").first()


def health_report_last_good(project: Project) -> HealthReport | None:
    """The newest scan that finished: its findings stay on the page while a newer scan waits or runs."""
    return project.health_reports.filter(status=HealthReport.Status.SUCCEEDED).order_by("-created_at", "-id").first()
