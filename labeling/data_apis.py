"""The labeling side of the loop over REST (issue 17.1): projects (create from a preset or with their own heads,
read, settings), heads and classes, images (list with the grid's filters, read with labels and history, exclude)
and labels (set with the version the client saw: 409 with the current value when stale). Reviewers read and label;
project admins change the project. Lists are cursor-paginated; every error has the one error shape."""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

import django_filters
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Q
from django.shortcuts import get_object_or_404
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import ListAPIView
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.errors import ApiError
from webapp.pagination import cursor_pagination

from . import boxes, formats, health, import_jobs, importers, services
from .access import ADMIN, IsProjectMember, api_role, visible_projects
from .models import (
    BoxEvent,
    BoxSet,
    GroupSplit,
    Head,
    Image,
    ImageEvent,
    ImportRun,
    Label,
    LabelClass,
    LabelEvent,
    Project,
)
from .presets import PRESET_CHOICES

IdCursorPagination = cursor_pagination("id")


def _project(slug: str) -> Project:
    return get_object_or_404(Project, slug=slug)


def _head(project: Project, name: str) -> Head:
    head = project.heads.filter(name=name).first()
    if head is None:
        names = ", ".join(project.heads.values_list("name", flat=True))
        raise ApiError(
            f"Project {project.slug!r} has no head {name!r} (heads: {names}).", code="not_found", status_code=404
        )
    return head


# --------------------------------------------------------------------------------------------------- projects
class HeadSerializer(serializers.ModelSerializer):
    parent = serializers.CharField(source="parent.name", default=None)
    classes = serializers.IntegerField(source="n_classes", read_only=True)

    class Meta:
        model = Head
        fields = ["name", "kind", "parent", "optional", "threshold", "classes"]


class ProjectSerializer(serializers.ModelSerializer):
    heads = serializers.SerializerMethodField()
    image_count = serializers.SerializerMethodField()
    sku_project = serializers.SlugRelatedField(
        slug_field="slug", read_only=True, help_text="a shelf project's SKU project (names each box's SKU)"
    )

    class Meta:
        model = Project
        fields = [
            "slug",
            "name",
            "preset",
            "description",
            "heads",
            "image_count",
            "sku_project",
            "created_at",
            *services.SETTINGS_FIELDS,
        ]
        read_only_fields = fields

    def get_image_count(self, obj) -> int:
        n = getattr(obj, "n_images", None)
        return obj.images.count() if n is None else n

    def get_heads(self, obj) -> list[dict]:
        heads = obj.heads.select_related("parent").annotate(
            n_classes=Count("classes", filter=Q(classes__merged_into=None))
        )
        return HeadSerializer(heads.order_by("order", "id"), many=True).data


class HeadSpecSerializer(serializers.Serializer):
    name = serializers.CharField()
    parent = serializers.CharField(required=False, allow_null=True, default=None)
    optional = serializers.BooleanField(required=False, default=False)
    kind = serializers.ChoiceField(
        choices=Head.Kind.choices, required=False, default="class", help_text="detection: boxes instead of a label"
    )


class ClassSpecSerializer(serializers.Serializer):
    head = serializers.CharField()
    name = serializers.CharField()
    parent = serializers.CharField(required=False, allow_null=True, default=None)


class ProjectCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    preset = serializers.ChoiceField(
        choices=PRESET_CHOICES, help_text="the heads (unless given) and the training recipe"
    )
    slug = serializers.SlugField(required=False, max_length=100)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    heads = HeadSpecSerializer(many=True, required=False, help_text="own heads instead of the preset's")
    classes = ClassSpecSerializer(many=True, required=False, help_text="classes to start with")
    sku_project = serializers.SlugField(
        required=False, allow_null=True, default=None, help_text="a shelf project's SKU project (its slug)"
    )


