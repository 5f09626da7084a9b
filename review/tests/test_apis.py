"""The review queues over REST: next with a lease, resolve, undo, statistics; two reviewers never get the same
item; stale versions and taken items are 409; unknown queues and other projects' items are 404."""

import pytest
from rest_framework.test import APIClient

from labeling.models import Label, Project
from review.models import ReviewItem
from review.tests.helpers import queue_mislabels

pytestmark = pytest.mark.django_db


@pytest.fixture
def queue(shapes_project, trained_version):
    project = shapes_project(6)
    flipped = queue_mislabels(project, trained_version(project))
    return project, flipped


def test_a_reviewer_works_through_the_mislabel_queue_over_rest(queue, reviewer, admin_user, token_client):
    project, flipped = queue
    rev, other = token_client(reviewer), token_client(admin_user)
    base = f"/api/v1/projects/{project.slug}/review/mislabel"
    first = rev.post(f"{base}/next/").json()
    assert first["image_id"] in flipped and first["suggested"] == flipped[first["image_id"]]
    assert first["lease_until"] and first["label_version"] is not None
    assert rev.post(f"{base}/next/").json()["id"] == first["id"]  # the same item while the lease holds
    assert other.post(f"{base}/next/").json()["id"] != first["id"]  # never the same item for two reviewers
    # The other reviewer cannot decide the item the first one holds.
    taken = other.post(f"{base}/items/{first['id']}/resolve/", {"action": "accept"}, format="json")
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "conflict"
    # A stale version: 409 with the current label, nothing changed.
    stale = rev.post(
        f"{base}/items/{first['id']}/resolve/",
        {"action": "accept", "version": first["label_version"] - 1},
        format="json",
    )
    assert stale.status_code == 409 and "current" in stale.json()["error"]["details"]
    done = rev.post(
        f"{base}/items/{first['id']}/resolve/", {"action": "accept", "version": first["label_version"]}, format="json"
    )
    assert done.status_code == 200 and done.json()["resolution"] == "accepted" and done.json()["status"] == "done"
    label = Label.objects.get(image_id=first["image_id"], head__name="class")
    assert label.label_class.name == flipped[first["image_id"]]
    # Undo puts the label back and gives the item back to the reviewer.
    undone = rev.post(f"{base}/undo/")
    assert undone.status_code == 200 and undone.json()["id"] == first["id"] and undone.json()["status"] == "open"
    label.refresh_from_db()
    assert label.label_class.name != flipped[first["image_id"]]
    assert rev.post(f"{base}/undo/").status_code == 204  # nothing left to undo
    stats = rev.get(f"/api/v1/projects/{project.slug}/review/stats/").json()
    assert stats["queues"]["mislabel"]["open"] == len(flipped) and isinstance(stats["reviewers"], list)


def test_bad_review_requests(queue, reviewer, token_client):
    project, _ = queue
    rev = token_client(reviewer)
    base = f"/api/v1/projects/{project.slug}/review"
    assert rev.post(f"{base}/nonsense/next/").status_code == 404
    item = rev.post(f"{base}/mislabel/next/").json()
    bad = rev.post(f"{base}/mislabel/items/{item['id']}/resolve/", {"action": "delete"}, format="json")
    assert bad.status_code == 400
    assert (
        rev.post(f"{base}/mislabel/items/{item['id']}/resolve/", {"action": "relabel"}, format="json").status_code
        == 400
    )
    assert (
        rev.post(f"{base}/uncertain/items/{item['id']}/resolve/", {"action": "skip"}, format="json").status_code == 404
    )
    other = Project.objects.create(name="Other", slug="other", preset="sku")
    url = f"/api/v1/projects/{other.slug}/review/mislabel/items/{item['id']}/resolve/"
    assert rev.post(url, {"action": "skip"}, format="json").status_code == 404
    assert rev.post(f"/api/v1/projects/{other.slug}/review/mislabel/next/").status_code == 204  # empty queue
    assert APIClient().post(f"{base}/mislabel/next/").status_code == 401
    # Skipping hands the item to others and the skipper gets the next one.
    skipped = rev.post(f"{base}/mislabel/items/{item['id']}/resolve/", {"action": "skip"}, format="json")
    assert skipped.status_code == 200 and ReviewItem.objects.get(pk=item["id"]).status == "open"
    assert rev.post(f"{base}/mislabel/next/").json()["id"] != item["id"]
