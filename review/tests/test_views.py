import pytest
from django.urls import reverse

from labeling.models import Label
from review import services
from review.models import ReviewItem
from review.tests.helpers import plant, trained_version

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def queued(shapes_project):
    project = shapes_project(6)
    version = trained_version(project)
    flipped = plant(project, version)
    services.mislabel_refresh(version=version)
    return project, flipped


def test_review_page_shows_the_item_and_each_decision_answers_the_next(client, reviewer, queued):
    project, flipped = queued
    client.force_login(reviewer)
    url = reverse("review:queue", args=[project.slug, "mislabel"])
    page = client.get(url).content.decode()
    item = ReviewItem.objects.get(leased_by=reviewer)
    assert f'data-item="{item.id}"' in page and "Model suggests" in page and flipped[item.image_id] in page
    assert f"{len(flipped)} left" in page and "<kbd>1</kbd>" in page and "review.js" in page
    label = Label.objects.get(image_id=item.image_id)
    resolve = reverse("review:resolve", args=[project.slug, "mislabel", item.id])
    panel = client.post(resolve, {"action": "accept", "version": label.version}, **HX)
    assert panel.status_code == 200 and "accepted" in panel.content.decode()
    assert Label.objects.get(pk=label.pk).label_class.name == flipped[item.image_id]
    nxt = ReviewItem.objects.get(leased_by=reviewer, status="open")
    assert f'data-item="{nxt.id}"' in panel.content.decode() and "<html" not in panel.content.decode()
    # picking the given class by number is "keep"; a stale version is a conflict that changes nothing
    nlabel = Label.objects.get(image_id=nxt.image_id)
    stale = client.post(
        reverse("review:resolve", args=[project.slug, "mislabel", nxt.id]),
        {"action": "relabel", "class_id": nxt.suggested_class_id, "version": nlabel.version + 5},
        **HX,
    )
    assert stale.status_code == 409 and "Someone else changed this label" in stale.content.decode()
    assert Label.objects.get(pk=nlabel.pk).label_class_id == nlabel.label_class_id
    kept = client.post(
        reverse("review:resolve", args=[project.slug, "mislabel", nxt.id]),
        {"action": "relabel", "class_id": nxt.given_class_id, "version": nlabel.version},
        **HX,
    )
    assert kept.status_code == 200 and ReviewItem.objects.get(pk=nxt.pk).resolution == "kept"
    # undo: the kept item is open again and leased back to the reviewer
    undone = client.post(reverse("review:undo", args=[project.slug, "mislabel"]), **HX)
    assert "back in the queue" in undone.content.decode() and ReviewItem.objects.get(pk=nxt.pk).status == "open"
    # bad input is a clear 400, unknown queues 404, no JavaScript: post + redirect
    bad = client.post(reverse("review:resolve", args=[project.slug, "mislabel", nxt.id]), {"class_id": "x"}, **HX)
    assert bad.status_code == 400
    assert client.get(reverse("review:queue", args=[project.slug, "nope"])).status_code == 404
    plain = client.post(
        reverse("review:resolve", args=[project.slug, "mislabel", nxt.id]),
        {"action": "keep", "version": nlabel.version},
        follow=True,
    )
    assert plain.redirect_chain and "kept" in plain.content.decode()


def test_references_show_photos_of_the_suggested_and_the_given_class(client, reviewer, queued):
    project, _ = queued
    client.force_login(reviewer)
    client.get(reverse("review:queue", args=[project.slug, "mislabel"]))
    item = ReviewItem.objects.get(leased_by=reviewer)
    html = client.get(reverse("review:references", args=[project.slug, "mislabel", item.id])).content.decode()
    assert f"Suggested: <strong>{item.suggested_class.name}</strong>" in html
    assert f"Given: <strong>{item.given_class.name}</strong>" in html
    assert html.count("<img") == 8  # four of each, nearest first (the active model's gallery)
    shown = [int(x.split("/images/")[1].split("/")[0]) for x in html.split('href="')[1:]]
    now = dict(Label.objects.filter(head=item.head).values_list("image_id", "label_class_id"))
    flipped_to_truth = queued[1]

    def of_suggested(image_id):  # labelled so now, or at the version's freeze (the gallery's labels)
        return (
            now.get(image_id) == item.suggested_class_id or flipped_to_truth.get(image_id) == item.suggested_class.name
        )

    assert item.image_id not in shown and all(of_suggested(i) for i in shown[:4])


def test_empty_queue_says_how_it_fills(client, reviewer, shapes_project):
    project = shapes_project(3)
    client.force_login(reviewer)
    page = client.get(reverse("review:queue", args=[project.slug, "mislabel"])).content.decode()
    assert "Nothing to review" in page and "after every training run" in page
