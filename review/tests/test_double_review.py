"""Double review: a share of decisions goes blind to a second reviewer; it changes no label, feeds the agreement
statistics, and disagreements are listed for an admin."""

import pytest
from django.urls import reverse

from labeling.models import Label
from review import selectors, services
from review.models import ReviewItem
from review.stats import reviewer_stats
from review.tests.helpers import queue_mislabels

pytestmark = pytest.mark.django_db


@pytest.fixture
def queued(shapes_project, trained_version):
    project = shapes_project(6)
    flipped = queue_mislabels(project, trained_version(project))
    project.double_review_share = 1.0  # every decision gets a second look
    project.save(update_fields=["double_review_share"])
    return project, flipped


def test_second_look_is_blind_changes_no_label_and_counts_for_agreement(client, reviewer, admin_user, queued):
    project, flipped = queued
    first = services.queue_next(project=project, queue="mislabel", user=reviewer)
    given = first.given_class
    services.item_resolve(item=first, user=reviewer, action="accept")
    label = Label.objects.get(image_id=first.image_id, head_id=first.head_id)
    assert label.label_class.name == flipped[first.image_id]
    second = ReviewItem.objects.get(second_look_of=first)
    assert second.status == "open" and second.given_class == given and second.rank == first.rank
    # the first reviewer never gets their own second look: with only it left open, their queue is empty
    ReviewItem.objects.filter(status="open").exclude(pk=second.pk).update(status="stale")
    assert services.queue_next(project=project, queue="mislabel", user=reviewer) is None
    # the second reviewer sees what the first one saw (the given label), not the decision
    client.force_login(admin_user)
    page = client.get(reverse("review:queue", args=[project.slug, "mislabel"])).content.decode()
    assert f'data-item="{second.id}"' in page and 'id="second-look"' in page
    assert f'<strong id="given">{given.name}</strong>' in page
    # they disagree (keep the given label): the label stays the first reviewer's
    version_before = label.version
    services.item_resolve(item=second, user=admin_user, action="keep")
    label.refresh_from_db()
    assert label.version == version_before and label.label_class.name == flipped[first.image_id]
    assert not ReviewItem.objects.filter(second_look_of=second).exists()  # no third look
    rows = {r["user"]: r for r in reviewer_stats(project=project)}
    assert rows["reviewer"]["agreement"] == 0.0 and rows["reviewer"]["shared"] == 1
    n, listed = selectors.double_review_disagreements(project=project)
    assert n == 1 and listed[0]["first"].pk == first.pk
    stats = client.get(reverse("review:stats", args=[project.slug])).content.decode()
    assert 'id="disagreements"' in stats and "1 disagreement:" in stats
    # undoing a second look changes no label either
    undone = services.item_undo(user=admin_user, project=project, queue="mislabel")
    assert undone.pk == second.pk and undone.status == "open"
    label.refresh_from_db()
    assert label.version == version_before


def test_undo_of_the_first_decision_withdraws_its_open_second_look(reviewer, queued):
    project, _ = queued
    first = services.queue_next(project=project, queue="mislabel", user=reviewer)
    services.item_resolve(item=first, user=reviewer, action="keep")
    assert ReviewItem.objects.filter(second_look_of=first, status="open").exists()
    services.item_undo(user=reviewer, project=project, queue="mislabel")
    assert not ReviewItem.objects.filter(second_look_of=first).exists()


def test_share_picks_a_stable_fraction(queued):
    items = [ReviewItem(id=i) for i in range(1, 2001)]
    picked = sum(services._second_look_wanted(it, 0.1) for it in items)
    assert 150 <= picked <= 250
    assert not any(services._second_look_wanted(it, 0.0) for it in items)


def test_review_settings_form(client, admin_user, reviewer, queued):
    project, _ = queued
    url = reverse("review:stats", args=[project.slug])
    client.force_login(reviewer)
    assert client.post(url, {"double_review_share": "0.2"}).status_code == 403
    client.force_login(admin_user)
    bad = client.post(
        url, {"uncertainty_strategy": "margin", "random_control_share": "0.1", "double_review_share": "2"}
    )
    assert bad.status_code == 200 and "A share between 0 and 1" in bad.content.decode()
    client.post(url, {"uncertainty_strategy": "entropy", "random_control_share": "0.2", "double_review_share": "0.05"})
    project.refresh_from_db()
    assert (project.uncertainty_strategy, project.random_control_share, project.double_review_share) == (
        "entropy",
        0.2,
        0.05,
    )
