"""Model registry API: list versions with their metrics, compare two on the same test split, promote or roll
back (admins). Errors use the one error shape."""

from django.http import FileResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from inference import evaluation
from labeling.access import IsProjectAdmin
from labeling.models import Project
from training import selectors, services
from training.jobs import JobError
from training.models import ModelVersion, PretrainedSource, TrainingRun
from webapp.errors import ApiError
from webapp.files import IgnoreAccept
from webapp.jobs import JobStatus, describe
from webapp.pagination import cursor_pagination

from . import chain
from . import jobs as pipeline_jobs


class ModelVersionSerializer(serializers.ModelSerializer):
    heads = serializers.SerializerMethodField()
    test = serializers.SerializerMethodField()
    primary = serializers.SerializerMethodField()
    evaluated_on = serializers.SerializerMethodField(help_text="val, or 'train (optimistic)' without validation photos")
    dataset_version = serializers.SerializerMethodField()
    pretrained_source = serializers.ChoiceField(
        choices=PretrainedSource.choices,
        allow_null=True,
        read_only=True,
        help_text="Where the backbone's starting weights came from (none = random init); null when not recorded.",
    )
    pretrained_detail = serializers.SerializerMethodField()
    gate = serializers.SerializerMethodField(
        help_text="The promote gate's verdict when the version was trained beside an active one: passed, new and "
        "active mean top-1 on the same frozen test split, drop, reason; null for a project's first model"
    )

    class Meta:
        model = ModelVersion
        fields = [
            "number",
            "is_active",
            "created_at",
            "promoted_at",
            "index_status",
            "index_size",
            "evaluated_on",
            "primary",
            "heads",
            "test",
            "dataset_version",
            "pretrained_source",
            "pretrained_detail",
            "gate",
        ]

    def get_evaluated_on(self, obj) -> str:
        return obj.evaluated_on

    def get_primary(self, obj) -> float | None:
        return obj.metrics.get("primary")

    def get_heads(self, obj) -> dict:
        return {
            h: {k: m.get(k) for k in ("top1", "top5", "n_val")} for h, m in (obj.metrics.get("heads") or {}).items()
        }

    def get_test(self, obj) -> dict:
        return obj.metrics.get("test") or {}

    def get_pretrained_detail(self, obj) -> str:
        """The package, hub id or file the weights came from, or why there were none."""
        return obj.metrics.get("pretrained_detail") or ""

    def get_gate(self, obj) -> dict | None:
        return obj.metrics.get("gate")

    def get_dataset_version(self, obj) -> int | None:
        return obj.run.dataset_version.number if obj.run_id and obj.run.dataset_version_id else None


def _version(slug: str, number: int) -> ModelVersion:
    return get_object_or_404(
        ModelVersion.objects.select_related("run__dataset_version"), project__slug=slug, number=number
    )


class ModelVersionListView(ListAPIView):
    """GET: the model versions of a project with their metrics, newest first (cursor-paginated)."""

    permission_classes = [IsProjectAdmin]
    serializer_class = ModelVersionSerializer
    pagination_class = cursor_pagination("-number", page_size=50)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no URL kwargs
            return self.serializer_class.Meta.model.objects.none()
        project = get_object_or_404(Project, slug=self.kwargs["slug"])
        return project.model_versions.select_related("run__dataset_version")


class ModelVersionPromoteView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(
        request=None,
        parameters=[
            OpenApiParameter(
                "confirm_drop",
                bool,
                description="Promote even when the version is worse than the active one on the same test split",
            )
        ],
        responses={
            200: ModelVersionSerializer,
            202: ModelVersionSerializer,
            409: OpenApiResponse(description="worse than the active version on the same test split (promote_worse)"),
        },
        summary="Promote (or roll back to) a version: 200 when active now, 202 while its index builds",
    )
    def post(self, request, slug, number):
        raw = request.query_params.get("confirm_drop") or (
            request.data.get("confirm_drop") if hasattr(request.data, "get") else None
        )
        confirm = str(raw).lower() in ("1", "true", "yes")
        try:
            version = chain.model_version_promote(
                version=_version(slug, number), user=request.user, confirm_drop=confirm
            )
        except chain.PromoteNeedsConfirmation as exc:
            raise ApiError(
                f"{exc} Send confirm_drop=true to promote it anyway.",
                code="promote_worse",
                details=exc.gate,
                status_code=409,
            ) from None
        return Response(ModelVersionSerializer(version).data, status=200 if version.is_active else 202)


