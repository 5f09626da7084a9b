"""Projects, heads, classes, images, labels and their append-only history."""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from webapp.jobs import JobRow, one_active_per

from .presets import PRESET_CHOICES


class Project(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    preset = models.CharField(max_length=20, choices=PRESET_CHOICES)
    description = models.TextField(blank=True)
    min_image_side = models.PositiveIntegerField(
        default=224, help_text="Images with a shorter side are too small (and so is their whole group)."
    )
    min_samples_per_class = models.PositiveIntegerField(
        default=10, help_text="Classes with fewer labeled images are reported as rare."
    )
    near_duplicate_distance = models.PositiveSmallIntegerField(
        default=10,
        help_text="Perceptual-hash Hamming distance (of 64 bits) at or below which photos are near-duplicates.",
    )
    keep_low_confidence_photos = models.BooleanField(
        default=False,
        help_text="Store recognition photos that got no label for some head, for the low-confidence review queue.",
    )
    production_retention_days = models.PositiveIntegerField(
        default=30, help_text="Stored production photos nobody labeled are deleted after this many days."
    )
    uncertainty_strategy = models.CharField(
        max_length=20,
        choices=[("least_confidence", "least confidence"), ("margin", "margin"), ("entropy", "entropy")],
        default="margin",
        help_text="How the low-confidence queue ranks unlabeled photos (then diversifies them on the embeddings).",
    )
    random_control_share = models.FloatField(
        default=0.1,
        help_text="Share of the low-confidence queue drawn at random (the control arm that shows whether active "
        "learning pays off).",
    )
    training_options = models.JSONField(
        default=dict,
        blank=True,
        help_text='{"class_weighting": "none"|"inverse"|"sqrt_inverse", "per_class_cap": null or an integer}',
    )
    double_review_share = models.FloatField(
        default=0.0,
        help_text="Share of review decisions shown blind to a second reviewer (0 = off): their agreement is on the "
        "reviewer statistics page, and disagreements are listed there for an admin.",
    )
    members_only = models.BooleanField(
        default=False,
        help_text="Only its members (and site admins) see the project; otherwise every account does, as reviewer.",
    )
    sku_project = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="shelf_projects",
        help_text="A shelf project's SKU project: the one whose model names each box's SKU.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ProjectMember(models.Model):
    """A user's role in one project. Reviewers label and review; project admins also import, scan, freeze
    datasets, retrain, promote and manage the project's members. Site admins (is_staff) are admins everywhere."""

    class Role(models.TextChoices):
        REVIEWER = "reviewer", "reviewer"
        ADMIN = "admin", "admin"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="members")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="project_memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.REVIEWER)
    added_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    added_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="uniq_project_member")]
        ordering = ["user__username"]

    def __str__(self) -> str:
        return f"{self.user} ({self.role}) in {self.project}"


class Head(models.Model):
    """One labeling task on a project's images (make, model, part, colour, sku ...): a class head gives each image one
    class (Label); a detection head gives it a set of boxes, each with a class of the head (BoxSet, Box)."""

    class Kind(models.TextChoices):
        CLASS = "class", "class"
        DETECTION = "detection", "detection"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="heads")
    name = models.SlugField(max_length=50)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.CLASS)
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
    excluded_from_training = models.BooleanField(
        default=False, help_text="Labels of this class are treated as unknown when training (the data stays)."
    )
    merged_into = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="merged_from",
        help_text="Set when this class was merged into another one (kept so the merge can be undone).",
    )
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
    # The import job that created the photo (import_jobs): a failed or cancelled job removes what it wrote.
    import_run = models.ForeignKey(
        "ImportRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="images", db_index=True
    )
    byte_size = models.PositiveBigIntegerField(default=0)
    group_key = models.CharField(max_length=200, db_index=True)
    source = models.CharField(max_length=20, choices=Source.choices, default=Source.REAL)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.OK)
    status_reason = models.CharField(max_length=300, blank=True)
    phash = models.BigIntegerField(null=True, blank=True, help_text="64-bit perceptual hash (signed storage).")
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
    action = models.ForeignKey(
        "DatasetAction", null=True, blank=True, on_delete=models.SET_NULL, related_name="label_events"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.image_id}/{self.head_id}: {self.old_class_id} -> {self.new_class_id} ({self.reason})"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValidationError("Label events are append-only.")
        super().save(*args, **kwargs)


