"""Cursor pagination for every API list: pages stay stable however many rows are added meanwhile; the answer is
{"next": url | null, "previous": url | null, "results": [...]} and ?page_size= asks for up to max_page_size."""

from rest_framework.pagination import CursorPagination


def cursor_pagination(ordering: str = "id", page_size: int = 100, max_page_size: int = 1000) -> type[CursorPagination]:
    return type(
        f"Cursor_{ordering.lstrip('-')}",
        (CursorPagination,),
        {
            "ordering": ordering,
            "page_size": page_size,
            "page_size_query_param": "page_size",
            "max_page_size": max_page_size,
        },
    )


def paginated(view, request, queryset, serializer_class, *, ordering: str = "id", page_size: int = 100):
    """The cursor-paginated Response of `queryset` for an APIView (ListAPIView does this by itself)."""
    paginator = cursor_pagination(ordering, page_size)()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer_class(page, many=True).data)
