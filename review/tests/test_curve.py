"""The learning-curve page: accuracy against training labels per version, active picks vs the random arm."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from labeling.models import Image, Label
from review.curve import learning_curve
from review.models import ReviewItem
from review.tests.factories import ReviewItemFactory
from training.models import ModelVersion
from training.tests.factories import ModelVersionFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def history(shapes_project):
    """v1 (trained on 16 labels) queued 6 active picks (it was wrong on 5) and 4 random ones (wrong on 1);
    reviewers resolved them; then v2 was trained on 26 labels."""
    project = shapes_project(2)
    head = project.heads.get()
    red, blue = head.classes.get(name="red"), head.classes.get(name="blue")
    now = timezone.now()
    v1 = ModelVersionFactory(project=project, metrics={"n_train": 16, "test": {"heads": {"color": {"top1": 0.5}}}})
    ModelVersion.objects.filter(pk=v1.pk).update(created_at=now - timedelta(days=2))
    images = list(Image.objects.filter(project=project)[:10])
    for i, image in enumerate(images):
        random_arm = i >= 6
        wrong = (i < 5) if not random_arm else (i == 6)
        ReviewItemFactory(
            queue="uncertain",
            image=image,
            head=head,
            suggested_class=red,
            resolved_class=blue if wrong else red,
            resolution="relabeled" if wrong else "accepted",
            status="done",
            score=0.5,
            rank=i,
            model_version=1,
            random_control=random_arm,
            resolved_at=now - timedelta(days=1),
        )
    v2 = ModelVersionFactory(
        project=project, is_active=True, metrics={"n_train": 26, "test": {"heads": {"color": {"top1": 0.75}}}}
    )
    return project, v1, v2


def test_learning_curve_counts_arms_per_version(history):
    project, _v1, _v2 = history
    out = learning_curve(project=project)
    r1, r2 = out["rows"]
    assert (r1["number"], r1["n_train"], r1["labels_active"], r1["labels_random"]) == (1, 16, 0, 0)
    assert (r2["number"], r2["n_train"], r2["labels_active"], r2["labels_random"]) == (2, 26, 6, 4)
    assert r1["random_acc"] == pytest.approx(3 / 4) and r1["random_n"] == 4
    assert r1["active_wrong"] == pytest.approx(5 / 6) and r1["active_n"] == 6
    assert r2["random_acc"] is None and r2["test_top1"] == pytest.approx(0.75)
    s = out["summary"]
    assert s["informativeness"] == pytest.approx((5 / 6) / (1 / 4))
    chart = out["chart"]
    assert len(chart["test_top1"]["dots"]) == 2 and len(chart["random_acc"]["dots"]) == 1
    # skipped items and the mislabel queue do not count
    ReviewItem.objects.filter(random_control=True).update(resolution="skipped")
    assert learning_curve(project=project)["summary"]["random_n"] == 0


def test_learning_curve_page(client, reviewer, history):
    project, _v1, _v2 = history
    client.force_login(reviewer)
    page = client.get(reverse("review:curve", args=[project.slug])).content.decode()
    assert 'id="curve-chart"' in page and "3.3×" in page and "83 %" in page and "25 %" in page
    assert "Fewer than 30 random-arm items" in page
    assert "<td>v2</td><td>26</td><td>6 / 4</td>" in page


def test_every_retrain_measures_the_arms_in_its_gallery_and_the_page_shows_the_curve(
    client, reviewer, shapes_project, trained_version
):
    """Reviewed low-confidence items (some from the random arm) resolved before a retrain: the worker's retrain
    stores the A/B of the two arms (retrieval top-1 on the test split, gallery = base + n of each arm)."""
    import json
    from pathlib import Path

    project = shapes_project(6)
    head = project.heads.get()
    labels = {lb.image_id: lb.label_class for lb in head.labels.select_related("label_class")}
    picks = list(Image.objects.filter(project=project).order_by("id"))[::3]
    Label.objects.filter(image__in=picks).update(label_class=None)  # imported unlabeled
    trained_version(project)
    for i, image in enumerate(picks):  # the low-confidence queue's items, labeled by a reviewer
        Label.objects.filter(image=image, head=head).update(label_class=labels[image.id])
        ReviewItemFactory(
            queue="uncertain",
            image=image,
            head=head,
            suggested_class=labels[image.id],
            resolved_class=labels[image.id],
            resolution="accepted",
            status="done",
            score=0.5,
            rank=i,
            model_version=1,
            random_control=i % 2 == 1,
            resolved_at=timezone.now(),
        )
    v2 = trained_version(project)
    manifest = json.loads((Path(v2.artifact_dir) / "manifest.json").read_text())
    train = {it["id"] for it in manifest["items"] if it["split"] == "train"}
    n_test = sum(1 for it in manifest["items"] if it["split"] == "test")
    arms = v2.metrics["arms"]["heads"][head.name]
    assert arms["n_active"] == sum(1 for i, im in enumerate(picks) if i % 2 == 0 and im.id in train) > 0
    assert arms["n_random"] == sum(1 for i, im in enumerate(picks) if i % 2 == 1 and im.id in train) > 0
    assert arms["n_base"] == len(train) - arms["n_active"] - arms["n_random"] and arms["n_test"] == n_test > 0
    n_max = min(arms["n_active"], arms["n_random"])
    assert arms["points"][0]["n"] == 0 and arms["points"][-1]["n"] == n_max
    assert arms["points"][0]["active"] == arms["points"][0]["random"]
    assert json.loads((Path(v2.artifact_dir) / "arms.json").read_text())["heads"][head.name] == arms
    client.force_login(reviewer)
    page = client.get(reverse("review:curve", args=[project.slug])).content.decode()
    assert 'id="ab"' in page and f'id="ab-chart-{head.name}"' in page
    assert f"With {n_max} labels from each arm" in page
