from django.urls import path

from .apis import ImagePredictionView, RecognizeView, ShelfView

app_name = "inference"
urlpatterns = [
    path("projects/<slug:slug>/recognize", RecognizeView.as_view(), name="recognize"),
    path("projects/<slug:slug>/shelf", ShelfView.as_view(), name="shelf"),
    path("projects/<slug:slug>/images/<int:pk>/prediction/", ImagePredictionView.as_view(), name="image-prediction"),
]
