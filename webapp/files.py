"""File downloads from API views."""

from rest_framework.negotiation import BaseContentNegotiation


class IgnoreAccept(BaseContentNegotiation):
    """A file is a file whatever the client's Accept header says (errors still use the JSON error shape)."""

    def select_parser(self, request, parsers):
        return parsers[0]

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type
