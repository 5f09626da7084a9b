"""Errors of the job machinery in server-rendered pages (API views answer them through webapp.errors)."""

from django.http import JsonResponse
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme

from webapp.jobs import BrokerUnavailable


class BrokerUnavailableMiddleware:
    """An admin action while the broker is down: a 503 page that says so (the service already undid its row),
    instead of Django's 500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, BrokerUnavailable):
            return None
        if request.path.startswith("/api/"):
            body = {"error": {"code": exception.code, "message": exception.message, "details": None}}
            return JsonResponse(body, status=503)
        back = request.headers.get("referer", "")
        if not url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}):
            back = ""
        return render(request, "503.html", {"message": exception.message, "back": back}, status=503)
