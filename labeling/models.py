"""Projects, heads, classes, images, labels and their append-only history."""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from .presets import PRESET_CHOICES


class Project(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    preset = models.CharField(max_length=20, choices=PRESET_CHOICES)
    description = models.TextField(blank=True)
    min_image_side = models.PositiveIntegerField(default=224)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Head(models.Model):
    """One labeling task on a project's images (make, model, part, colour, sku ...)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="heads")
    name = models.SlugField(max_length=50)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    optional = models.BooleanField(default=False, help_text="Images may stay unlabeled for this head.")
    threshold = models.FloatField(default=0.6, help_text="Below this confidence recognition answers null.")
    order = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["project_id", "order", "id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="head_unique_name_per_project"),
            models.CheckConstraint(
                condition=models.Q(threshold__gte=0) & models.Q(threshold__lte=1), name="head_threshold_0_1"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project.slug}:{self.name}"


class LabelClass(models.Model):
    head = models.ForeignKey(Head, on_delete=models.CASCADE, related_name="classes")
    name = models.CharField(max_length=200)
    normalized_name = models.CharField(max_length=200)
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="children",
        help_text="The class in the parent head this class belongs to (model → make).",
    )
    aliases = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["head_id", "name"]
        constraints = [
            models.UniqueConstraint(fields=["head", "normalized_name"], name="class_unique_normalized_per_head"),
        ]

    def __str__(self) -> str:
        return self.name


class Image(models.Model):
    class Source(models.TextChoices):
        REAL = "real"
        SYNTHETIC = "synthetic"
        LEGACY = "legacy"
        PRODUCTION = "production"

    class Status(models.TextChoices):
        OK = "ok"
        UNREADABLE = "unreadable"  # could not be decoded at import; kept so health checks can show it
        EXCLUDED = "excluded"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="images")
    sha256 = models.CharField(max_length=64)
    file = models.CharField(max_length=500, help_text="Path in the default storage.")
    thumbnail = models.CharField(max_length=500, blank=True)
    original_name = models.CharField(max_length=500)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    byte_size = models.PositiveBigIntegerField(default=0)
    group_key = models.CharField(max_length=200, db_index=True)
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.REAL)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.OK)
    status_reason = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["project", "sha256"], name="image_unique_content")]
        indexes = [models.Index(fields=["project", "status"])]

    def __str__(self) -> str:
        return self.original_name


class Label(models.Model):
    """The current label of one image for one head; null class = unlabeled. `version` guards edits."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="labels")
    head = models.ForeignKey(Head, on_delete=models.CASCADE, related_name="labels")
    label_class = models.ForeignKey(LabelClass, null=True, blank=True, on_delete=models.PROTECT)
    version = models.PositiveIntegerField(default=1)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "head"], name="label_one_per_image_head")]
        indexes = [models.Index(fields=["head", "label_class"])]

    def __str__(self) -> str:
        return f"{self.image_id}/{self.head_id}: {self.label_class_id}"


class LabelEvent(models.Model):
    """Append-only label history: never updated, never deleted by the app."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="label_events")
    head = models.ForeignKey(Head, on_delete=models.CASCADE)
    old_class = models.ForeignKey(LabelClass, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    new_class = models.ForeignKey(LabelClass, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.image_id}/{self.head_id}: {self.old_class_id} -> {self.new_class_id} ({self.reason})"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValidationError("Label events are append-only.")
        super().save(*args, **kwargs)
