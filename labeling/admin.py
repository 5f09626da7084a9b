from django.contrib import admin

from .models import Head, Image, Label, LabelClass, LabelEvent, Project


class HeadInline(admin.TabularInline):
    model = Head
    extra = 0


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "preset", "created_at")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [HeadInline]


@admin.register(LabelClass)
class LabelClassAdmin(admin.ModelAdmin):
    list_display = ("name", "head", "parent", "aliases")
    list_filter = ("head__project", "head")
    search_fields = ("name", "normalized_name")


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ("original_name", "project", "group_key", "source", "status", "width", "height")
    list_filter = ("project", "source", "status")
    search_fields = ("original_name", "sha256", "group_key")
    readonly_fields = ("sha256", "file", "thumbnail", "byte_size", "width", "height")


@admin.register(Label)
class LabelAdmin(admin.ModelAdmin):
    list_display = ("image", "head", "label_class", "version", "updated_by", "updated_at")
    list_filter = ("head__project", "head")
    raw_id_fields = ("image", "label_class")


@admin.register(LabelEvent)
class LabelEventAdmin(admin.ModelAdmin):
    """Read-only: the history is append-only."""

    list_display = ("created_at", "image", "head", "old_class", "new_class", "user", "reason")
    list_filter = ("head__project", "reason")

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_add_permission(self, request):
        return False
