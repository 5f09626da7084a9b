"""Shelf recognition (issue 18): a shelf project's active detector finds every container in one photo, the SKU
project's active model names each crop (one batched call, the same decision and rejection as a single photo), and
the answer counts them per SKU. Low-confidence results go to the review queues when the projects keep photos.

Serving never fails for want of SKUs: with no SKU project, or one with no servable model, the boxes come back with
`sku` null and a `note` saying why (the detector's answer is still useful: containers and their counts)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction

from labeling import storage

from . import services
from .recognizer import ModelUnavailable
from .shelf_core import crop_boxes, shelf_boxes, shelf_counts

log = logging.getLogger("inference.shelf")

# Set by review (its AppConfig.ready; review sits above inference and is never imported here): queues a kept shelf
# photo for a box review, inside shelf_keep's transaction. Called with image, head, lowest_score, model_version.
box_review_hook: Callable | None = None
MAX_KEPT_CROPS = 20  # rejected SKU crops kept per shelf photo (the least confident first): the queue stays bounded


class NotAShelfProject(ValueError):
    pass


class NoGallery(ValueError):
    pass


@dataclass
class SkuModel:
    """The SKU side of a shelf recognition: the SKU project's serving context and active model, or why there is
    none (`note`)."""

    ctx: services.ServingContext | None = None
    served: services.Served | None = None
    head: str | None = None
    note: str | None = None


@dataclass
class ShelfResult:
    body: dict  # the endpoint's JSON answer
    detections: list  # inference.detector.Detection, in pixels of the decoded photo
    crops: list  # PIL crops, one per detection
    sku_results: list  # recognize_each's answers, one per detection ([] without an SKU model)
    sku: SkuModel


def check_shelf_project(ctx: services.ServingContext) -> str:
    """The project's detection head (the first one); NotAShelfProject naming the project otherwise."""
    if not ctx.detection_heads:
        raise NotAShelfProject(
            f"Project {ctx.slug!r} has no detection head, so it is not a shelf project: shelf recognition needs a "
            "project created with the shelf preset (POST /recognize recognises one object of a class project)."
        )
    return ctx.detection_heads[0]


def sku_model_for(ctx: services.ServingContext) -> SkuModel:
    """The shelf project's SKU model, or a SkuModel with only a note saying why there is none."""
    if ctx.sku_project is None:
        return SkuModel(
            note=f"Project {ctx.slug!r} has no SKU project: boxes carry no SKU (set its SKU project in the project's "
            "settings)."
        )
    try:
        sku_ctx = services.serving_context(slug=ctx.sku_project)
        served = services.active_model(project_id=sku_ctx.project_id)
    except services.NoProject:
        return SkuModel(note=f"SKU project {ctx.sku_project!r} does not exist: boxes carry no SKU.")
    except services.NoActiveModel:
        return SkuModel(
            ctx=sku_ctx,
            note=f"SKU project {ctx.sku_project!r} has no promoted model yet: boxes carry no SKU (train and promote "
            "one).",
        )
    except ModelUnavailable as exc:
        log.error("shelf %s: the SKU model cannot be served: %s", ctx.slug, exc)
        return SkuModel(ctx=sku_ctx, note=f"SKU project {ctx.sku_project!r}: {exc} Boxes carry no SKU meanwhile.")
    heads = served.recognizer.heads
    return SkuModel(ctx=sku_ctx, served=served, head="sku" if "sku" in heads else heads[0])


def shelf_recognize(
    *, ctx: services.ServingContext, detector: services.Served, image, scale: tuple[float, float], mode: str
) -> ShelfResult:
    """Detect, crop, name and count (no writes). `image` is the decoded photo, `scale` = (sx, sy) maps its pixels to
    the uploaded photo's (the answer's boxes are in the uploaded photo's pixels). NoGallery when `mode` needs the
    SKU model's gallery and it has none."""
    sku = sku_model_for(ctx)
    detections = detector.detector.detect(image)
    crops = crop_boxes(image, detections)
    sku_results: list[dict] = []
    skus: list[dict | None] = [None] * len(detections)
    if sku.served is not None:
        rec = sku.served.recognizer
        if mode != "softmax" and rec.gallery_labels is None:
            raise NoGallery(
                f"mode {mode!r} needs the SKU model's gallery; promote SKU project {ctx.sku_project!r}'s version "
                "again to build it."
            )
        if crops:
            sku_results = rec.recognize_each(crops, thresholds=sku.ctx.thresholds, top_k=1, mode=mode)
        skus = [
            {
                "label": r["heads"][sku.head]["label"],
                "confidence": round(r["heads"][sku.head]["confidence"], 4),
                "reason": r["heads"][sku.head]["reason"],
            }
            for r in sku_results
        ]
    boxes = shelf_boxes(detections, skus, scale=scale)
    body = {
        "detector": {
            "model_version": detector.number,
            "runtime": detector.detector.runtime,
            "score_threshold": detector.detector.score_threshold,
        },
        "sku_model": None
        if sku.served is None
        else {
            "project": sku.ctx.slug,
            "model_version": sku.served.number,
            "runtime": sku.served.recognizer.runtime,
            "head": sku.head,
            "mode": mode,
        },
        "note": sku.note,
        "image": {"width": round(image.width * scale[0]), "height": round(image.height * scale[1])},
        "n_boxes": len(boxes),
        "boxes": boxes,
        **shelf_counts(boxes),
    }
    return ShelfResult(body=body, detections=detections, crops=crops, sku_results=sku_results, sku=sku)


