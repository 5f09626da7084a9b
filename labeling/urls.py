from django.urls import path

from . import views

app_name = "labeling"
urlpatterns = [
    path("", views.project_list, name="project-list"),
    path("p/<slug:slug>/", views.image_grid, name="image-grid"),
    path("p/<slug:slug>/import/", views.import_page, name="import"),
    path("p/<slug:slug>/images/<int:pk>/", views.image_detail, name="image-detail"),
    path("p/<slug:slug>/images/<int:pk>/heads/<int:head_id>/", views.label_update, name="label-update"),
    path("p/<slug:slug>/images/<int:pk>/<str:kind>", views.image_file, name="image-file"),
]
