"""Recognitions kept as production feedback: a recognition below threshold (when the project opts in) stores its
photos as `production` images and this row holds what the model said, for the low-confidence review queue."""

from django.conf import settings
from django.db import models

from labeling.models import Image, Project


class Recognition(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="recognitions")
    model_version = models.PositiveIntegerField()
    mode = models.CharField(max_length=20, default="softmax")
    result = models.JSONField(help_text="per head: label, confidence, reason, top_k")
    unclassifiable = models.BooleanField(default=False)
    images = models.ManyToManyField(Image, related_name="recognitions", blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"recognition {self.pk} ({self.project.slug}, v{self.model_version})"
