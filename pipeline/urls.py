from django.urls import path

from . import views

app_name = "training"
urlpatterns = [
    path("p/<slug:slug>/runs/", views.run_list, name="run-list"),
    path("p/<slug:slug>/runs/new", views.run_create, name="run-create"),
    path("p/<slug:slug>/runs/<int:run_id>/cancel", views.run_cancel, name="run-cancel"),
    path("p/<slug:slug>/jobs/", views.job_list, name="job-list"),
    path("p/<slug:slug>/jobs/<str:type_>/<int:pk>/cancel", views.job_cancel, name="job-cancel"),
    path("p/<slug:slug>/models/", views.version_list, name="version-list"),
    path("p/<slug:slug>/models/compare/", views.version_compare, name="version-compare"),
    path("p/<slug:slug>/models/<int:number>/", views.version_detail, name="version-detail"),
    path("p/<slug:slug>/models/<int:number>/files/<str:name>", views.version_file, name="version-file"),
    path("p/<slug:slug>/models/<int:number>/promote", views.version_promote, name="version-promote"),
    path("p/<slug:slug>/models/<int:number>/mobile-export", views.version_mobile_export, name="version-mobile-export"),
    path(
        "p/<slug:slug>/models/<int:number>/apply-thresholds",
        views.version_thresholds_apply,
        name="version-thresholds-apply",
    ),
]