class ProjectListView(ListAPIView):
    """GET: the projects the user sees. POST (site admins): a new project from a preset, or with its own heads."""

    permission_classes = [IsProjectMember]
    pagination_class = IdCursorPagination
    serializer_class = ProjectSerializer

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no URL kwargs
            return self.serializer_class.Meta.model.objects.none()
        return visible_projects(self.request.user).annotate(n_images=Count("images", distinct=True))

    @extend_schema(request=ProjectCreateSerializer, responses={201: ProjectSerializer})
    def post(self, request):
        if not request.user.is_staff:
            raise PermissionDenied("Only site admins create projects.")
        ser = ProjectCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        heads = self._heads(data["heads"]) if "heads" in data else None  # the home page's rules: one parser
        try:
            classes = [(c["head"], c["name"], c["parent"]) for c in data.get("classes", [])]
            if classes:
                text = "\n".join(f"{h}: {n}{f' < {p}' if p else ''}" for h, n, p in classes)
                classes = services.parse_classes(
                    text, heads or [{"parent": None, **h} for h in _preset(data["preset"])]
                )
            project = services.project_create(
                name=data["name"],
                preset=data["preset"],
                slug=data.get("slug"),
                description=data["description"],
                heads=heads,
                classes=classes,
                sku_project=self._sku_project(request, data["sku_project"]),
            )
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        return Response(ProjectSerializer(project).data, status=status.HTTP_201_CREATED)

    @staticmethod
    def _heads(specs: list[dict]) -> list[dict]:
        lines = [
            f"{s['name']}{'?' if s['optional'] else ''}{' < ' + s['parent'] if s['parent'] else ''}" for s in specs
        ]
        try:
            heads = services.parse_heads("\n".join(lines))
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        for head, spec in zip(heads, specs, strict=True):
            if spec["kind"] == Head.Kind.DETECTION and spec["parent"]:
                raise ApiError(f"Head {spec['name']!r}: a detection head has no parent head.", code="invalid")
            head["kind"] = spec["kind"]
        return heads

    @staticmethod
    def _sku_project(request, slug: str | None) -> Project | None:
        if slug is None:
            return None
        project = visible_projects(request.user).filter(slug=slug).first()
        if project is None:
            raise ApiError(f"No project {slug!r} to name the boxes' SKUs.", code="invalid")
        return project


def _preset(preset: str) -> list[dict]:
    from .presets import PRESETS

    return PRESETS[preset]


class ProjectSettingsSerializer(serializers.Serializer):
    heads = serializers.DictField(
        child=serializers.DictField(), required=False, help_text='{"model": {"threshold": 0.7, "optional": false}}'
    )


class ProjectDetailView(APIView):
    """GET: a project with its heads and settings. PATCH (project admins): change settings — any of the project
    fields listed in the answer and `heads` {name: {threshold, optional}} — as one undoable action."""

    permission_classes = [IsProjectMember]

    @extend_schema(responses=ProjectSerializer)
    def get(self, request, slug):
        return Response(ProjectSerializer(_project(slug)).data)

    @extend_schema(request=ProjectSettingsSerializer, responses=ProjectSerializer)
    def patch(self, request, slug):
        if api_role(request, self) != ADMIN:
            raise PermissionDenied("Only admins of this project can change its settings.")
        if not isinstance(request.data, dict):
            raise ApiError("Send a JSON object of settings.", code="invalid")
        values = {k: v for k, v in request.data.items() if k != "heads"}
        try:
            services.project_settings_update(
                project=_project(slug), values=values, heads=request.data.get("heads"), user=request.user
            )
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        return Response(ProjectSerializer(_project(slug)).data)


# ----------------------------------------------------------------------------------------------- classes
class LabelClassSerializer(serializers.ModelSerializer):
    parent = serializers.CharField(source="parent.name", default=None)
    images = serializers.IntegerField(source="n_images", read_only=True, default=None)

    class Meta:
        model = LabelClass
        fields = ["id", "name", "parent", "aliases", "excluded_from_training", "images"]


class ClassCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    parent = serializers.CharField(required=False, allow_null=True, default=None, help_text="the parent head's class")


class ClassListView(ListAPIView):
    """GET: a head's classes (merged ones left out), cursor-paginated. POST (project admins): a new class (an
    existing spelling returns the class it means, with 200)."""

    permission_classes = [IsProjectMember]
    serializer_class = LabelClassSerializer
    pagination_class = IdCursorPagination

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no URL kwargs
            return self.serializer_class.Meta.model.objects.none()
        head = _head(_project(self.kwargs["slug"]), self.kwargs["head"])
        qs = head.classes.filter(merged_into=None).select_related("parent")
        return qs.annotate(n_images=Count("label", distinct=True))

    @extend_schema(request=ClassCreateSerializer, responses={201: LabelClassSerializer, 200: LabelClassSerializer})
    def post(self, request, slug, head):
        if api_role(request, self) != ADMIN:
            raise PermissionDenied("Only admins of this project can create classes.")
        head = _head(_project(slug), head)
        ser = ClassCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        parent_name = ser.validated_data["parent"]
        if bool(head.parent_id) != bool(parent_name):
            need = f"the {head.parent.name} it belongs to in 'parent'" if head.parent_id else "no 'parent'"
            raise ApiError(f"Head {head.name!r} takes {need}.", code="invalid")
        try:
            with transaction.atomic():
                parent = None
                if parent_name:
                    parent = head.parent.classes.filter(name=parent_name, merged_into=None).first()
                    if parent is None:
                        raise services.LabelingError(f"{head.parent.name} {parent_name!r} does not exist.")
                cls, created = services.label_class_get_or_create(
                    head=head, raw_name=ser.validated_data["name"], parent=parent
                )
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        return Response(LabelClassSerializer(cls).data, status=201 if created else 200)


