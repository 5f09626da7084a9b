import pytest
from django.urls import reverse

from labeling.models import Image, Label
from review import services
from review.models import ReviewItem

pytestmark = pytest.mark.django_db


@pytest.fixture
def unlabeled(shapes_project, trained_version):
    """A trained project whose later photos lost their labels (as if imported unlabeled), plus one production
    photo kept by the recognition endpoint."""
    project = shapes_project(6)
    trained_version(project)
    images = list(Image.objects.filter(project=project).order_by("id"))
    cleared = [im.id for im in images[::2]]
    Label.objects.filter(image_id__in=cleared).update(label_class=None)
    prod = images[1]
    Image.objects.filter(pk=prod.pk).update(source=Image.Source.PRODUCTION)
    Label.objects.filter(image=prod).update(label_class=None)
    return project, set(cleared) | {prod.id}


def test_queue_ranks_unlabeled_and_production_photos_with_a_random_control_arm(unlabeled):
    project, candidates = unlabeled
    project.random_control_share = 0.25
    project.uncertainty_strategy = "entropy"
    project.save()
    out = services.uncertain_refresh(project=project, size=12)
    assert out == {"candidates": len(candidates), "queued": 12, "random": 3, "strategy": "entropy", "model_version": 1}
    items = list(ReviewItem.objects.filter(project=project, queue="uncertain", status="open").order_by("rank"))
    assert len({it.image_id for it in items}) == 12 and {it.image_id for it in items} <= candidates
    assert [it.rank for it in items] == list(range(12))
    assert [i for i, it in enumerate(items) if it.random_control] == [2, 6, 10]  # spread evenly through the queue
    assert all(it.given_class_id is None and it.suggested_class_id and len(it.top_k) == 4 for it in items)
    active_scores = [it.score for it in items if not it.random_control]
    assert active_scores[0] == max(active_scores)  # the most uncertain photo comes first
    # a refresh replaces the open items; a labeled image is not a candidate any more
    Label.objects.filter(image_id=items[0].image_id).update(label_class=items[0].suggested_class)
    again = services.uncertain_refresh(project=project, size=100)
    assert again["candidates"] == len(candidates) - 1 and again["queued"] == len(candidates) - 1
    assert ReviewItem.objects.filter(project=project, queue="uncertain", status="stale").count() == 12


def test_labeling_a_low_confidence_item_in_the_browser_flow(client, reviewer, unlabeled):
    project, _ = unlabeled
    services.uncertain_refresh(project=project, size=5)
    client.force_login(reviewer)
    page = client.get(reverse("review:queue", args=[project.slug, "uncertain"])).content.decode()
    item = ReviewItem.objects.get(leased_by=reviewer, queue="uncertain")
    assert 'Given: <strong id="given">unlabeled</strong>' in page and 'id="btn-keep"' not in page
    label = Label.objects.get(image_id=item.image_id, head=item.head)
    response = client.post(
        reverse("review:resolve", args=[project.slug, "uncertain", item.id]),
        {"action": "keep", "version": label.version},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 400 and "Nothing to keep" in response.content.decode()
    response = client.post(
        reverse("review:resolve", args=[project.slug, "uncertain", item.id]),
        {"action": "accept", "version": label.version},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    assert Label.objects.get(pk=label.pk).label_class_id == item.suggested_class_id


def test_no_model_no_queue(shapes_project):
    with pytest.raises(services.ReviewError, match="Train and promote"):
        services.uncertain_refresh(project=shapes_project(3))
