"""Reference photos for a review item: the gallery photos of one class nearest to the item's photo, found with
the active model (its Faiss index and the labels the gallery had when it was built); photos of the class in id
order when there is no model, no index, or too few neighbours of that class."""

from __future__ import annotations

import logging

from labeling.models import Image, Label, LabelClass, Project

log = logging.getLogger("review")

SEARCH_K = 200


def nearest_of_classes(
    *, project: Project, image: Image, classes: list[LabelClass], k: int = 4
) -> dict[int, list[int]]:
    """{class id: up to k gallery image ids of that class nearest to `image`}; the photo is embedded and searched
    once for all classes (of any heads)."""
    found: dict[int, list[int]] = {c.id: [] for c in classes}
    try:
        from django.core.files.storage import default_storage  # noqa: PLC0415

        from inference import services as serving  # noqa: PLC0415
        from inference.decode import decode_image  # noqa: PLC0415

        served = serving.active_model(project_id=project.id)
        rec = served.recognizer
        if classes and rec.index is not None and rec.gallery_labels is not None:
            with default_storage.open(image.file, "rb") as fh:
                photo = decode_image(fh.read(), max_side_hint=rec.image_size)
            _, emb = rec.predict([photo])
            wanted = [(c.id, c.head.name, c.name) for c in classes]
            for n in rec.search(emb[0], k=SEARCH_K):
                if n["image_id"] == image.id:
                    continue
                labels = rec.gallery_labels.get(n["image_id"], {})
                for cid, head, name in wanted:
                    if labels.get(head) == name and len(found[cid]) < k:
                        found[cid].append(n["image_id"])
                if all(len(v) >= k for v in found.values()):
                    break
    except Exception as exc:  # noqa: BLE001 - references are a help, never a reason for the page to fail
        log.info("reference photos by class order for image %s: %s", image.id, exc)
    for c in classes:
        ids = found[c.id]
        if len(ids) < k:
            more = (
                Label.objects.filter(head_id=c.head_id, label_class=c, image__status=Image.Status.OK)
                .exclude(image_id__in=[image.id, *ids])
                .order_by("image_id")
                .values_list("image_id", flat=True)[: k - len(ids)]
            )
            ids.extend(more)
    return found