# ------------------------------------------------------------------------------------------------ images
class ImageFilter(django_filters.FilterSet):
    """The image grid's filters: ?head=&class_id=&unlabeled=&split=&source=&status=."""

    head = django_filters.CharFilter(method="_noop", help_text="with unlabeled: unlabeled for this head")
    class_id = django_filters.NumberFilter(method="_class", help_text="labeled with this class (any head)")
    unlabeled = django_filters.BooleanFilter(method="_unlabeled", help_text="unlabeled for `head` (or any head)")
    split = django_filters.ChoiceFilter(
        method="_split", choices=[(s, s) for s in ("train", "val", "test")], help_text="the group's sticky split"
    )
    source = django_filters.ChoiceFilter(choices=Image.Source.choices)
    status = django_filters.ChoiceFilter(choices=Image.Status.choices)

    class Meta:
        model = Image
        fields = ["source", "status"]

    def _noop(self, qs, name, value):
        return qs

    def _class(self, qs, name, value):
        return qs.filter(labels__label_class_id=value)

    def _unlabeled(self, qs, name, value):
        if not value:
            return qs
        missing = Label.objects.filter(image=OuterRef("pk"), label_class__isnull=True)
        head_name = self.data.get("head")
        if head_name:
            missing = missing.filter(head__name=head_name)
        return qs.filter(Exists(missing))

    def _split(self, qs, name, value):
        splits = GroupSplit.objects.filter(
            project_id=OuterRef("project_id"), group_key=OuterRef("group_key"), split=value
        )
        return qs.filter(Exists(splits))


class LabelSerializer(serializers.ModelSerializer):
    head = serializers.CharField(source="head.name")
    class_id = serializers.IntegerField(source="label_class_id", allow_null=True)
    label = serializers.CharField(source="label_class.name", default=None)
    updated_by = serializers.CharField(source="updated_by.username", default=None)

    class Meta:
        model = Label
        fields = ["head", "class_id", "label", "version", "updated_at", "updated_by"]


class ImageSerializer(serializers.ModelSerializer):
    labels = serializers.SerializerMethodField()
    thumbnail_url = serializers.SerializerMethodField()

    class Meta:
        model = Image
        fields = [
            "id",
            "original_name",
            "group_key",
            "source",
            "status",
            "status_reason",
            "width",
            "height",
            "sha256",
            "created_at",
            "labels",
            "thumbnail_url",
        ]

    def get_labels(self, obj) -> list[dict]:
        labels = sorted(obj.labels.all(), key=lambda lb: (lb.head.order, lb.head_id))
        return LabelSerializer(labels, many=True).data

    def get_thumbnail_url(self, obj) -> str:
        from django.urls import reverse

        return reverse("labeling:image-file", args=[obj.project.slug, obj.id, "thumb"])


class ImageListView(ListAPIView):
    """The project's images with the grid's filters, cursor-paginated (?page_size= up to 1000)."""

    permission_classes = [IsProjectMember]
    serializer_class = ImageSerializer
    pagination_class = IdCursorPagination
    filter_backends = [DjangoFilterBackend]
    filterset_class = ImageFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no URL kwargs
            return self.serializer_class.Meta.model.objects.none()
        project = _project(self.kwargs["slug"])
        labels = Label.objects.select_related("head", "label_class", "updated_by")
        from django.db.models import Prefetch

        return (
            Image.objects.filter(project=project)
            .select_related("project")
            .prefetch_related(Prefetch("labels", queryset=labels))
        )


class ImageDetailSerializer(ImageSerializer):
    history = serializers.SerializerMethodField()

    class Meta(ImageSerializer.Meta):
        fields = [*ImageSerializer.Meta.fields, "history"]

    def get_history(self, obj) -> list[dict]:
        events = LabelEvent.objects.filter(image=obj).select_related("head", "old_class", "new_class", "user")
        out = [
            {
                "at": e.created_at,
                "head": e.head.name,
                "old": e.old_class.name if e.old_class_id else None,
                "new": e.new_class.name if e.new_class_id else None,
                "user": e.user.username if e.user_id else None,
                "reason": e.reason,
            }
            for e in events.order_by("-created_at", "-id")[:100]
        ]
        box_events = BoxEvent.objects.filter(box_set__image=obj).select_related("box_set__head", "user")
        out += [
            {
                "at": e.created_at,
                "head": e.box_set.head.name,
                "boxes": [len(e.old), len(e.new)],
                "version": e.version,
                "user": e.user.username if e.user_id else None,
                "reason": e.reason,
            }
            for e in box_events.order_by("-created_at", "-id")[:100]
        ]
        statuses = ImageEvent.objects.filter(image=obj).select_related("user").order_by("-created_at", "-id")[:100]
        out += [
            {
                "at": e.created_at,
                "status": [e.old_status, e.new_status],
                "user": e.user.username if e.user_id else None,
                "reason": e.reason,
            }
            for e in statuses
        ]
        return sorted(out, key=lambda e: e["at"], reverse=True)


