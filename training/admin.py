from django.contrib import admin

from .models import ModelVersion, TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ("id", "project", "status", "epoch", "epochs", "loss", "created_at", "finished_at")
    list_filter = ("project", "status")
    readonly_fields = ("metrics", "history", "error", "artifact_dir")


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("project", "number", "is_active", "index_status", "created_at", "promoted_at")
    list_filter = ("project", "is_active")
    readonly_fields = ("metrics", "artifact_dir", "index_error")