class BoxSet(models.Model):
    """The boxes of one image for one detection head, edited as a whole: `version` guards edits (0 = never set; an
    existing set with no boxes means the image was looked at and holds nothing of the head's classes)."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="box_sets")
    head = models.ForeignKey(Head, on_delete=models.CASCADE, related_name="box_sets")
    version = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["image", "head"], name="box_set_one_per_image_head")]

    def __str__(self) -> str:
        return f"boxes {self.image_id}/{self.head_id} v{self.version}"


class Box(models.Model):
    """One box of a BoxSet: x, y (top-left), w, h in image pixels, and its class of the detection head."""

    class Source(models.TextChoices):
        HUMAN = "human"
        MODEL = "model"

    box_set = models.ForeignKey(BoxSet, on_delete=models.CASCADE, related_name="boxes")
    label_class = models.ForeignKey(LabelClass, on_delete=models.PROTECT, related_name="boxes")
    x = models.FloatField()
    y = models.FloatField()
    w = models.FloatField()
    h = models.FloatField()
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.HUMAN)
    score = models.FloatField(null=True, blank=True, help_text="The model's confidence (source model).")
    order = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["box_set_id", "order", "id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(x__gte=0) & models.Q(y__gte=0) & models.Q(w__gt=0) & models.Q(h__gt=0),
                name="box_inside_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(score__isnull=True) | (models.Q(score__gte=0) & models.Q(score__lte=1)),
                name="box_score_0_1",
            ),
        ]

    def __str__(self) -> str:
        return f"box {self.x:g},{self.y:g} {self.w:g}x{self.h:g} ({self.label_class_id})"


class BoxEvent(models.Model):
    """Append-only history of a box set: the whole set before and after each change (lists of box dicts)."""

    box_set = models.ForeignKey(BoxSet, on_delete=models.CASCADE, related_name="events")
    old = models.JSONField(default=list)
    new = models.JSONField(default=list)
    version = models.PositiveIntegerField(help_text="The set's version after the change.")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    reason = models.CharField(max_length=200, blank=True)
    action = models.ForeignKey(
        "DatasetAction", null=True, blank=True, on_delete=models.SET_NULL, related_name="box_events"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"boxes {self.box_set_id}: {len(self.old)} -> {len(self.new)} ({self.reason})"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValidationError("Box events are append-only.")
        super().save(*args, **kwargs)


class ImageEvent(models.Model):
    """Append-only history of an image's status (excluded, unreadable, back to ok)."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="status_events")
    old_status = models.CharField(max_length=20)
    new_status = models.CharField(max_length=20)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    reason = models.CharField(max_length=300, blank=True)
    action = models.ForeignKey(
        "DatasetAction", null=True, blank=True, on_delete=models.SET_NULL, related_name="image_events"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"image {self.image_id}: {self.old_status} -> {self.new_status} ({self.reason})"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValidationError("Image events are append-only.")
        super().save(*args, **kwargs)


class DatasetAction(models.Model):
    """One data-fixing action: from the health report (resolve a duplicate cluster, merge classes, exclude rare
    classes, change training options), a review queue's bulk rule, a bulk relabel on the image grid or the serving
    thresholds set from a model's calibration. `changes`
    records exactly what it changed so it can be undone."""

    class Kind(models.TextChoices):
        CLUSTER_KEEP_ONE = "cluster_keep_one", "keep one, exclude the rest"
        CLUSTER_LABEL_ALL = "cluster_label_all", "apply one label to all"
        CLUSTER_EXCLUDE_ALL = "cluster_exclude_all", "exclude all"
        MERGE_CLASSES = "merge_classes", "merge classes"
        EXCLUDE_CLASSES = "exclude_classes", "exclude classes from training"
        INCLUDE_CLASSES = "include_classes", "include classes in training"
        TRAINING_OPTIONS = "training_options", "training options"
        REVIEW_BULK = "review_bulk", "review queue bulk rule"
        BULK_RELABEL = "bulk_relabel", "bulk relabel"
        SERVING_THRESHOLDS = "serving_thresholds", "serving thresholds"
        SPLITS_UNLEAK = "splits_unleak", "move linked photos into one split"
        PROJECT_SETTINGS = "project_settings", "project settings"
        BOX_SET = "box_set", "boxes changed"
        UNDO = "undo", "undo"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="dataset_actions")
    kind = models.CharField(max_length=40, choices=Kind.choices)
    summary = models.CharField(max_length=500)
    params = models.JSONField(default=dict, blank=True)
    changes = models.JSONField(default=dict, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    undone_at = models.DateTimeField(null=True, blank=True)
    undone_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.summary}"