class ImageExcludeSerializer(serializers.Serializer):
    excluded = serializers.BooleanField(help_text="true: leave the photo out of training and review; false: back in")
    reason = serializers.CharField(required=False, allow_blank=True, default="")


class ImageDetailView(APIView):
    """GET: one image with its labels (with the version to send back when setting one) and its history.
    PATCH {"excluded": true|false}: leave a bad photo out of training (project admins and reviewers)."""

    permission_classes = [IsProjectMember]

    def _image(self, slug: str, pk: int) -> Image:
        return get_object_or_404(Image.objects.select_related("project"), project__slug=slug, pk=pk)

    @extend_schema(responses=ImageDetailSerializer)
    def get(self, request, slug, pk):
        return Response(ImageDetailSerializer(self._image(slug, pk)).data)

    @extend_schema(request=ImageExcludeSerializer, responses=ImageDetailSerializer)
    def patch(self, request, slug, pk):
        image = self._image(slug, pk)
        ser = ImageExcludeSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        try:
            services.image_exclude(
                image=image,
                excluded=ser.validated_data["excluded"],
                reason=ser.validated_data["reason"],
                user=request.user,
            )
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        return Response(ImageDetailSerializer(self._image(slug, pk)).data)


class LabelSetSerializer(serializers.Serializer):
    class_id = serializers.IntegerField(required=False, allow_null=True, help_text="null: unlabeled")
    label = serializers.CharField(required=False, help_text="or the class by name (or an alias)")
    version = serializers.IntegerField(help_text="the label's version the client saw (GET the image)")


class LabelView(APIView):
    """PUT: set one head's label of an image, with the version the client saw. A stale version is 409 with the
    current label (nothing overwritten); an unknown class is 400 naming the head."""

    permission_classes = [IsProjectMember]

    @extend_schema(request=LabelSetSerializer, responses={200: LabelSerializer, 409: LabelSerializer})
    def put(self, request, slug, pk, head):
        image = get_object_or_404(Image, project__slug=slug, pk=pk)
        head = _head(image.project, head)
        if head.kind == Head.Kind.DETECTION:
            raise ApiError(
                f"{head.name} is a detection head: PUT its boxes at …/images/{pk}/boxes/{head.name}/.", code="invalid"
            )
        ser = LabelSetSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        class_id = data.get("class_id")
        if "label" in data:
            cls = head.classes.filter(Q(name=data["label"]) | Q(aliases__contains=[data["label"]])).first()
            if cls is None:
                raise ApiError(f"{head.name} has no class {data['label']!r}.", code="invalid")
            class_id = (cls.merged_into or cls).id
        label = Label.objects.filter(image=image, head=head).first()
        if label is None:
            services.image_labels_ensure(image=image)
            label = Label.objects.get(image=image, head=head)
        try:
            change = services.label_set(
                label_id=label.id, class_id=class_id, expected_version=data["version"], user=request.user, reason="api"
            )
        except services.LabelConflict as exc:
            current = Label.objects.select_related("head", "label_class", "updated_by").get(pk=exc.current.pk)
            raise ApiError(
                str(exc), code="stale_version", status_code=409, details={"current": LabelSerializer(current).data}
            ) from None
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        label = Label.objects.select_related("head", "label_class", "updated_by").get(pk=change.label.pk)
        return Response(LabelSerializer(label).data)


# ------------------------------------------------------------------------------------------------ boxes
class BoxSerializer(serializers.Serializer):
    x = serializers.FloatField(help_text="left edge, pixels from the image's left")
    y = serializers.FloatField(help_text="top edge, pixels from the image's top")
    w = serializers.FloatField(help_text="width in pixels (> 0)")
    h = serializers.FloatField(help_text="height in pixels (> 0)")
    class_id = serializers.IntegerField(help_text="a class of the detection head")
    label = serializers.CharField(read_only=True, help_text="the class's name")
    # a CharField (the service checks it): a second enum named "source" beside Image's would need a schema override
    source = serializers.CharField(required=False, default="human", help_text="human or model")
    score = serializers.FloatField(required=False, allow_null=True, default=None, help_text="a model's confidence")


