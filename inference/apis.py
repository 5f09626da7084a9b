"""REST recognition endpoint: 1..10 photos of one object in, labels per head out."""

import base64
import binascii

from django.conf import settings
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from labeling import storage
from labeling.access import IsProjectMember
from labeling.models import Image as ImageRow
from labeling.models import Label
from webapp.errors import ApiError, JSONParser
from webapp.throttling import PublicIPRateThrottle

from . import services, shelf
from .decode import ImageError, decode_image, decoded_size, oriented_size, sniff_media_type
from .recognizer import ModelUnavailable
from .serializers import (
    ErrorSerializer,
    RecognizeJsonSerializer,
    RecognizeResponseSerializer,
    ShelfJsonSerializer,
    ShelfResponseSerializer,
)
from .shelf_core import ANNOTATE_MAX_SIDE, annotate

DECODE_SIDE = 512  # the models never need more than ~512 px: photos are decoded / reduced to about this
SHELF_DECODE_SIDE = 1024  # a shelf photo's boxes are small: decoded at a shorter side of >= ~1024 px


def _decode_all(blobs: list[bytes], *, side: int = DECODE_SIDE) -> list:
    """Decode every photo (JPEGs at reduced size, PNG/WebP reduced right after decoding) or refuse the request
    naming the bad one. The pixels to decode, summed over the photos, are read from the headers first and
    checked against LOUPE_MAX_REQUEST_PIXELS: PNG and WebP cannot be decoded at a reduced size, so ten large
    ones would otherwise take gigabytes."""
    limit = settings.LOUPE_MAX_IMAGE_PIXELS
    sizes = []
    for i, data in enumerate(blobs, start=1):
        try:
            sizes.append(decoded_size(data, max_pixels=limit, max_side_hint=side))
        except ImageError as exc:
            raise ApiError(f"image {i}: {exc}", code="bad_image") from None
    _check_request_pixels(sizes)
    images = []
    for i, data in enumerate(blobs, start=1):
        try:
            images.append(decode_image(data, max_pixels=limit, max_side_hint=side))
        except ImageError as exc:
            raise ApiError(f"image {i}: {exc}", code="bad_image") from None
    return images


def _check_request_pixels(sizes: list[tuple[int, int]]) -> None:
    budget = settings.LOUPE_MAX_REQUEST_PIXELS
    total = sum(w * h for w, h in sizes)
    if total <= budget:
        return
    per_image = ", ".join(f"{w}x{h}" for w, h in sizes)
    raise ApiError(
        f"The {len(sizes)} photos add up to {total / 1e6:.1f} megapixels to decode; the limit is "
        f"{budget / 1e6:g} megapixels per request (LOUPE_MAX_REQUEST_PIXELS). PNG and WebP are decoded at full "
        "size (JPEG at a reduced scale): send JPEGs, fewer photos, or photos resized to about 1000 px per side.",
        code="too_many_pixels",
        details={"pixels": total, "limit": budget, "sizes": per_image},
        status_code=413,
    )


def _size_text(n: int) -> str:
    """Bytes in MiB, to the precision that tells a size just over the limit from the limit."""
    mib = n / 2**20
    return f"{mib:g} MiB" if mib == round(mib, 1) else f"{mib:.1f} MiB ({n:,} bytes)"


def _too_large(i: int, size: int) -> ApiError:
    limit = settings.LOUPE_MAX_IMAGE_BYTES
    return ApiError(
        f"image {i} is {_size_text(size)}; the limit is {_size_text(limit)} per image (LOUPE_MAX_IMAGE_BYTES). "
        "Send a smaller file (a JPEG of the photo).",
        code="image_too_large",
        details={"image": i, "bytes": size, "limit_bytes": limit},
        status_code=413,
    )


