"""One error shape for every API error: {"error": {"code", "message", "details"}}."""

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


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