class BoxSetSerializer(serializers.Serializer):
    image = serializers.IntegerField()
    head = serializers.CharField()
    version = serializers.IntegerField(help_text="send it back with a PUT; 0 = never set")
    updated_at = serializers.DateTimeField(allow_null=True)
    updated_by = serializers.CharField(allow_null=True)
    boxes = BoxSerializer(many=True)


class BoxSetPutSerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=0, help_text="the version the client saw (GET), 0 for a new set")
    boxes = BoxSerializer(many=True, max_length=boxes.MAX_BOXES, help_text="the whole set: it replaces the current")


def _box_set_data(image: Image, head: Head, box_set: BoxSet | None) -> dict:
    saved = box_set is not None and box_set.pk is not None and box_set.version > 0
    # A set nobody saved yet (version 0) may hold the detector's suggestions (shelf recognition keeps them for
    # review, inference.shelf): shown, still version 0, so the first save replaces them and they are never labels.
    exists = box_set is not None and box_set.pk is not None
    rows = list(box_set.boxes.select_related("label_class")) if exists else []
    return {
        "image": image.id,
        "head": head.name,
        "version": box_set.version if saved else 0,
        "updated_at": box_set.updated_at if saved else None,
        "updated_by": box_set.updated_by.username if saved and box_set.updated_by_id else None,
        "boxes": [
            {
                "x": b.x,
                "y": b.y,
                "w": b.w,
                "h": b.h,
                "class_id": b.label_class_id,
                "label": b.label_class.name,
                "source": b.source,
                "score": b.score,
            }
            for b in rows
        ],
    }


def _image_and_detection_head(slug: str, pk: int, head: str) -> tuple[Image, Head]:
    image = get_object_or_404(Image.objects.select_related("project"), project__slug=slug, pk=pk)
    head = _head(image.project, head)
    if head.kind != Head.Kind.DETECTION:
        raise ApiError(
            f"{head.name} is a class head: set its label at …/images/{pk}/labels/{head.name}/.", code="invalid"
        )
    return image, head


class BoxSetView(APIView):
    """GET: the boxes of one image for a detection head (x, y, w, h in image pixels) with the version to send back.
    PUT: replace the whole set with the version the client saw: a stale version is 409 with the current set
    (nothing overwritten); a box outside the image, w or h ≤ 0 or a class not of the head is 400 naming the box.
    Each change is one entry of the project's action log (undo: POST …/undo/)."""

    permission_classes = [IsProjectMember]

    @extend_schema(responses=BoxSetSerializer)
    def get(self, request, slug, pk, head):
        image, head = _image_and_detection_head(slug, pk, head)
        return Response(_box_set_data(image, head, BoxSet.objects.filter(image=image, head=head).first()))

    @extend_schema(request=BoxSetPutSerializer, responses={200: BoxSetSerializer, 409: BoxSetSerializer})
    def put(self, request, slug, pk, head):
        image, head = _image_and_detection_head(slug, pk, head)
        ser = BoxSetPutSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        items = [{k: b[k] for k in ("x", "y", "w", "h", "class_id", "source", "score")} for b in data["boxes"]]
        try:
            change = boxes.box_set(
                image=image, head=head, boxes=items, expected_version=data["version"], user=request.user, reason="api"
            )
        except boxes.BoxConflict as exc:
            current = BoxSet.objects.filter(image=image, head=head).first()
            raise ApiError(
                str(exc),
                code="stale_version",
                status_code=409,
                details={"current": _box_set_data(image, head, current)},
            ) from exc
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        return Response(_box_set_data(image, head, BoxSet.objects.get(pk=change.box_set.pk)))


class BoxUndoView(APIView):
    """POST: undo the last change of this image's boxes for the head (refused while a later change stands)."""

    permission_classes = [IsProjectMember]

    @extend_schema(request=None, responses=BoxSetSerializer)
    def post(self, request, slug, pk, head):
        image, head = _image_and_detection_head(slug, pk, head)
        try:
            boxes.box_set_undo(image=image, head=head, user=request.user)
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid", status_code=409) from None
        return Response(_box_set_data(image, head, BoxSet.objects.filter(image=image, head=head).first()))


class BoxImportSerializer(serializers.Serializer):
    folder = serializers.CharField(help_text="a YOLO or COCO folder under the server's IMPORT_ROOTS")
    format = serializers.ChoiceField(choices=[(f, f) for f in boxes.FORMATS])
    head = serializers.CharField(required=False, allow_null=True, default=None, help_text="the detection head")


