from django.urls import path

from .apis import RecognizeView

app_name = "inference"
urlpatterns = [
    path("projects/<slug:slug>/recognize", RecognizeView.as_view(), name="recognize"),
]
