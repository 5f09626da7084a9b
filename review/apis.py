"""The review queues over REST (issue 17.1; the shelf seed's active-learning API): the next item with a lease,
resolve, undo, statistics. Anyone who sees the project reviews; every error has the one error shape."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from labeling.access import IsProjectMember
from labeling.boxes import BoxConflict
from labeling.models import BoxSet, Label, Project
from labeling.services import LabelConflict
from webapp.errors import ApiError

from . import selectors, services
from .models import ReviewItem
from .stats import reviewer_stats


def _queue(queue: str) -> str:
    if queue not in ReviewItem.Queue.values:
        raise ApiError(
            f"No review queue {queue!r} (queues: {', '.join(ReviewItem.Queue.values)}).",
            code="not_found",
            status_code=404,
        )
    return queue


class ReviewItemSerializer(serializers.ModelSerializer):
    image_id = serializers.IntegerField()
    head = serializers.CharField(source="head.name")
    given = serializers.CharField(source="given_class.name", default=None)
    given_class_id = serializers.IntegerField(allow_null=True)
    suggested = serializers.CharField(source="suggested_class.name", default=None)
    suggested_class_id = serializers.IntegerField(allow_null=True)
    label_version = serializers.SerializerMethodField(
        help_text="the label's version (shelf box items: the box set's) you saw: send it back with the decision "
        "(stale: 409)"
    )
    thumbnail_url = serializers.SerializerMethodField()

    class Meta:
        model = ReviewItem
        fields = [
            "id",
            "queue",
            "image_id",
            "head",
            "given",
            "given_class_id",
            "suggested",
            "suggested_class_id",
            "suggested_prob",
            "score",
            "rank",
            "top_k",
            "model_version",
            "status",
            "resolution",
            "lease_until",
            "label_version",
            "thumbnail_url",
        ]

    def get_label_version(self, obj) -> int | None:
        if obj.queue == ReviewItem.Queue.BOXES:  # the box set's version (0: never saved by a person)
            box_set = BoxSet.objects.filter(image_id=obj.image_id, head_id=obj.head_id)
            return box_set.values_list("version", flat=True).first() or 0
        return (
            Label.objects.filter(image_id=obj.image_id, head_id=obj.head_id).values_list("version", flat=True).first()
        )

    def get_thumbnail_url(self, obj) -> str:
        from django.urls import reverse

        return reverse("labeling:image-file", args=[obj.project.slug, obj.image_id, "thumb"])


class QueueNextView(APIView):
    """The caller's next item of a queue, leased to them for LOUPE_REVIEW_LEASE_SECONDS (asking again returns the
    same item while the lease holds); 204 when the queue has nothing open for them."""

    permission_classes = [IsProjectMember]

    @extend_schema(
        request=None, responses={200: ReviewItemSerializer, 204: OpenApiResponse(description="nothing to review")}
    )
    def post(self, request, slug, queue):
        project = get_object_or_404(Project, slug=slug)
        item = services.queue_next(project=project, queue=_queue(queue), user=request.user)
        if item is None:
            return Response(status=204)
        return Response(ReviewItemSerializer(item).data)


class ResolveSerializer(serializers.Serializer):
    action = serializers.ChoiceField(
        choices=list(services.ACTIONS),
        help_text="label items: accept, keep, relabel, exclude, skip; shelf box items: accept (every suggestion), "
        "done (the boxes as saved), exclude, skip",
    )
    class_id = serializers.IntegerField(required=False, allow_null=True, help_text="for relabel")
    version = serializers.IntegerField(required=False, allow_null=True, help_text="the label_version you saw")


class ItemResolveView(APIView):
    """Decide an item: accept the suggestion, keep the given label, relabel to class_id, exclude the photo or
    skip. A stale label_version is 409 with the current label; an item another reviewer holds is 409 too."""

    permission_classes = [IsProjectMember]

    @extend_schema(request=ResolveSerializer, responses={200: ReviewItemSerializer})
    def post(self, request, slug, queue, item_id):
        item = get_object_or_404(ReviewItem, project__slug=slug, queue=_queue(queue), pk=item_id)
        ser = ResolveSerializer(data=request.data)
        ser.is_valid(raise_exception=True)
        data = ser.validated_data
        try:
            done = services.item_resolve(
                item=item,
                user=request.user,
                action=data["action"],
                class_id=data.get("class_id"),
                expected_version=data.get("version"),
            )
        except BoxConflict as exc:
            raise ApiError(
                str(exc), code="stale_version", status_code=409, details={"current": {"version": exc.current.version}}
            ) from None
        except LabelConflict as exc:
            current = exc.current
            raise ApiError(
                str(exc),
                code="stale_version",
                status_code=409,
                details={
                    "current": {
                        "class_id": current.label_class_id,
                        "label": current.label_class.name if current.label_class_id else None,
                        "version": current.version,
                    }
                },
            ) from None
        except services.ReviewError as exc:
            taken = "holds this item" in str(exc) or "already reviewed" in str(exc)  # another reviewer was first
            raise ApiError(
                str(exc), code="conflict" if taken else "invalid", status_code=409 if taken else 400
            ) from None
        return Response(ReviewItemSerializer(done).data)


class UndoView(APIView):
    """Undo the caller's last decision in the queue: the label goes back (unless someone changed it since: 409)
    and the item is open and leased to them again; 204 when there is nothing to undo."""

    permission_classes = [IsProjectMember]

    @extend_schema(request=None, responses={200: ReviewItemSerializer, 204: OpenApiResponse(description="nothing")})
    def post(self, request, slug, queue):
        project = get_object_or_404(Project, slug=slug)
        try:
            item = services.item_undo(user=request.user, project=project, queue=_queue(queue))
        except LabelConflict as exc:
            raise ApiError(str(exc), code="stale_version", status_code=409) from None
        except services.ReviewError as exc:  # e.g. the boxes changed since the decision
            raise ApiError(str(exc), code="conflict", status_code=409) from None
        if item is None:
            return Response(status=204)
        return Response(ReviewItemSerializer(item).data)


class StatsView(APIView):
    """Queue sizes by status and, per reviewer, decisions, agreement with the model and second looks."""

    permission_classes = [IsProjectMember]

    @extend_schema(responses=OpenApiResponse(description="{queues: {queue: {status: n}}, reviewers: [...]}"))
    def get(self, request, slug):
        project = get_object_or_404(Project, slug=slug)
        rows = reviewer_stats(project=project)
        return Response({"queues": selectors.queue_counts(project=project), "reviewers": rows})