def _b64decode(i: int, text: str) -> bytes:
    """Standard base64; whitespace and line breaks are ignored (the `base64` tool wraps at 76 columns). The
    common case (no whitespace) takes one strict C pass."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        compact = "".join(text.split())
        if compact != text:
            try:
                return base64.b64decode(compact, validate=True)
            except (binascii.Error, ValueError):
                pass
    raise ApiError(
        f"image {i}: 'data' is not valid base64: use the standard alphabet (A-Z a-z 0-9 + /) with '=' padding; "
        "whitespace and line breaks are ignored, a data: URL prefix is accepted.",
        code="bad_base64",
    )


MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")


def _json_images(data, max_n: int) -> list[dict]:
    """The JSON body's images, checked by hand: RecognizeJsonSerializer documents the shape, but running DRF's
    serializer machinery on every request costs more than decoding the photo (bench/serving.py)."""
    if not isinstance(data, dict) or "images" not in data:
        raise ApiError(
            'The body needs an "images" list.', code="invalid", details={"images": ["This field is required."]}
        )
    items = data["images"]
    if not isinstance(items, list):
        raise ApiError('"images" must be a list of {"data", "media_type"} objects.', code="invalid")
    if len(items) > max_n:
        raise ApiError(f"Send at most {max_n} images per request (got {len(items)}).", code="too_many_images")
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise ApiError(f'image {i}: expected an object {{"data", "media_type"}}.', code="invalid")
        if not isinstance(item.get("data"), str) or not item["data"]:
            raise ApiError(f"image {i}: 'data' must be a non-empty base64 string.", code="invalid")
        if item.get("media_type") not in MEDIA_TYPES:
            raise ApiError(
                f"image {i}: media_type must be one of {', '.join(MEDIA_TYPES)} (got {item.get('media_type')!r}).",
                code="invalid",
            )
    return items


def _collect_images(request, *, single: bool = False) -> list[bytes]:
    """The request's photos (multipart field `images`, or JSON {"images": [{"data", "media_type"}]}), size-checked.
    single: exactly one photo, also as multipart field `image` or JSON {"image": {"data", "media_type"}}."""
    max_n = 1 if single else settings.LOUPE_MAX_IMAGES_PER_REQUEST
    blobs: list[bytes] = []
    body = request.data
    if request.content_type and request.content_type.startswith("multipart/"):
        files = request.FILES.getlist("images")
        if single:
            files = request.FILES.getlist("image") + files
        if len(files) > max_n:
            raise ApiError(f"Send at most {max_n} images per request (got {len(files)}).", code="too_many_images")
        for i, f in enumerate(files, start=1):
            if f.size > settings.LOUPE_MAX_IMAGE_BYTES:
                raise _too_large(i, f.size)
            blobs.append(f.read())
    else:
        if single and isinstance(body, dict) and "image" in body and "images" not in body:
            body = {"images": [body["image"]]}
        items = _json_images(body, max_n)
        for i, item in enumerate(items, start=1):
            text = item["data"].strip()
            if text.startswith("data:") and "," in text:
                text = text.split(",", 1)[1]  # tolerate a data: URL prefix
            if len(text) * 3 // 4 > 2 * settings.LOUPE_MAX_IMAGE_BYTES:  # far too large: do not even decode
                raise _too_large(i, len(text) * 3 // 4)
            data = _b64decode(i, text)
            if len(data) > settings.LOUPE_MAX_IMAGE_BYTES:
                raise _too_large(i, len(data))
            actual = sniff_media_type(data)
            if actual is not None and actual != item["media_type"]:
                raise ApiError(
                    f"image {i}: media_type says {item['media_type']} but the data is {actual}.",
                    code="media_type_mismatch",
                )
            blobs.append(data)
    if single and len(blobs) > 1:
        raise ApiError(f"Send one photo of the shelf (got {len(blobs)}).", code="too_many_images")
    if not blobs:
        what = (
            'Send one photo: multipart field \'image\', or JSON {"image": {"data", "media_type"}}.'
            if single
            else 'Send 1 to 10 images: multipart field \'images\', or JSON {"images": [{"data", "media_type"}]}.'
        )
        raise ApiError(what, code="no_images")
    return blobs


def _active_model(ctx: services.ServingContext) -> services.Served:
    try:
        return services.active_model(project_id=ctx.project_id)
    except services.NoActiveModel as exc:
        raise ApiError(str(exc), code="no_active_model", status_code=409) from exc
    except ModelUnavailable as exc:  # nothing valid to serve (a previous good version would have been kept)
        raise ApiError(str(exc), code=exc.code, details=exc.problems or None, status_code=503) from None


def _project_context(request, slug: str) -> services.ServingContext:
    """The project's serving context; 404 for an unknown project and for a members-only project the caller is not
    a member of (open projects need no query here: the hot path)."""
    try:
        ctx = services.serving_context(slug=slug)
    except services.NoProject as exc:
        raise ApiError(str(exc), code="not_found", status_code=404) from None
    if ctx.members_only and not request.user.is_staff:
        from labeling.models import ProjectMember  # noqa: PLC0415

        if not ProjectMember.objects.filter(project_id=ctx.project_id, user=request.user).exists():
            raise ApiError(f"No project {slug!r}.", code="not_found", status_code=404)
    return ctx


COMBINE_MODES = ("mean", "vote", "geometric")
MAX_NEIGHBOURS = 20
RECOGNITION_MODES = ("softmax", "retrieval", "fusion")


class RecognizeView(APIView):
    parser_classes = [JSONParser, MultiPartParser]

    @extend_schema(
        request={
            "application/json": RecognizeJsonSerializer,
            "multipart/form-data": {
                "type": "object",
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            },
        },
        responses={
            200: RecognizeResponseSerializer,
            400: ErrorSerializer,
            404: ErrorSerializer,
            409: ErrorSerializer,
            413: ErrorSerializer,
            503: ErrorSerializer,
        },
        parameters=[
            OpenApiParameter(
                "mode",
                str,
                enum=list(RECOGNITION_MODES),
                description="softmax (the classifier, default), retrieval (vote of the nearest gallery photos, "
                "with calibrated rejection) or fusion (both)",
            ),
            OpenApiParameter(
                "neighbours",
                int,
                description=f"also return this many nearest gallery photos (0-{MAX_NEIGHBOURS}, default 0) with their "
                "current labels and thumbnail links",
            ),
            OpenApiParameter(
                "combine",
                str,
                enum=list(COMBINE_MODES),
                description="how the photos' probabilities combine: mean (default), vote or geometric; vote needs "
                "3 photos or more (with fewer, mean is used: the answer's `combine` says which)",
            ),
        ],
        description="Recognise one object from 1-10 photos. Per head: the label (null when the combined confidence "
        "is below the head's threshold), the confidence and the top-k; plus the nearest gallery images.",
    )
    def post(self, request, slug: str):
        ctx = _project_context(request, slug)
        if ctx.detection_heads and len(ctx.detection_heads) == len(ctx.thresholds):
            raise ApiError(
                f"Project {slug!r} has only detection heads (a shelf project): POST /api/v1/projects/{slug}/shelf "
                "recognises its photos.",
                code="shelf_project",
            )
        combine = request.query_params.get("combine", settings.LOUPE_COMBINE_VIEWS)
        if combine not in COMBINE_MODES:
            raise ApiError(f"combine must be one of {', '.join(COMBINE_MODES)} (got {combine!r}).", code="bad_combine")
        mode = request.query_params.get("mode", settings.LOUPE_RECOGNITION_MODE)
        if mode not in RECOGNITION_MODES:
            raise ApiError(f"mode must be one of {', '.join(RECOGNITION_MODES)} (got {mode!r}).", code="bad_mode")
        raw = request.query_params.get("neighbours", "0")
        if not raw.isdigit() or int(raw) > MAX_NEIGHBOURS:
            raise ApiError(
                f"neighbours must be a whole number 0-{MAX_NEIGHBOURS} (got {raw!r}).", code="bad_neighbours"
            )
        n_neighbours = int(raw)
        blobs = _collect_images(request)
        images = _decode_all(blobs)
        served = _active_model(ctx)
        if (mode != "softmax" or n_neighbours) and served.recognizer.gallery_labels is None:
            raise ApiError(
                f"{'mode ' + repr(mode) if mode != 'softmax' else 'neighbours'} needs the model's gallery; "
                "promote the version again to build it.",
                code="no_gallery",
                status_code=409,
            )
        thresholds = ctx.thresholds
        result = served.recognizer.recognize(
            images, thresholds=thresholds, top_k=5, neighbours=n_neighbours, combine=combine, mode=mode
        )
        services.recognition_keep(project=ctx, served=served, blobs=blobs, result=result, mode=mode, user=request.user)
        if n_neighbours:
            result["neighbours"] = _neighbour_details(ctx, result["neighbours"])
        body = {"model_version": served.number, "runtime": served.recognizer.runtime, "n_images": len(images), **result}
        return Response(body, status=status.HTTP_200_OK)


def _neighbour_details(ctx: services.ServingContext, neighbours: list[dict]) -> list[dict]:
    """Current labels and thumbnail links of the nearest gallery images, in one query."""
    ids = [n["image_id"] for n in neighbours]
    labels: dict[int, dict[str, str | None]] = {}
    rows = Label.objects.filter(image__project_id=ctx.project_id, image_id__in=ids).values_list(
        "image_id", "head__name", "label_class__name"
    )
    for image_id, head, cls in rows:
        labels.setdefault(image_id, {})[head] = cls
    out = []
    for n in neighbours:
        if n["image_id"] not in labels:
            continue  # deleted since the index was built
        out.append(
            {
                "image_id": n["image_id"],
                "score": round(float(n["score"]), 4),
                "labels": labels[n["image_id"]],
                "thumbnail_url": reverse("labeling:image-file", args=[ctx.slug, n["image_id"], "thumb"]),
            }
        )
    return out


class CarDetectResponseSerializer(serializers.Serializer):
    make = serializers.CharField(allow_null=True, help_text="null when its confidence is below the threshold (0.6)")
    model = serializers.CharField(allow_null=True, help_text="null when its confidence is below the threshold")
    confidence = serializers.FloatField(allow_null=True, help_text="of the model when given, else of the make")
    error = serializers.CharField(allow_null=True, help_text="null on success; what went wrong otherwise")


class CarDetectView(APIView):
    """The car seed's endpoint, same contract: 4-10 photos of one car in, make/model/confidence/error out.
    The project it serves is settings.LOUPE_CAR_PROJECT; every error keeps the contract's shape."""

    parser_classes = [JSONParser]

    def get_permissions(self):
        if settings.LOUPE_CAR_ENDPOINT_PUBLIC:  # the operator opted in: no token, a budget per client IP
            return [AllowAny()]
        return super().get_permissions()

    def get_throttles(self):
        throttles = super().get_throttles()
        if settings.LOUPE_CAR_ENDPOINT_PUBLIC:
            throttles.append(PublicIPRateThrottle())
        return throttles

    @extend_schema(
        request=RecognizeJsonSerializer,
        responses={
            200: CarDetectResponseSerializer,
            400: CarDetectResponseSerializer,
            409: CarDetectResponseSerializer,
            503: CarDetectResponseSerializer,
        },
        description="Recognise a car's make and model from 4-10 photos (JSON base64). A field is null when its "
        "confidence is below LOUPE_CAR_THRESHOLD (0.6); `error` says what went wrong (HTTP 4xx/5xx).",
    )
    def post(self, request):
        slug = settings.LOUPE_CAR_PROJECT
        try:
            ctx = services.serving_context(slug=slug)
        except services.NoProject:
            raise ApiError(
                f"The car endpoint serves project {slug!r} (LOUPE_CAR_PROJECT), which does not exist.",
                code="not_configured",
                status_code=503,
            ) from None
        if not {"make", "model"} <= set(ctx.thresholds):
            raise ApiError(f"Project {slug!r} has no make and model heads.", code="not_configured", status_code=503)
        items = request.data.get("images") if isinstance(request.data, dict) else None
        lo, hi = settings.LOUPE_CAR_MIN_IMAGES, settings.LOUPE_MAX_IMAGES_PER_REQUEST
        if not isinstance(items, list) or not lo <= len(items) <= hi:
            got = len(items) if isinstance(items, list) else "no 'images' list"
            raise ApiError(f"Send {lo} to {hi} photos of one car in 'images' (got {got}).", code="image_count")
        blobs = _collect_images(request)
        images = _decode_all(blobs)
        served = _active_model(ctx)
        thr = settings.LOUPE_CAR_THRESHOLD
        result = served.recognizer.recognize(
            images, thresholds={"make": thr, "model": thr}, neighbours=0, combine=settings.LOUPE_COMBINE_VIEWS
        )["heads"]
        make, model = result["make"], result["model"]
        confidence = model["confidence"] if model["label"] is not None else make["confidence"]
        return Response({"make": make["label"], "model": model["label"], "confidence": confidence, "error": None})

    def handle_exception(self, exc):
        response = super().handle_exception(exc)  # the one error shape: {"error": {"code", "message", ...}}
        error = response.data.get("error") if isinstance(response.data, dict) else None
        message = error.get("message") if isinstance(error, dict) else str(response.data)
        response.data = {"make": None, "model": None, "confidence": None, "error": message}
        return response