class BoxImportResultSerializer(serializers.Serializer):
    written = serializers.BooleanField()
    created = serializers.IntegerField(help_text="new photos")
    existing = serializers.IntegerField(help_text="photos already in the project")
    boxes = serializers.IntegerField()
    classes_created = serializers.IntegerField()
    warnings = serializers.ListField(child=serializers.CharField())


class BoxImportView(APIView):
    """POST (project admins): import a YOLO or COCO folder from the server's IMPORT_ROOTS — the photos, the class
    list (new names become classes of the detection head) and every photo's boxes; train/val/test folders become
    sticky splits. All or nothing: any bad line is 400 listing every problem with its file and line."""

    permission_classes = [IsProjectMember]

    @extend_schema(request=BoxImportSerializer, responses=BoxImportResultSerializer)
    def post(self, request, slug):
        if api_role(request, self) != ADMIN:
            raise PermissionDenied("Only admins of this project can import.")
        ser = BoxImportSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        try:
            report = boxes.boxes_import(
                project=_project(slug),
                folder=Path(data["folder"]),
                format=data["format"],
                head=data["head"],
                user=request.user,
                allowed_roots=list(settings.IMPORT_ROOTS),
            )
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        if not report.written:
            errors = [f"{w}: {m}" for w, m in report.errors]
            raise ApiError(
                f"Nothing was imported: {len(errors)} problem(s), first: {errors[0] if errors else 'unknown'}",
                code="invalid",
                details={"errors": errors},
            )
        return Response(
            {
                "written": True,
                "created": report.created,
                "existing": report.existing,
                "boxes": report.labels_set,
                "classes_created": report.classes_created,
                "warnings": [f"{w}: {m}" for w, m in report.warnings],
            }
        )


# ------------------------------------------------------------------------------------------------ upload
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")


def _check_upload(name: str, data: bytes) -> str | None:
    """The recognition endpoint's checks on one uploaded photo: size, format (sniffed, not the name), pixel
    count from the header, and that it decodes; None when it passes, else what is wrong."""
    if not data:
        return "empty file"
    if len(data) > settings.LOUPE_MAX_IMAGE_BYTES:
        return f"{len(data) / 2**20:.1f} MiB, more than the {settings.LOUPE_MAX_IMAGE_BYTES / 2**20:.0f} MiB limit"
    try:
        with PILImage.open(io.BytesIO(data), formats=list(UPLOAD_FORMATS)) as img:
            pixels = img.size[0] * img.size[1]
            if pixels > settings.LOUPE_MAX_IMAGE_PIXELS:
                return f"{img.size[0]}×{img.size[1]} is more than {settings.LOUPE_MAX_IMAGE_PIXELS:,} pixels"
            img.draft("RGB", (64, 64))
            img.load()
    except UnidentifiedImageError:
        return f"not a {', '.join(UPLOAD_FORMATS)} image"
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        return f"damaged image ({exc})"
    return None


class ImageUploadView(APIView):
    """POST multipart (project admins): one or many photos in `images`, optional `group` (default: from the file
    name, <ID>_<seq>) and labels as `label.<head>` fields (class names; new ones are created, as an import
    does). Every file is checked like a recognition photo (size, format, pixel count, decodes); one bad file
    refuses the request and nothing is written. 201 {"created": [ids], "existing": [ids], "report": [...]}."""

    permission_classes = [IsProjectMember]
    parser_classes = [MultiPartParser]

    @extend_schema(
        request={
            "multipart/form-data": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "group": {"type": "string"},
                },
            }
        },
        responses={201: dict},
    )
    def post(self, request, slug):
        if api_role(request, self) != ADMIN:
            raise PermissionDenied("Only admins of this project can add photos.")
        project = _project(slug)
        files = request.FILES.getlist("images")
        if not files:
            raise ApiError("Send one or more photos as multipart field 'images'.", code="invalid")
        if len(files) > settings.DATA_UPLOAD_MAX_NUMBER_FILES:
            raise ApiError(f"At most {settings.DATA_UPLOAD_MAX_NUMBER_FILES} photos per request.", code="invalid")
        heads = set(project.heads.values_list("name", flat=True))
        labels = {k.split(".", 1)[1]: v for k, v in request.data.items() if k.startswith("label.")}
        unknown = sorted(set(labels) - heads)
        if unknown:
            raise ApiError(
                f"No head {', '.join(map(repr, unknown))} (heads: {', '.join(sorted(heads))}).", code="invalid"
            )
        group = str(request.data.get("group", "")).strip()[:200]
        problems, shas = [], []
        with tempfile.TemporaryDirectory() as tmp:
            rows = []
            for i, f in enumerate(files):
                name = Path(f.name or f"upload-{i}.jpg").name or f"upload-{i}.jpg"
                data = f.read()
                why = _check_upload(name, data)
                if why:
                    problems.append(f"{name}: {why}")
                    continue
                path = Path(tmp) / f"{i:03d}" / name  # its own folder: two uploads may share a name
                path.parent.mkdir()
                path.write_bytes(data)
                shas.append(hashlib.sha256(data).hexdigest())
                rows.append(
                    importers.ImportRow(
                        where=name,
                        path=path,
                        labels={h: labels.get(h) for h in heads},
                        group=group or formats.group_from_name(name),
                        root=Path(tmp),
                        group_from="column" if group else "name",
                    )
                )
            if problems:
                raise ApiError("Nothing was added: " + "; ".join(problems) + ".", code="invalid")
            before = set(Image.objects.filter(project=project, sha256__in=shas).values_list("id", flat=True))
            report = importers.images_import(
                project=project, rows=rows, report=importers.ImportReport(), user=request.user, group_by="name"
            )
        if not report.written:
            raise ApiError("Nothing was added: " + "; ".join(f"{w}: {m}" for w, m in report.errors) + ".")
        ids = list(Image.objects.filter(project=project, sha256__in=shas).order_by("id").values_list("id", flat=True))
        return Response(
            {"created": [i for i in ids if i not in before], "existing": sorted(before), "report": report.lines()},
            status=201,
        )


class BulkImageSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    version = serializers.IntegerField(help_text="the label version the client saw for this head")


class BulkLabelSerializer(serializers.Serializer):
    head = serializers.CharField()
    class_id = serializers.IntegerField(required=False, allow_null=True, help_text="null: clear the labels")
    label = serializers.CharField(required=False, help_text="or the class by name")
    images = BulkImageSerializer(many=True, min_length=1, max_length=10_000)
    preview = serializers.BooleanField(required=False, default=False, help_text="say what would change; change nothing")


class BulkLabelView(APIView):
    """POST: set one head's label of many images to one class as one undoable action (the grid's bulk relabel).
    With "preview": true, nothing changes: the answer says how many would change, how many are already that class
    and which are stale. Labels changed since the client read them are left alone and listed as stale."""

    permission_classes = [IsProjectMember]

    @extend_schema(request=BulkLabelSerializer, responses={200: dict})
    def post(self, request, slug):
        project = _project(slug)
        ser = BulkLabelSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        head = _head(project, data["head"])
        class_id = data.get("class_id")
        if "label" in data:
            cls = head.classes.filter(name=data["label"], merged_into=None).first()
            if cls is None:
                raise ApiError(f"{head.name} has no class {data['label']!r}.", code="invalid")
            class_id = cls.id
        elif "class_id" not in data:
            raise ApiError("Give class_id (null clears the labels) or label.", code="invalid")
        if class_id is not None and not head.classes.filter(pk=class_id, merged_into=None).exists():
            raise ApiError(f"Class {class_id} is not a class of head {head.name!r}.", code="invalid")
        expected = {im["id"]: im["version"] for im in data["images"]}
        labels = {
            lb.image_id: lb for lb in Label.objects.filter(head=head, image__project=project, image_id__in=expected)
        }
        missing = sorted(set(expected) - set(labels))
        if missing:
            raise ApiError(f"Not images of {project.slug!r}: {missing[:20]}.", code="not_found", status_code=404)
        stale = sorted(i for i, lb in labels.items() if lb.version != expected[i])
        if data["preview"]:
            fresh = [lb for i, lb in labels.items() if i not in stale]
            same = sum(1 for lb in fresh if lb.label_class_id == class_id)
            return Response({"would_change": len(fresh) - same, "unchanged": same, "stale": stale})
        try:
            out = health.labels_bulk_set(head=head, class_id=class_id, expected=expected, user=request.user)
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        action = out["action"]
        return Response({"changed": out["changed"], "stale": out["stale"], "action": action.id if action else None})


class ClassUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(required=False, max_length=200, help_text="rename (the old name becomes an alias)")
    add_aliases = serializers.ListField(child=serializers.CharField(max_length=200), required=False, max_length=100)
    merge_into = serializers.IntegerField(
        required=False, help_text="merge this class into that one of the same head (labels move; undoable)"
    )