class TrainingRunCancelView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(
        request=None,
        responses={200: OpenApiResponse(description="{id, status, cancel_requested}: cancelled, or stopping")},
        summary="Cancel a training run: a queued one at once, a running one at its next progress report",
    )
    def post(self, request, slug, run_id):
        run = get_object_or_404(TrainingRun, project__slug=slug, pk=run_id)
        try:
            run = services.training_run_cancel(run=run, user=request.user)
        except services.TrainingError as exc:
            raise ApiError(str(exc), code="not_active", status_code=409) from None
        return Response({"id": run.id, "status": run.status, "cancel_requested": run.cancel_requested_at is not None})


class ModelVersionCompareView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(
        parameters=[OpenApiParameter("a", int, required=True), OpenApiParameter("b", int, required=True)],
        responses=OpenApiResponse(description="top-1/top-5 per head of both versions on the same test images"),
        summary="Compare two versions on the same frozen test split (the newer version's)",
    )
    def get(self, request, slug):
        try:
            a_num, b_num = int(request.query_params["a"]), int(request.query_params["b"])
        except (KeyError, ValueError):
            raise ApiError("Pass two version numbers: ?a=1&b=2.", code="bad_request") from None
        try:
            out = evaluation.model_versions_compare(a=_version(slug, a_num), b=_version(slug, b_num))
        except ValueError as exc:
            raise ApiError(str(exc), code="no_test_split") from None
        return Response(out)


class ModelVersionFileView(APIView):
    permission_classes = [IsProjectAdmin]
    content_negotiation_class = IgnoreAccept

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "name",
                str,
                OpenApiParameter.PATH,
                description="model.onnx, label_maps.json, report.md, curves.png, confusion_<head>.png or "
                "reliability_<head>.png (no other name is served)",
            )
        ],
        responses={
            (200, "application/octet-stream"): OpenApiResponse(description="The file (downloads as an attachment)"),
            404: OpenApiResponse(description="Not one of the allowed names, or this version has no such file"),
        },
        summary="Download a model version's file: the ONNX model, its label maps, the evaluation report or a plot",
    )
    def get(self, request, slug, number, name):
        found = selectors.model_version_file(version=_version(slug, number), name=name)
        if found is None:
            raise NotFound(
                f"v{number} has no file {name!r}; allowed: model.onnx, label_maps.json, report.md, "
                "curves.png, confusion_<head>.png, reliability_<head>.png."
            )
        path, content_type, attachment = found
        return FileResponse(path.open("rb"), content_type=content_type, as_attachment=attachment, filename=name)


class JobSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=list(pipeline_jobs.TYPES), help_text="trainingrun, healthreport or job")
    id = serializers.IntegerField()
    what = serializers.CharField(help_text="training run, health scan, index build, mislabel queue refresh, ...")
    status = serializers.ChoiceField(choices=JobStatus.choices)
    step = serializers.CharField(allow_blank=True)
    progress = serializers.FloatField(allow_null=True, help_text="0..1 while running, when the job can tell")
    eta_s = serializers.FloatField(allow_null=True, help_text="seconds left (running jobs)")
    queue = serializers.CharField(help_text="the Celery queue: gpu (long jobs) or default (short ones)")
    ahead = serializers.IntegerField(allow_null=True, help_text="jobs of any project that run before a queued one")
    wait_s = serializers.FloatField(allow_null=True, help_text="for a queued job: the longest ETA of those running")
    error = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    cancel_requested = serializers.BooleanField()


class ModelVersionMobileExportView(APIView):
    """Queue the TFLite export of a version (a classifier's model.tflite, checked with the LiteRT runtime against
    model.onnx; a detector's detector.tflite, against the torch detector on its own photos); the job is in GET
    jobs/, the file at files/model.tflite or files/detector.tflite when it is done. 409 without artifacts."""

    permission_classes = [IsProjectAdmin]

    @extend_schema(request=None, responses={202: JobSerializer}, summary="Export a version for mobile (TFLite)")
    def post(self, request, slug, number):
        try:
            job = chain.model_version_mobile_export(version=_version(slug, number), user=request.user)
        except services.TrainingError as exc:
            raise ApiError(str(exc), code="not_exportable", status_code=409) from None
        return Response(JobSerializer(describe(job)).data, status=202)


class JobListView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(
        responses=JobSerializer(many=True),
        summary="Background jobs of a project: every queued and running one, then the latest ended ones",
    )
    def get(self, request, slug):
        project = get_object_or_404(Project, slug=slug)
        return Response(JobSerializer(pipeline_jobs.project_jobs(project=project), many=True).data)