class ImagePredictionView(APIView):
    """GET: what the active model says of one of the project's photos — per head its label (or null below the
    head's threshold, with the reason), confidence and top 5, beside the photo's current labels — as the review
    pages show it. 409 when no model is promoted; an unreadable photo is a 409 naming it."""

    permission_classes = [IsProjectMember]

    @extend_schema(responses={200: RecognizeResponseSerializer, 409: ErrorSerializer})
    def get(self, request, slug: str, pk: int):
        image = get_object_or_404(ImageRow, project__slug=slug, pk=pk)
        ctx = services.serving_context(slug=slug)
        served = _active_model(ctx)
        try:
            with open(storage.local_path(image.file), "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ApiError(f"Image {pk}'s file cannot be read ({exc}).", code="unreadable", status_code=409) from None
        try:
            decoded = _decode_all([data])
        except ApiError:
            raise ApiError(
                f"Image {pk} is not a readable photo ({image.status}).", code="unreadable", status_code=409
            ) from None
        result = served.recognizer.recognize(decoded, thresholds=ctx.thresholds, top_k=5, neighbours=0)
        body = {"model_version": served.number, "runtime": served.recognizer.runtime, "n_images": 1, **result}
        return Response(body)


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class ShelfView(APIView):
    """Shelf recognition: one photo of a shelf in, every container's box, class and SKU and the counts per SKU out
    (or, with ?annotate=1, the photo with the boxes drawn). See inference.shelf."""

    parser_classes = [JSONParser, MultiPartParser]

    @extend_schema(
        request={
            "application/json": ShelfJsonSerializer,
            "multipart/form-data": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
            },
        },
        responses={
            (200, "application/json"): ShelfResponseSerializer,
            (200, "image/jpeg"): OpenApiTypes.BINARY,
            400: ErrorSerializer,
            404: ErrorSerializer,
            409: ErrorSerializer,
            413: ErrorSerializer,
            503: ErrorSerializer,
        },
        parameters=[
            OpenApiParameter(
                "annotate",
                bool,
                description="1: answer with the photo as a JPEG (at most "
                f"{ANNOTATE_MAX_SIDE} px a side) with every box drawn and named instead of JSON",
            ),
            OpenApiParameter(
                "mode",
                str,
                enum=list(RECOGNITION_MODES),
                description="how the SKU model names each box, as for /recognize (default: the server's "
                "LOUPE_RECOGNITION_MODE)",
            ),
        ],
        description="Recognise a shelf: one photo (multipart `image`, or JSON base64 as for /recognize) of a shelf "
        "project (a detection head; its SKU project names the boxes). Per box: its pixels, container class and "
        "score, its SKU (null label when rejected, with the reason) or null when there is no SKU model (`note` "
        "says why); counts per SKU, `unknown` (boxes without a SKU) and per container class. Boxes below the "
        "detector's score threshold are not returned; a photo with none answers 200 with no boxes.",
    )
    def post(self, request, slug: str):
        ctx = _project_context(request, slug)
        try:
            head = shelf.check_shelf_project(ctx)
        except shelf.NotAShelfProject as exc:
            raise ApiError(str(exc), code="not_a_shelf_project") from None
        raw = request.query_params.get("annotate", "0").lower()
        if raw not in TRUE + FALSE:
            raise ApiError(f"annotate must be 1 or 0 (got {raw!r}).", code="bad_annotate")
        mode = request.query_params.get("mode", settings.LOUPE_RECOGNITION_MODE)
        if mode not in RECOGNITION_MODES:
            raise ApiError(f"mode must be one of {', '.join(RECOGNITION_MODES)} (got {mode!r}).", code="bad_mode")
        blobs = _collect_images(request, single=True)
        image = _decode_all(blobs, side=SHELF_DECODE_SIDE)[0]
        size = oriented_size(blobs[0], max_pixels=settings.LOUPE_MAX_IMAGE_PIXELS)  # checked by _decode_all
        scale = (size[0] / image.width, size[1] / image.height)
        detector = _active_detector(ctx)
        try:
            result = shelf.shelf_recognize(ctx=ctx, detector=detector, image=image, scale=scale, mode=mode)
        except shelf.NoGallery as exc:
            raise ApiError(str(exc), code="no_gallery", status_code=409) from None
        shelf.shelf_keep(
            ctx=ctx,
            head=head,
            detector=detector,
            result=result,
            photo=blobs[0],
            photo_size=size,
            mode=mode,
            user=request.user,
        )
        if raw in TRUE:
            return HttpResponse(annotate(image, result.body["boxes"], scale=scale), content_type="image/jpeg")
        return Response(result.body, status=status.HTTP_200_OK)


def _active_detector(ctx: services.ServingContext) -> services.Served:
    try:
        return services.active_detector(project_id=ctx.project_id)
    except services.NoActiveModel:
        raise ApiError(
            f"Shelf project {ctx.slug!r} has no promoted detector yet: train one and promote it.",
            code="no_active_model",
            status_code=409,
        ) from None
    except ModelUnavailable as exc:
        raise ApiError(str(exc), code=exc.code, details=exc.problems or None, status_code=503) from None
