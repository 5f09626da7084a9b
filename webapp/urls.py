from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from inference.apis import CarDetectView


def health(_request):
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("api/ai/detect-car-vision", CarDetectView.as_view(), name="car-detect"),  # the car seed's contract
    path("api/v1/", include("inference.urls")),
    path("api/v1/", include("labeling.api_urls")),
    path("api/v1/", include("pipeline.api_urls")),
    path("api/v1/", include("review.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("healthz", health, name="health"),
    path("", include("review.urls")),
    path("", include("pipeline.urls")),
    path("", include("labeling.urls")),
]

# JSON in the API's error shape under /api/, the styled templates/403.html, 404.html, 500.html elsewhere.
handler403 = "webapp.errors.permission_denied"
handler404 = "webapp.errors.page_not_found"
handler500 = "webapp.errors.server_error"