class HealthReport(JobRow):
    """One health scan of a project's images; the row owns the job state and the findings."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="health_reports")
    phase = models.CharField(max_length=40, blank=True)
    done = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(default=0)
    params = models.JSONField(default=dict, blank=True)
    summary = models.JSONField(default=dict, blank=True)
    findings = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # one queued or running scan per project, whatever races the web processes run
        constraints = [one_active_per(["project"], "health_report_one_active_per_project")]

    task_name = "labeling.tasks.health_scan"
    what = "health scan"

    def __str__(self) -> str:
        return f"health report {self.pk} ({self.status})"

    @property
    def progress(self) -> float | None:
        return self.done / self.total if self.total else None


class DuplicateCluster(models.Model):
    """Photos that are the same (sha256) or nearly the same (perceptual hash) as found by one health scan."""

    report = models.ForeignKey(HealthReport, on_delete=models.CASCADE, related_name="clusters")
    kind = models.CharField(max_length=10, choices=[("exact", "exact"), ("near", "near")])
    image_ids = models.JSONField(default=list)
    conflicting = models.BooleanField(default=False, help_text="Members carry different labels.")
    max_distance = models.PositiveSmallIntegerField(default=0)
    action = models.ForeignKey(DatasetAction, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-conflicting", "id"]

    def __str__(self) -> str:
        return f"{self.kind} cluster {self.pk}: {self.image_ids}"


class SimilarPair(models.Model):
    """Two photos of one class that one health scan found too alike to cross splits (labeling/similarity.py):
    the next freeze keeps them in one split, and the Health page lists pairs that cross an existing version's."""

    report = models.ForeignKey(HealthReport, on_delete=models.CASCADE, related_name="similar_pairs")
    image_a = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="+")
    image_b = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="+")
    similarity = models.FloatField()

    class Meta:
        ordering = ["-similarity", "id"]

    def __str__(self) -> str:
        return f"similar {self.image_a_id} ~ {self.image_b_id} ({self.similarity:.3f})"


class GroupSplit(models.Model):
    """The sticky split of one group: assigned once, kept by every later dataset version."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="group_splits")
    group_key = models.CharField(max_length=200)
    split = models.CharField(max_length=5, choices=[("train", "train"), ("val", "val"), ("test", "test")])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "group_key"], name="group_split_unique")]

    def __str__(self) -> str:
        return f"{self.group_key}: {self.split}"


class DatasetVersion(models.Model):
    """A frozen snapshot of the usable images, their labels and their splits."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="dataset_versions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    content_hash = models.CharField(
        max_length=64, help_text="sha256 over (image sha256, labels): same data, same hash."
    )
    counts = models.JSONField(default=dict, blank=True)
    params = models.JSONField(default=dict, blank=True)
    note = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-number"]
        constraints = [models.UniqueConstraint(fields=["project", "number"], name="dataset_version_unique_number")]

    def __str__(self) -> str:
        return f"{self.project.slug} dataset v{self.number}"


class DatasetVersionItem(models.Model):
    version = models.ForeignKey(DatasetVersion, on_delete=models.CASCADE, related_name="items")
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="+")
    split = models.CharField(max_length=5)
    group_key = models.CharField(max_length=200)
    labels = models.JSONField(default=dict, help_text="{head name: class name or null}")

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["version", "image"], name="version_item_unique_image")]

    def __str__(self) -> str:
        return f"v{self.version_id} image {self.image_id} ({self.split})"


class ImportRun(JobRow):
    """An import of any size as a background job (labeling.import_jobs): the plan of a folder, CSV or export,
    written in batches with progress; a failed or cancelled job leaves nothing (its own record names what it
    wrote: the images carry import_run, the labels it set name it in their history's reason)."""

    class Mode(models.TextChoices):
        FOLDER = "folder"
        CSV = "csv"
        EXPORT = "export"
        PLACEHOLDER = "placeholder"
        UPLOAD = "upload"  # photos a browser uploaded (ImportUpload), read back through the storage API
        BOXES = "boxes"  # a YOLO or COCO box dataset for a detection head (labeling.boxes)

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="import_runs")
    mode = models.CharField(max_length=20, choices=Mode.choices)
    params = models.JSONField(default=dict, blank=True)
    step = models.CharField(max_length=80, blank=True)
    done = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(default=0)
    report = models.JSONField(default=dict, blank=True)

    task_name = "labeling.tasks.import_run"
    what = "import"

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [one_active_per(["project"], "import_run_one_active_per_project")]

    def __str__(self) -> str:
        return f"import {self.pk} ({self.status})"

    @property
    def progress(self) -> float | None:
        return self.done / self.total if self.total else None


class ImportUpload(models.Model):
    """Photos a browser is uploading for an import (the Import page's drop zone), staged through the storage API
    under `uploads/<project>/<id>/` (the web process and the workers need not share a disk) until the import job
    that reads them (`run`, an ImportRun of mode upload) ends — done, failed or cancelled —, or, never started,
    until it is cancelled or the reconciler removes it LOUPE_UPLOAD_ABANDONED_SECONDS after its last file."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="import_uploads")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, help_text="When the last file arrived.")
    run = models.OneToOneField(
        ImportRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="upload", help_text="Once started."
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"upload {self.pk} of {self.project_id}"


class ImportUploadFile(models.Model):
    """One staged photo of an ImportUpload: the relative path the browser gave (a dropped folder's `<class>/x.jpg`)
    and where it waits in the storage (a name derived from the path, never the browser's own string)."""

    upload = models.ForeignKey(ImportUpload, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=500)
    name = models.CharField(max_length=300)
    size = models.PositiveBigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["upload", "path"], name="import_upload_file_one_per_path")]

    def __str__(self) -> str:
        return self.path
