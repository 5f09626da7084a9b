"""Reference photos for a review item: the gallery photos of one class nearest to the item's photo, found with
the active model (its Faiss index and the labels the gallery had when it was built); photos of the class in id
order when there is no model, no index, or too few neighbours of that class."""

from __future__ import annotations

import logging

from labeling.models import Image, Label, LabelClass, Project

log = logging.getLogger("review")

SEARCH_K = 200


def nearest_of_class(*, project: Project, image: Image, label_class: LabelClass, k: int = 4) -> list[int]:
    found: list[int] = []
    try:
        from django.core.files.storage import default_storage  # noqa: PLC0415

        from inference import services as serving  # noqa: PLC0415
        from inference.core import decode_image  # noqa: PLC0415

        served = serving.active_model(project_id=project.id)
        rec = served.recognizer
        if rec.index is not None and rec.gallery_labels is not None:
            with default_storage.open(image.file, "rb") as fh:
                photo = decode_image(fh.read(), max_side_hint=rec.image_size)
            _, emb = rec.predict([photo])
            head = label_class.head.name
            for n in rec.search(emb[0], k=SEARCH_K):
                if (
                    n["image_id"] != image.id
                    and rec.gallery_labels.get(n["image_id"], {}).get(head) == label_class.name
                ):
                    found.append(n["image_id"])
                    if len(found) == k:
                        break
    except Exception as exc:  # noqa: BLE001 - references are a help, never a reason for the page to fail
        log.info("reference photos by class order for image %s: %s", image.id, exc)
    if len(found) < k:
        more = (
            Label.objects.filter(head=label_class.head, label_class=label_class, image__status=Image.Status.OK)
            .exclude(image_id__in=[image.id, *found])
            .order_by("image_id")
            .values_list("image_id", flat=True)[: k - len(found)]
        )
        found.extend(more)
    return found
