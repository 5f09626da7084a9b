from django.urls import path

from . import apis

app_name = "training-api"
urlpatterns = [
    path("projects/<slug:slug>/models/", apis.ModelVersionListView.as_view(), name="model-list"),
    path("projects/<slug:slug>/models/compare/", apis.ModelVersionCompareView.as_view(), name="model-compare"),
    path(
        "projects/<slug:slug>/models/<int:number>/files/<str:name>",
        apis.ModelVersionFileView.as_view(),
        name="model-file",
    ),
    path(
        "projects/<slug:slug>/models/<int:number>/mobile-export/",
        apis.ModelVersionMobileExportView.as_view(),
        name="model-mobile-export",
    ),
    path("projects/<slug:slug>/jobs/", apis.JobListView.as_view(), name="job-list"),
    path("projects/<slug:slug>/jobs/<str:type_>/<int:pk>/cancel/", apis.JobCancelView.as_view(), name="job-cancel"),
    path("projects/<slug:slug>/runs/", apis.TrainingRunListView.as_view(), name="run-list"),
    path("projects/<slug:slug>/runs/<int:run_id>/", apis.TrainingRunDetailView.as_view(), name="run-detail"),
    path("projects/<slug:slug>/runs/<int:run_id>/cancel/", apis.TrainingRunCancelView.as_view(), name="run-cancel"),
    path(
        "projects/<slug:slug>/models/<int:number>/promote/",
        apis.ModelVersionPromoteView.as_view(),
        name="model-promote",
    ),
]
