from django.urls import path

from . import apis

app_name = "labeling-api"
urlpatterns = [
    path("projects/<slug:slug>/dataset-versions/", apis.DatasetVersionListView.as_view(), name="version-list"),
    path(
        "projects/<slug:slug>/dataset-versions/<int:number>/",
        apis.DatasetVersionDetailView.as_view(),
        name="version-detail",
    ),
    path(
        "projects/<slug:slug>/dataset-versions/<int:old>/diff/<int:new>/",
        apis.DatasetVersionDiffView.as_view(),
        name="version-diff",
    ),
    path("projects/<slug:slug>/health/", apis.HealthScanView.as_view(), name="health"),
]
