from django.urls import path

from . import apis

app_name = "review-api"
urlpatterns = [
    path("projects/<slug:slug>/review/stats/", apis.StatsView.as_view(), name="stats"),
    path("projects/<slug:slug>/review/<str:queue>/next/", apis.QueueNextView.as_view(), name="next"),
    path("projects/<slug:slug>/review/<str:queue>/undo/", apis.UndoView.as_view(), name="undo"),
    path(
        "projects/<slug:slug>/review/<str:queue>/items/<int:item_id>/resolve/",
        apis.ItemResolveView.as_view(),
        name="resolve",
    ),
]
