"""Review queues: items a reviewer should look at (probably mislabeled; low confidence), handed out with leases."""

from django.conf import settings
from django.db import models

from labeling.models import Head, Image, LabelClass, Project


class ReviewItem(models.Model):
    class Queue(models.TextChoices):
        MISLABEL = "mislabel"
        UNCERTAIN = "uncertain"
        BOXES = "boxes", "Shelf boxes"  # a shelf photo whose detector boxes a person should check (issue 18)

    class Status(models.TextChoices):
        OPEN = "open"
        DONE = "done"
        STALE = "stale"  # replaced by a later refresh, or its label changed elsewhere

    class Resolution(models.TextChoices):
        ACCEPTED = "accepted"  # the model's suggestion became the label
        KEPT = "kept"  # the given label was confirmed: never shown again for this label
        RELABELED = "relabeled"  # a reviewer picked another class
        EXCLUDED = "excluded"  # a bad photo: the image is excluded from training
        SKIPPED = "skipped"
        CORRECTED = "corrected"  # boxes: the set as a reviewer edited and saved it

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="review_items")
    queue = models.CharField(max_length=20, choices=Queue.choices)
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="review_items")
    head = models.ForeignKey(Head, on_delete=models.CASCADE, related_name="review_items")
    given_class = models.ForeignKey(LabelClass, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    suggested_class = models.ForeignKey(LabelClass, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    suggested_prob = models.FloatField(default=0.0)
    score = models.FloatField(
        help_text="mislabel: cleanlab label quality (low = likely wrong); uncertain: 1 - score; "
        "boxes: the lowest detector score among the photo's boxes"
    )
    rank = models.PositiveIntegerField(help_text="0 = shown first")
    top_k = models.JSONField(default=list, blank=True, help_text='[{"class_id", "label", "prob"}], best first')
    model_version = models.PositiveIntegerField(null=True, blank=True)
    random_control = models.BooleanField(default=False, help_text="drawn at random (the control arm)")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    leased_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    lease_until = models.DateTimeField(null=True, blank=True)
    resolution = models.CharField(max_length=12, choices=Resolution.choices, blank=True)
    resolved_class = models.ForeignKey(LabelClass, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    undo = models.JSONField(default=dict, blank=True, help_text="what the resolution changed, for undo")
    second_look_of = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="second_looks",
        help_text="a blind second review of that item (double review): recorded for agreement, changes no label",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["rank", "id"]
        indexes = [models.Index(fields=["project", "queue", "status", "rank"])]

    def __str__(self) -> str:
        return f"{self.queue} #{self.rank}: image {self.image_id} / {self.head_id}"
