"""REST API for dataset versions and health scans (admins). Every error has the one error shape."""

from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.errors import ApiError
from webapp.files import IgnoreAccept
from webapp.pagination import cursor_pagination

from . import health, selectors, versions
from .access import IsProjectAdmin
from .models import DatasetVersion, HealthReport, Project
from .services import LabelingError


class DatasetVersionSerializer(serializers.ModelSerializer):
    parent = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username", default=None)

    class Meta:
        model = DatasetVersion
        fields = ["number", "parent", "content_hash", "counts", "params", "note", "created_by", "created_at"]

    def get_parent(self, obj) -> int | None:
        return obj.parent.number if obj.parent_id else None


class HealthReportSerializer(serializers.ModelSerializer):
    class Meta:
        model = HealthReport
        fields = [
            "id",
            "status",
            "phase",
            "done",
            "total",
            "params",
            "summary",
            "findings",
            "error",
            "created_at",
            "started_at",
            "finished_at",
        ]


def _project(slug: str) -> Project:
    return get_object_or_404(Project, slug=slug)


class DatasetVersionListView(ListAPIView):
    """GET: the dataset versions of a project, newest first (cursor-paginated)."""

    permission_classes = [IsProjectAdmin]
    serializer_class = DatasetVersionSerializer
    pagination_class = cursor_pagination("-number", page_size=50)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no URL kwargs
            return self.serializer_class.Meta.model.objects.none()
        return selectors.dataset_version_list(_project(self.kwargs["slug"]))

    @extend_schema(
        request=inline_serializer(
            "DatasetVersionCreate",
            {
                "note": serializers.CharField(required=False),
                "allow_empty_eval": serializers.BooleanField(required=False, default=False),
            },
        ),
        responses={201: DatasetVersionSerializer, 200: DatasetVersionSerializer},
        summary="Freeze a new dataset version (200 with the latest one when nothing changed)",
    )
    def post(self, request, slug):
        data = request.data if isinstance(request.data, dict) else {}
        allow = data.get("allow_empty_eval", False)
        if not isinstance(allow, bool):
            raise ApiError("allow_empty_eval must be true or false.", code="invalid")
        try:
            version, created = versions.dataset_version_create(
                project=_project(slug), user=request.user, note=str(data.get("note", "")), allow_empty_eval=allow
            )
        except LabelingError as exc:
            code = "empty_eval_split" if str(exc).startswith("Not frozen") else "no_usable_images"
            raise ApiError(str(exc), code=code) from exc
        return Response(
            DatasetVersionSerializer(version).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class DatasetVersionDetailView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(responses=DatasetVersionSerializer, summary="One dataset version with its counts")
    def get(self, request, slug, number):
        version = get_object_or_404(DatasetVersion, project__slug=slug, number=number)
        return Response(DatasetVersionSerializer(version).data)


class DatasetVersionDiffView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(
        responses=OpenApiResponse(description="added / removed / relabeled image ids and per-class changes"),
        summary="What changed between two dataset versions",
    )
    def get(self, request, slug, old, new):
        a = get_object_or_404(DatasetVersion, project__slug=slug, number=old)
        b = get_object_or_404(DatasetVersion, project__slug=slug, number=new)
        return Response(versions.dataset_version_diff(old=a, new=b))


class HealthScanView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(responses=HealthReportSerializer, summary="The latest health report of a project")
    def get(self, request, slug):
        report = selectors.health_report_latest(_project(slug))
        if report is None:
            raise ApiError(
                "This project has no health report yet; POST here to start a scan.", code="no_report", status_code=404
            )
        return Response(HealthReportSerializer(report).data)

    @extend_schema(
        request=inline_serializer(
            "HealthScanCreate",
            {
                "min_side": serializers.IntegerField(required=False),
                "max_distance": serializers.IntegerField(required=False),
                "min_samples": serializers.IntegerField(required=False),
            },
        ),
        responses={202: HealthReportSerializer},
        summary="Start a health scan (runs on a worker; poll GET for progress)",
    )
    def post(self, request, slug):
        data = request.data if isinstance(request.data, dict) else {}
        try:
            report = health.health_report_create(
                project=_project(slug),
                user=request.user,
                **{k: data[k] for k in ("min_side", "max_distance", "min_samples") if k in data},
            )
        except LabelingError as exc:
            raise ApiError(str(exc), code="bad_request") from exc
        return Response(HealthReportSerializer(report).data, status=status.HTTP_202_ACCEPTED)


class DatasetVersionExportView(APIView):
    """The frozen version in the seeds' formats as one zip (car_labels.csv/labels.csv, metadata.csv, splits.json,
    label_maps.json, images/, an ImageFolder tree): written on the first request, the same file after."""

    permission_classes = [IsProjectAdmin]
    content_negotiation_class = IgnoreAccept

    @extend_schema(responses={(200, "application/zip"): OpenApiResponse(description="the export as a zip")})
    def get(self, request, slug, number):
        version = get_object_or_404(DatasetVersion.objects.select_related("project"), project__slug=slug, number=number)
        try:
            archive = versions.dataset_version_archive(version=version)
        except LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        return FileResponse(archive.open("rb"), as_attachment=True, filename=f"{slug}-dataset-v{number}.zip")