def _jpeg(image) -> bytes:
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


def shelf_keep(
    *,
    ctx: services.ServingContext,
    head: str,
    detector: services.Served,
    result: ShelfResult,
    photo: bytes,
    photo_size: tuple[int, int],
    mode: str,
    user=None,
) -> dict:
    """Low confidence -> review, all or nothing (one transaction; the files written are removed if it fails):

    - every box whose SKU was rejected, when the SKU project keeps low-confidence photos: its crop becomes a
      `production` photo of the SKU project with its Recognition (inference.services.recognition_keep), at most
      MAX_KEPT_CROPS per photo, the least confident first;
    - the shelf photo, when the shelf project keeps photos and some box's score is below the detection head's
      threshold: a `production` photo of the shelf project whose box set (never set by a person: version 0) holds
      the detector's boxes as suggestions (source "model", with their scores), and a Recognition (mode "shelf");
      the photo becomes an item of the shelf box queue (review.box_queue).

    Returns {"shelf_image": id or None, "crops": [image ids]}."""
    from labeling.models import Box, BoxSet, LabelClass, Project  # noqa: PLC0415
    from labeling.services import label_class_get_or_create  # noqa: PLC0415

    from .models import Recognition  # noqa: PLC0415

    sku = result.sku
    rejected = []
    if sku.served is not None and sku.ctx.keep_low_confidence_photos:
        rejected = [i for i, r in enumerate(result.sku_results) if r["heads"][sku.head]["label"] is None]
        rejected.sort(key=lambda i: result.sku_results[i]["heads"][sku.head]["confidence"])
        rejected = rejected[:MAX_KEPT_CROPS]
    threshold = ctx.thresholds.get(head, 0.6)
    keep_photo = ctx.keep_low_confidence_photos and any(d.score < threshold for d in result.detections)
    if not rejected and not keep_photo:
        return {"shelf_image": None, "crops": []}
    written: list[str] = []
    kept: dict = {"shelf_image": None, "crops": []}
    try:
        with transaction.atomic():
            if rejected:
                sku_project = Project.objects.get(pk=sku.ctx.project_id)
                for i in rejected:
                    rec = services.recognition_keep(
                        project=sku_project,
                        served=sku.served,
                        blobs=[_jpeg(result.crops[i])],
                        result=result.sku_results[i],
                        mode=mode,
                        user=user,
                        written=written,
                    )
                    kept["crops"] += [im.id for im in rec.images.all()]
            if keep_photo:
                project = Project.objects.get(pk=ctx.project_id)
                heads = list(project.heads.all())
                rec = Recognition.objects.create(
                    project=project,
                    model_version=detector.number,
                    mode="shelf",
                    result={
                        "heads": {},
                        "shelf": {k: result.body[k] for k in ("n_boxes", "counts", "unknown", "containers")},
                    },
                    unclassifiable=not result.detections,
                    user=user if getattr(user, "is_authenticated", False) else None,
                )
                image = services.production_image_store(
                    project=project,
                    data=photo,
                    name=f"recognition-{rec.id}",
                    heads=heads,
                    written=written,
                    size=photo_size,
                )
                rec.images.add(image)
                det_head = next(h for h in heads if h.name == head)
                box_set, _ = BoxSet.objects.get_or_create(image=image, head=det_head)
                if box_set.version == 0:  # suggestions never overwrite what a person set
                    classes = {c.name: c for c in LabelClass.objects.filter(head=det_head, merged_into__isnull=True)}
                    box_set.boxes.all().delete()
                    rows = []
                    for n, (d, b) in enumerate(zip(result.detections, result.body["boxes"], strict=True)):
                        cls = classes.get(d.label)
                        if cls is None:  # a detector class the head lacks (renamed since training)
                            cls = classes[d.label] = label_class_get_or_create(head=det_head, raw_name=d.label)[0]
                        x, y = min(b["box"]["x"], photo_size[0] - 1), min(b["box"]["y"], photo_size[1] - 1)
                        w = max(0.1, min(b["box"]["w"], photo_size[0] - x))
                        h = max(0.1, min(b["box"]["h"], photo_size[1] - y))
                        rows.append(
                            Box(
                                box_set=box_set,
                                label_class=cls,
                                x=max(0.0, x),
                                y=max(0.0, y),
                                w=w,
                                h=h,
                                source=Box.Source.MODEL,
                                score=min(1.0, max(0.0, d.score)),
                                order=n,
                            )
                        )
                    Box.objects.bulk_create(rows)
                    if box_review_hook is not None:  # the box queue (review.box_queue): the least sure photo first
                        box_review_hook(
                            image=image,
                            head=det_head,
                            lowest_score=min(d.score for d in result.detections),
                            model_version=detector.number,
                        )
                kept["shelf_image"] = image.id
    except Exception:
        storage.delete_quietly(written)
        raise
    return kept
