from django.urls import path

from . import views

app_name = "review"

urlpatterns = [
    path("p/<slug:slug>/review/mislabel/rules/", views.bulk_rules, name="rules"),
    path("p/<slug:slug>/review/stats/", views.stats, name="stats"),
    path("p/<slug:slug>/review/learning-curve/", views.learning_curve, name="curve"),
    path("p/<slug:slug>/review/<str:queue>/", views.queue_page, name="queue"),
    path("p/<slug:slug>/review/<str:queue>/refresh/", views.refresh, name="refresh"),
    path("p/<slug:slug>/review/<str:queue>/undo/", views.undo, name="undo"),
    path("p/<slug:slug>/review/<str:queue>/<int:item_id>/", views.item_resolve, name="resolve"),
    path("p/<slug:slug>/review/<str:queue>/<int:item_id>/references/", views.item_references, name="references"),
]
