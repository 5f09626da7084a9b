from django.urls import path

from . import apis, data_apis

app_name = "labeling-api"
urlpatterns = [
    path("projects/", data_apis.ProjectListView.as_view(), name="project-list"),
    path("projects/<slug:slug>/", data_apis.ProjectDetailView.as_view(), name="project-detail"),
    path("projects/<slug:slug>/heads/", data_apis.HeadListView.as_view(), name="head-list"),
    path("projects/<slug:slug>/imports/", data_apis.ImportRunListView.as_view(), name="import-list"),
    path("projects/<slug:slug>/heads/<slug:head>/classes/", data_apis.ClassListView.as_view(), name="class-list"),
    path(
        "projects/<slug:slug>/heads/<slug:head>/classes/<int:class_id>/",
        data_apis.ClassDetailView.as_view(),
        name="class-detail",
    ),
    path("projects/<slug:slug>/images/", data_apis.ImageListView.as_view(), name="image-list"),
    path("projects/<slug:slug>/images/upload/", data_apis.ImageUploadView.as_view(), name="image-upload"),
    path("projects/<slug:slug>/images/<int:pk>/", data_apis.ImageDetailView.as_view(), name="image-detail"),
    path("projects/<slug:slug>/images/<int:pk>/labels/<slug:head>/", data_apis.LabelView.as_view(), name="label-set"),
    path("projects/<slug:slug>/images/<int:pk>/boxes/<slug:head>/", data_apis.BoxSetView.as_view(), name="box-set"),
    path(
        "projects/<slug:slug>/images/<int:pk>/boxes/<slug:head>/undo/",
        data_apis.BoxUndoView.as_view(),
        name="box-set-undo",
    ),
    path("projects/<slug:slug>/boxes/import/", data_apis.BoxImportView.as_view(), name="boxes-import"),
    path("projects/<slug:slug>/labels/bulk/", data_apis.BulkLabelView.as_view(), name="labels-bulk"),
    path("projects/<slug:slug>/dataset-versions/", apis.DatasetVersionListView.as_view(), name="version-list"),
    path(
        "projects/<slug:slug>/dataset-versions/<int:number>/",
        apis.DatasetVersionDetailView.as_view(),
        name="version-detail",
    ),
    path(
        "projects/<slug:slug>/dataset-versions/<int:number>/export/",
        apis.DatasetVersionExportView.as_view(),
        name="version-export",
    ),
    path(
        "projects/<slug:slug>/dataset-versions/<int:old>/diff/<int:new>/",
        apis.DatasetVersionDiffView.as_view(),
        name="version-diff",
    ),
    path("projects/<slug:slug>/health/", apis.HealthScanView.as_view(), name="health"),
]
