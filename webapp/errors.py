"""One error shape for every API error: {"error": {"code", "message", "details"}}."""

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import Http404, HttpResponseNotFound, JsonResponse
from django.template import loader
from django.urls import Resolver404, resolve
from django.views import defaults
from rest_framework import exceptions, parsers, status
from rest_framework.response import Response


class ApiError(exceptions.APIException):
    """An error with a stable code and a message a person can act on."""

    status_code = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, code: str = "invalid", details=None, status_code: int | None = None):
        super().__init__(detail=message, code=code)
        self.code = code
        self.message = message
        self.details = details
        if status_code:
            self.status_code = status_code


class JSONParser(parsers.JSONParser):
    """DRF's JSONParser, but a body nested too deeply for Python's json module (RecursionError, e.g.
    `[[[[...]]]]` 100 000 levels deep) is a 400 in the error shape instead of a 500. The default parser of every
    API view (REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"])."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ApiError(
                "The JSON body is nested too deeply to read; send a flat document (objects and lists a few levels "
                "deep).",
                code="json_too_deep",
            ) from None


def _request_limit_error(exc) -> ApiError | None:
    """Django's request-size guards (raised while DRF parses the body) as ApiErrors naming the limit; Django
    would answer them with an HTML 400 and an ERROR log line."""
    if isinstance(exc, TooManyFilesSent):
        n = settings.DATA_UPLOAD_MAX_NUMBER_FILES
        return ApiError(
            f"Too many files in one multipart request: send at most {n} files (DATA_UPLOAD_MAX_NUMBER_FILES).",
            code="too_many_files",
            details={"limit": n},
        )
    if isinstance(exc, TooManyFieldsSent):
        n = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return ApiError(
            f"Too many form fields in one request: send at most {n} (DATA_UPLOAD_MAX_NUMBER_FIELDS).",
            code="too_many_fields",
            details={"limit": n},
        )
    if isinstance(exc, RequestDataTooBig):
        n = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return ApiError(
            f"The request body is larger than {n / 2**20:g} MiB (DATA_UPLOAD_MAX_MEMORY_SIZE, not counting "
            "multipart files); send less data per request.",
            code="request_too_large",
            details={"limit_bytes": n},
            status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    return None


def _flatten(detail) -> str:
    if isinstance(detail, list):
        return "; ".join(_flatten(d) for d in detail)
    if isinstance(detail, dict):
        return "; ".join(f"{k}: {_flatten(v)}" for k, v in detail.items())
    return str(detail)


def exception_handler(exc, context):
    if isinstance(exc, Http404):  # get_object_or_404 in an API view: DRF's NotFound, in our shape
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    else:
        exc = _request_limit_error(exc) or exc
    # Imported here: REST_FRAMEWORK names this module's JSONParser, and rest_framework.views reads that setting
    # when it is first imported, so a module-level import would be circular.
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a real bug: let Django's 500 handling log it
    if isinstance(exc, ApiError):
        body = {"code": exc.code, "message": exc.message, "details": exc.details}
    else:
        code = getattr(exc, "default_code", "error")
        if isinstance(exc, exceptions.ValidationError):
            body = {"code": "invalid", "message": _flatten(exc.detail), "details": exc.detail}
        else:
            body = {"code": code, "message": _flatten(exc.detail), "details": None}
    return Response({"error": body}, status=response.status_code, headers=dict(response.items()))


# Django's error handlers (webapp.urls handler403/404/500): JSON in the error shape above under /api/ (e.g. a path
# with a trailing slash the endpoint does not take), the styled templates/403.html, 404.html, 500.html elsewhere.


def _api_error(code: str, message: str, status_code: int) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "details": None}}, status=status_code)


def page_not_found(request, exception):
    message = str(exception) if isinstance(exception, Http404) and not isinstance(exception, Resolver404) else ""
    if not request.path.startswith("/api/"):
        body = loader.render_to_string("404.html", {"message": message, "request_path": request.path}, request)
        return HttpResponseNotFound(body)
    if not message:
        message = f"No API endpoint at {request.path}."
        other = request.path[:-1] if request.path.endswith("/") else request.path + "/"
        try:
            resolve(other)
        except Resolver404:
            pass
        else:
            message += f" Did you mean {other}?"
    return _api_error("not_found", message, 404)


def permission_denied(request, exception):
    if request.path.startswith("/api/"):
        return _api_error("permission_denied", str(exception) or "You do not have permission to do this.", 403)
    return defaults.permission_denied(request, exception)  # templates/403.html, the reason as {{ exception }}


def server_error(request):
    if request.path.startswith("/api/"):
        return _api_error("server_error", "Server error; it has been logged.", 500)
    return defaults.server_error(request)  # templates/500.html, rendered without a request or the database
