from django.urls import path

from . import dataset_views as dv
from . import settings_views, team_views, upload_views, views

app_name = "labeling"
urlpatterns = [
    path("", views.project_list, name="project-list"),
    path("team/", team_views.team_page, name="team"),
    path("p/<slug:slug>/members/", team_views.members_page, name="members"),
    path("p/<slug:slug>/settings/", settings_views.settings_page, name="settings"),
    path("p/<slug:slug>/", views.image_grid, name="image-grid"),
    path("p/<slug:slug>/import/", views.import_page, name="import"),
    path("p/<slug:slug>/import/uploads/", upload_views.upload_create, name="upload-create"),
    path("p/<slug:slug>/import/uploads/<int:pk>/files/", upload_views.upload_files, name="upload-files"),
    path("p/<slug:slug>/import/uploads/<int:pk>/start/", upload_views.upload_start, name="upload-start"),
    path("p/<slug:slug>/import/uploads/<int:pk>/cancel/", upload_views.upload_cancel, name="upload-cancel"),
    path("p/<slug:slug>/import/runs/<int:pk>/", upload_views.import_run_status, name="import-run"),
    path("p/<slug:slug>/import/runs/<int:pk>/cancel/", upload_views.import_run_cancel, name="import-run-cancel"),
    path("p/<slug:slug>/images/bulk-relabel/", views.labels_bulk_relabel, name="bulk-relabel"),
    path("p/<slug:slug>/heads/<int:head_id>/classes/", views.class_create, name="class-create"),
    path("p/<slug:slug>/images/<int:pk>/", views.image_detail, name="image-detail"),
    path("p/<slug:slug>/images/<int:pk>/heads/<int:head_id>/", views.label_update, name="label-update"),
    path("p/<slug:slug>/images/<int:pk>/<str:kind>", views.image_file, name="image-file"),
    path("p/<slug:slug>/health/", dv.health_page, name="health"),
    path("p/<slug:slug>/health/scan/", dv.health_scan_start, name="health-scan"),
    path("p/<slug:slug>/health/clusters/<int:cluster_id>/", dv.cluster_resolve, name="cluster-resolve"),
    path("p/<slug:slug>/health/merge/", dv.classes_merge, name="classes-merge"),
    path("p/<slug:slug>/health/exclude/", dv.classes_exclude, name="classes-exclude"),
    path("p/<slug:slug>/health/training-options/", dv.training_options, name="training-options"),
    path("p/<slug:slug>/health/unleak/", dv.splits_unleak, name="splits-unleak"),
    path("p/<slug:slug>/health/actions/<int:action_id>/undo/", dv.action_undo, name="action-undo"),
    path("p/<slug:slug>/versions/", dv.version_list, name="version-list"),
    path("p/<slug:slug>/versions/new/", dv.version_create, name="version-create"),
    path("p/<slug:slug>/versions/<int:number>/", dv.version_detail, name="version-detail"),
    path("p/<slug:slug>/versions/<int:number>/export/", dv.version_export, name="version-export"),
    path("p/<slug:slug>/versions/<int:number>/download/", dv.version_download, name="version-download"),
    path("p/<slug:slug>/versions/<int:old>/diff/<int:new>/", dv.version_diff, name="version-diff"),
]