class ClassDetailView(APIView):
    """PATCH (project admins): rename a class, add aliases, or merge it into another class of its head (its
    labels, child classes and spellings move there, as one undoable action on the Health page)."""

    permission_classes = [IsProjectMember]

    @extend_schema(request=ClassUpdateSerializer, responses=LabelClassSerializer)
    def patch(self, request, slug, head, class_id):
        if api_role(request, self) != ADMIN:
            raise PermissionDenied("Only admins of this project can change classes.")
        head = _head(_project(slug), head)
        cls = get_object_or_404(LabelClass, head=head, pk=class_id)
        ser = ClassUpdateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        try:
            if "merge_into" in data:
                if set(data) - {"merge_into"}:
                    raise services.LabelingError("A merge takes merge_into alone; rename or add aliases separately.")
                target = get_object_or_404(LabelClass, head=head, pk=data["merge_into"])
                health.classes_merge(source=cls, target=target, user=request.user)
                cls = target
            else:
                cls = services.label_class_update(cls=cls, name=data.get("name"), add_aliases=data.get("add_aliases"))
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        cls = LabelClass.objects.select_related("parent").get(pk=cls.pk)
        return Response(LabelClassSerializer(cls).data)


class HeadListView(APIView):
    """GET: the project's heads. POST (project admins): add a head {"name", "parent"?, "optional"?}; every photo
    gets an unlabeled label for it (one entry of the action log, undoable while nothing is labeled for it)."""

    permission_classes = [IsProjectMember]

    @extend_schema(responses=HeadSerializer(many=True))
    def get(self, request, slug):
        return Response(ProjectSerializer().get_heads(_project(slug)))

    @extend_schema(request=HeadSpecSerializer, responses={201: HeadSerializer})
    def post(self, request, slug):
        if api_role(request, self) != ADMIN:
            raise PermissionDenied("Only admins of this project can add heads.")
        ser = HeadSpecSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        try:
            head = services.head_create(
                project=_project(slug),
                name=data["name"],
                parent=data["parent"],
                optional=data["optional"],
                kind=data["kind"],
                user=request.user,
            )
        except services.LabelingError as exc:
            raise ApiError(str(exc), code="invalid") from None
        head = Head.objects.select_related("parent").annotate(n_classes=Count("classes")).get(pk=head.pk)
        return Response(HeadSerializer(head).data, status=201)


class ImportRunSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", default=None)
    progress = serializers.FloatField(read_only=True, allow_null=True)

    class Meta:
        model = ImportRun
        fields = [
            "id",
            "mode",
            "params",
            "status",
            "step",
            "done",
            "total",
            "progress",
            "report",
            "error",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]


class ImportRunCreateSerializer(serializers.Serializer):
    mode = serializers.ChoiceField(choices=ImportRun.Mode.choices)
    folder = serializers.CharField(help_text="the images folder, under the server's IMPORT_ROOTS")
    csv = serializers.CharField(required=False, help_text="csv mode: the CSV file, under IMPORT_ROOTS")
    head_cols = serializers.DictField(child=serializers.CharField(), required=False, help_text="{head: column}")
    filename_col = serializers.CharField(required=False, default="image_filename")
    group_col = serializers.CharField(required=False, allow_null=True, default=None)
    source_col = serializers.CharField(required=False, allow_null=True, default=None)
    class_head = serializers.CharField(required=False, allow_null=True, default=None)
    group_by = serializers.ChoiceField(choices=list(importers.GROUP_BY), required=False, default="auto")
    update = serializers.BooleanField(required=False, default=False)
    skip_bad_rows = serializers.BooleanField(required=False, default=False)
    format = serializers.ChoiceField(
        choices=[(f, f) for f in boxes.FORMATS], required=False, help_text="boxes mode: yolo or coco"
    )
    head = serializers.CharField(
        required=False,
        allow_null=True,
        default=None,
        help_text="boxes mode: the detection head (default: the only one)",
    )


class ImportRunListView(ListAPIView):
    """GET: the project's import jobs, newest first. POST (project admins): queue an import of a server folder
    (folder, CSV, export, placeholder) as a background job — any size, written in batches, progress here and on the
    Jobs page, cancel with POST …/jobs/importrun/<id>/cancel/; a failed or cancelled import leaves nothing."""

    permission_classes = [IsProjectMember]
    serializer_class = ImportRunSerializer
    pagination_class = cursor_pagination("-id", page_size=50)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ImportRun.objects.none()
        return _project(self.kwargs["slug"]).import_runs.select_related("created_by")

    @extend_schema(request=ImportRunCreateSerializer, responses={202: ImportRunSerializer})
    def post(self, request, slug):
        if api_role(request, self) != ADMIN:
            raise PermissionDenied("Only admins of this project can import.")
        ser = ImportRunCreateSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        params = {**ser.validated_data, "restrict_roots": True}
        mode = params.pop("mode")
        try:
            with transaction.atomic():
                run = import_jobs.import_run_create(project=_project(slug), mode=mode, params=params, user=request.user)
        except services.LabelingError as exc:
            busy = "already queued or running" in str(exc)
            raise ApiError(str(exc), code="busy" if busy else "invalid", status_code=409 if busy else 400) from None
        return Response(ImportRunSerializer(run).data, status=202)