class JobCancelView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(
        request=None,
        responses={200: JobSerializer},
        summary="Cancel any background job: a queued one at once, a running one at its next progress report",
    )
    def post(self, request, slug, type_, pk):
        project = get_object_or_404(Project, slug=slug)
        try:
            row = pipeline_jobs.job_cancel_any(project=project, type_=type_, pk=pk, user=request.user)
        except pipeline_jobs.JobNotFound as exc:
            raise NotFound(str(exc)) from None
        except JobError as exc:
            raise ApiError(str(exc), code="not_active", status_code=409) from None
        return Response(JobSerializer(describe(row)).data)


# -------------------------------------------------------------------------------------------- training runs
class TrainingRunSerializer(serializers.ModelSerializer):
    dataset_version = serializers.IntegerField(source="dataset_version.number", default=None)
    model_version = serializers.SerializerMethodField()
    progress = serializers.FloatField(read_only=True, allow_null=True)
    evaluated_on = serializers.CharField(read_only=True)
    created_by = serializers.CharField(source="created_by.username", default=None)
    queue = serializers.SerializerMethodField(help_text="where a queued or running run stands (queue, jobs ahead)")

    class Meta:
        model = TrainingRun
        fields = [
            "id",
            "status",
            "config",
            "dataset_version",
            "epoch",
            "epochs",
            "step",
            "steps_per_epoch",
            "progress",
            "loss",
            "metrics",
            "evaluated_on",
            "eta_s",
            "n_train",
            "n_val",
            "pretrained_source",
            "pretrained_detail",
            "attempts",
            "error",
            "model_version",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
            "queue",
        ]

    def get_model_version(self, obj) -> int | None:
        version = getattr(obj, "model_version", None)
        return version.number if version is not None else None

    def get_queue(self, obj) -> dict | None:
        if not obj.is_active:
            return None
        info = describe(obj)
        return {k: info[k] for k in ("queue", "ahead", "wait_s")}


class TrainingRunCreateSerializer(serializers.Serializer):
    quick = serializers.BooleanField(
        required=False, default=False, help_text="heads only, on cached frozen features (seconds once warm)"
    )
    config = serializers.DictField(required=False, default=dict, help_text="engine config overrides, e.g. {epochs: 5}")
    dataset_version = serializers.IntegerField(
        required=False, allow_null=True, default=None, help_text="train on this frozen version (default: freeze now)"
    )


class TrainingRunListView(ListAPIView):
    """GET: the project's training runs, newest first (cursor-paginated). POST: start one — a full fine-tune with
    the preset's recipe, or quick, with config overrides; the data is frozen first (a new dataset version, or the
    latest when nothing changed). 409 while another run of the project is queued or running."""

    permission_classes = [IsProjectAdmin]
    serializer_class = TrainingRunSerializer

    pagination_class = cursor_pagination("-id", page_size=50, max_page_size=500)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no URL kwargs
            return self.serializer_class.Meta.model.objects.none()
        project = get_object_or_404(Project, slug=self.kwargs["slug"])
        return project.training_runs.select_related("dataset_version", "model_version", "created_by")

    @extend_schema(request=TrainingRunCreateSerializer, responses={202: TrainingRunSerializer})
    def post(self, request, slug):
        project = get_object_or_404(Project, slug=slug)
        ser = TrainingRunCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        config = {**data["config"], **({"quick": True} if data["quick"] else {})}
        dataset_version = None
        if data["dataset_version"] is not None:
            dataset_version = project.dataset_versions.filter(number=data["dataset_version"]).first()
            if dataset_version is None:
                raise ApiError(
                    f"Project {slug!r} has no dataset version {data['dataset_version']}.",
                    code="not_found",
                    status_code=404,
                )
        try:
            run = services.training_run_create(
                project=project, user=request.user, config=config, dataset_version=dataset_version
            )
        except services.TrainingError as exc:
            busy = "already queued or running" in str(exc)
            raise ApiError(str(exc), code="busy" if busy else "invalid", status_code=409 if busy else 400) from None
        return Response(TrainingRunSerializer(run).data, status=202)


class TrainingRunDetailView(APIView):
    permission_classes = [IsProjectAdmin]

    @extend_schema(responses=TrainingRunSerializer, summary="One training run: status, progress, ETA, metrics")
    def get(self, request, slug, run_id):
        run = get_object_or_404(
            TrainingRun.objects.select_related("dataset_version", "created_by"), project__slug=slug, pk=run_id
        )
        return Response(TrainingRunSerializer(run).data)
