"""The review page, a decision (answered with the next item), the reference photos and the image grid make the
same number of SQL queries whatever the size of the project: 20 vs 200 images and queue items, 3 vs 12 makes
(6 vs 24 model classes: the class lists on both pages), so nothing runs a query per tile, item or class.
bench/review_ui.py measures the same pages at 100,000 images."""

import hashlib

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from labeling.models import GroupSplit, Image, Label, LabelClass
from labeling.services import project_create
from review.models import ReviewItem

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}
# Measured (PostgreSQL, inside the test transaction: savepoints count as queries), 2026-11: the bound is the count
# itself, so a new query on these pages fails here and has to be a deliberate change of the bound.
MAX_QUERIES = {
    "review_page": 13,  # the middleware's project is reused, the item comes with its classes; + the rebuild job;
    # + whether the project has a detection head (the shelf box queue's tab)
    "decision_keep": 18,
    "decision_accept": 35,  # accepting another make's model also sets the make (label_set on the parent)
    "references": 8,  # one embedding + search for both classes (was 13)
    "grid": 11,
}  # grid sorts: count + scored ids + page rows (review.selectors.ScoredFirst)


def _project(slug: str, n_images: int, n_makes: int, reviewer) -> dict:
    """A `car` project (n_makes makes, two models each) of n_images rows with both labels, sticky splits, one
    open mislabel item per image, as many stale items (an earlier refresh), a short low-confidence queue, and
    some decisions of `reviewer` in the history. No files: none of these pages reads one."""
    project = project_create(name=slug, preset="car", slug=slug)
    make, model = project.heads.order_by("order")
    makes = LabelClass.objects.bulk_create(
        [LabelClass(head=make, name=f"Make{m}", normalized_name=f"make{m}") for m in range(n_makes)]
    )
    models = LabelClass.objects.bulk_create(
        [
            LabelClass(head=model, name=f"Make{m} M{k}", normalized_name=f"make{m} m{k}", parent=makes[m])
            for m in range(n_makes)
            for k in range(2)
        ]
    )
    images = Image.objects.bulk_create(
        [
            Image(
                project=project,
                sha256=hashlib.sha256(f"{slug}-{i}".encode()).hexdigest(),
                file=f"images/{slug}/{i}.jpg",
                thumbnail=f"images/{slug}/{i}.thumb.jpg",
                original_name=f"IMG_{i:04d}.jpg",
                width=320,
                height=240,
                group_key=f"G{i // 2}",
            )
            for i in range(n_images)
        ]
    )
    GroupSplit.objects.bulk_create(
        [GroupSplit(project=project, group_key=f"G{g}", split="train" if g % 5 else "val") for g in range(n_images)]
    )
    labels = []
    for i, im in enumerate(images):
        labels.append(Label(image=im, head=make, label_class=makes[i % len(models) // 2]))
        labels.append(Label(image=im, head=model, label_class=models[i % len(models)]))
    Label.objects.bulk_create(labels)

    def item(i, im, status, **extra):
        c = i % len(models)
        head, pool, given = (model, models, c) if i % 3 else (make, makes, c // 2)
        suggested = (given + 1) % len(pool)
        top = [(suggested, 0.7), (given, 0.2), ((given + 2) % len(pool), 0.1)]
        return ReviewItem(
            project=project,
            queue=ReviewItem.Queue.MISLABEL,
            image=im,
            head=head,
            given_class=pool[given],
            suggested_class=pool[suggested],
            suggested_prob=0.7,
            score=i / n_images,
            rank=i,
            top_k=[{"class_id": pool[j].id, "label": pool[j].name, "prob": p} for j, p in top],
            model_version=2 if status == ReviewItem.Status.OPEN else 1,
            status=status,
            **extra,
        )

    items = [item(i, im, ReviewItem.Status.STALE) for i, im in enumerate(images)]
    items += [
        item(i, im, ReviewItem.Status.DONE, resolution="kept", resolved_by=reviewer, resolved_class_id=None)
        for i, im in enumerate(images[: n_images // 4])
    ]
    items += [item(i, im, ReviewItem.Status.OPEN) for i, im in enumerate(images)]
    items += [
        ReviewItem(
            project=project,
            queue=ReviewItem.Queue.UNCERTAIN,
            image=im,
            head=model,
            suggested_class=models[0],
            suggested_prob=0.3 + i / (4 * n_images),
            score=0.5,
            rank=i,
            top_k=[{"class_id": models[0].id, "label": models[0].name, "prob": 0.3}],
        )
        for i, im in enumerate(images[::4])
    ]
    ReviewItem.objects.bulk_create(items)
    return {"project": project, "make": make, "make_class": makes[1]}


def _count(client, method: str, url: str, data=None, **extra) -> tuple[int, str]:
    with CaptureQueriesContext(connection) as ctx:
        response = client.post(url, data or {}, **extra) if method == "post" else client.get(url, **extra)
    assert response.status_code == 200, (url, response.status_code)
    return len(ctx.captured_queries), response.content.decode()


def _item_and_version(html: str) -> tuple[int, str]:
    item = int(html.split('data-item="', 1)[1].split('"', 1)[0])
    version = html.split('name="version" value="', 1)[1].split('"', 1)[0]
    return item, version


def _review_counts(client, project) -> dict[str, int]:
    queue = reverse("review:queue", args=[project.slug, "mislabel"])
    counts = {}
    counts["review_page"], html = _count(client, "get", queue)
    item, version = _item_and_version(html)
    counts["references"], refs = _count(
        client, "get", reverse("review:references", args=[project.slug, "mislabel", item])
    )
    assert refs.count("<img") == 8  # four photos of the suggested class, four of the given one
    resolve = reverse("review:resolve", args=[project.slug, "mislabel", item])
    counts["decision_keep"], html = _count(client, "post", resolve, {"action": "keep", "version": version}, **HX)
    nxt, version = _item_and_version(html)
    assert nxt != item and "<html" not in html
    resolve = reverse("review:resolve", args=[project.slug, "mislabel", nxt])
    counts["decision_accept"], html = _count(client, "post", resolve, {"action": "accept", "version": version}, **HX)
    assert _item_and_version(html)[0] not in (item, nxt)
    assert ReviewItem.objects.filter(project=project, status="done", resolution__in=["kept", "accepted"]).count() > 1
    return counts


def test_review_page_decision_and_references_make_as_many_queries_at_200_items_as_at_20(client, reviewer):
    small = _project("small", 20, 3, reviewer)["project"]
    large = _project("large", 200, 12, reviewer)["project"]
    client.force_login(reviewer)
    at_20, at_200 = _review_counts(client, small), _review_counts(client, large)
    assert at_200 == at_20, f"queries grow with the queue: {at_20} at 20 items, {at_200} at 200"
    for name, n in at_200.items():
        assert n <= MAX_QUERIES[name], f"{name}: {n} queries, measured bound {MAX_QUERIES[name]}"


def _grid_counts(client, built) -> dict[str, tuple[int, int]]:
    project = built["project"]
    url = reverse("labeling:image-grid", args=[project.slug])
    pages = {
        "first": "",
        "second": "?page=2",
        "class": f"?head={built['make'].id}&class={built['make_class'].id}",
        "split": "?split=train",
        "flagged": "?flagged=1",
        "quality": "?sort=quality",
        "confidence": "?sort=confidence",
    }
    out = {}
    for name, query in pages.items():
        n, html = _count(client, "get", url + query)
        out[name] = (n, html.count('<div class="tile'))
    n, html = _count(client, "get", url, HTTP_HX_REQUEST="true")  # the htmx filter swap: the grid alone
    out["partial"] = (n, html.count('<div class="tile'))
    return out


def test_image_grid_page_of_100_makes_as_many_queries_at_200_images_as_at_20(client, reviewer):
    small, large = _project("small", 20, 3, reviewer), _project("large", 200, 12, reviewer)
    client.force_login(reviewer)
    at_20, at_200 = _grid_counts(client, small), _grid_counts(client, large)
    assert at_20["first"][1] == 20 and at_200["first"][1] == 100  # a full page of 100 thumbnails at 200
    assert at_200["second"][1] == 100 and at_200["quality"][1] == 100
    queries_20 = {k: n for k, (n, _) in at_20.items()}
    queries_200 = {k: n for k, (n, _) in at_200.items()}
    assert queries_200 == queries_20, f"queries grow with the project: {queries_20} at 20, {queries_200} at 200"
    assert max(queries_200.values()) <= MAX_QUERIES["grid"], queries_200
