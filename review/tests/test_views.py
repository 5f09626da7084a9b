from unittest import mock

import pytest
from django.urls import reverse

from labeling.models import Label
from review import services
from review.models import ReviewItem
from review.tests.helpers import queue_mislabels

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def queued(shapes_project, trained_version):
    project = shapes_project(6)
    return project, queue_mislabels(project, trained_version(project))


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
    from inference.recognizer import Recognizer  # noqa: PLC0415

    with mock.patch.object(Recognizer, "predict", autospec=True, side_effect=Recognizer.predict) as predict:
        html = client.get(reverse("review:references", args=[project.slug, "mislabel", item.id])).content.decode()
    assert predict.call_count == 1  # one embedding and one search serve both rows
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


def test_bulk_rules_preview_then_apply_then_undo_as_one_action(client, admin_user, reviewer, queued):
    from labeling.health import action_undo
    from labeling.models import DatasetAction, Image

    project, flipped = queued
    items = list(ReviewItem.objects.filter(project=project, status="open").order_by("rank"))
    unsure = items[-1]  # the model gives no class more than 0.3: a photo it cannot read
    unsure.suggested_prob = 0.26
    unsure.top_k = [{**t, "prob": p} for t, p in zip(unsure.top_k, [0.26, 0.25, 0.25, 0.24], strict=True)]
    unsure.save()
    url = reverse("review:rules", args=[project.slug])
    client.force_login(reviewer)
    assert client.get(url).status_code == 403  # admins only
    assert client.post(reverse("review:refresh", args=[project.slug, "mislabel"])).status_code == 403
    client.force_login(admin_user)
    page = client.get(url, {"accept_above": "0.8", "exclude_below": "0.3"}).content.decode()
    assert f"Preview: {len(items) - 1} to accept, 1 to exclude" in page
    before = dict(Label.objects.values_list("image_id", "label_class__name"))
    assert dict(Label.objects.values_list("image_id", "label_class__name")) == before  # a preview changes nothing
    assert client.get(url, {"accept_above": "2"}).status_code == 400
    rule = {"accept_above": "0.8", "exclude_below": "0.3"}
    token = client.get(url, {**rule, "step": "confirm"}).context["plan"]["token"]
    response = client.post(url, {**rule, "token": token}, follow=True)
    assert "accepted 3 suggestion(s) above 0.8, excluded 1 photo(s) below 0.3" in response.content.decode()
    for it in items[:-1]:
        assert Label.objects.get(image_id=it.image_id).label_class.name == flipped[it.image_id]
    assert Image.objects.get(pk=unsure.image_id).status == "excluded"
    assert not ReviewItem.objects.filter(project=project, status="open").exists()
    # the reviewer's own undo does not pick apart a bulk action; the action's undo puts everything back
    assert services.item_undo(user=admin_user, project=project, queue="mislabel") is None
    action_undo(action=DatasetAction.objects.get(kind="review_bulk"), user=admin_user)
    assert dict(Label.objects.values_list("image_id", "label_class__name")) == before
    assert Image.objects.get(pk=unsure.image_id).status == "ok"
    assert ReviewItem.objects.filter(project=project, status="open").count() == len(items)


def test_bulk_rules_default_to_the_calibration_show_the_true_count_and_apply_only_when_confirmed(
    client, admin_user, queued
):
    """The first preview uses the accept threshold the model's calibration supports (no exclude rule: the
    calibration says nothing about unreadable photos), or no rule at all without calibration; the button and the
    confirm page name the real number of items; a post without the confirm page's token, or the same confirmed
    form posted again, changes nothing."""
    from labeling.models import DatasetAction
    from training.models import ModelVersion

    project, flipped = queued
    version = ModelVersion.objects.get(project=project)
    version.metrics = {
        **version.metrics,
        "calibration": {"temperature": {"class": 1.2}, "softmax_threshold": {"class": 0.5}},
    }
    version.save(update_fields=["metrics"])
    url = reverse("review:rules", args=[project.slug])
    client.force_login(admin_user)
    page = client.get(url).content.decode()
    assert 'name="accept_above" value="0.5"' in page and 'name="exclude_below" value=""' in page
    assert "v1 class 0.50" in page  # the basis of the default is on the page
    n = len(flipped)
    assert f"Preview: {n} to accept, 0 to exclude" in page and f"Apply to these {n} items…" in page
    before = dict(Label.objects.values_list("image_id", "label_class__name"))
    rule = {"accept_above": "0.5", "exclude_below": ""}
    bare = client.post(url, rule)
    assert bare.status_code == 400 and "confirm the preview first" in bare.content.decode()
    assert dict(Label.objects.values_list("image_id", "label_class__name")) == before
    confirm = client.get(url, {**rule, "step": "confirm"})
    text = confirm.content.decode()
    assert f"Apply the rule to {n} items?" in text and f"{n} labels become the model's suggestion" in text
    assert (
        f"Yes, apply to {n} items" in text
        and dict(Label.objects.values_list("image_id", "label_class__name")) == before
    )
    form = {**rule, "token": confirm.context["plan"]["token"]}
    done = client.post(url, form, follow=True).content.decode()
    assert f"accepted {n} suggestion(s) above 0.5" in done and "excluded" not in done.split("Done:")[1].split(".")[0]
    assert all(Label.objects.get(image_id=i).label_class.name == c for i, c in flipped.items())
    replay = client.post(url, form)
    assert replay.status_code == 409 and "changed since the preview you confirmed" in replay.content.decode()
    assert DatasetAction.objects.filter(kind="review_bulk").count() == 1
    # no calibration: no default rule, nothing previewed
    from labeling.health import action_undo

    action_undo(action=DatasetAction.objects.get(kind="review_bulk"), user=admin_user)
    version.metrics = {**version.metrics, "calibration": {}}
    version.save(update_fields=["metrics"])
    page = client.get(url).content.decode()
    assert 'name="accept_above" value=""' in page and "No default" in page and 'id="apply"' not in page


def test_refresh_needs_a_promoted_model_and_queues_the_task(
    client, admin_user, shapes_project, trained_version, django_capture_on_commit_callbacks
):
    from training.models import ModelVersion
    from webapp.celery import app

    project = shapes_project(3)
    client.force_login(admin_user)
    url = reverse("review:refresh", args=[project.slug, "mislabel"])
    page = client.post(url, follow=True).content.decode()
    assert "Train and promote a model first" in page
    version = trained_version(project)
    # Jobs are sent by task name; eager mode runs only tasks registered in this process (send_task ignores it), so
    # register them all, as a worker does, whatever the tests run before this one imported.
    app.loader.import_default_modules()
    app.conf.task_always_eager = True  # run the task here, on commit (tests/test_loop_worker.py: a real worker)
    try:
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            page = client.post(url, follow=True).content.decode()
    finally:
        app.conf.task_always_eager = False
    assert "Rebuilding the queue from v1" in page and len(callbacks) == 1
    metrics = ModelVersion.objects.get(pk=version.pk).metrics
    assert metrics["oof"]["k"] == 5 and set(metrics["mislabel_queue"]) == {"class"}


def test_grid_filters_sorts_and_bulk_relabel_with_stale_protection(
    client, reviewer, queued, django_assert_max_num_queries
):
    from labeling.health import action_undo
    from labeling.models import DatasetAction, GroupSplit, Image

    project, flipped = queued
    head = project.heads.get()
    client.force_login(reviewer)
    url = reverse("labeling:image-grid", args=[project.slug])
    with django_assert_max_num_queries(14):  # bounded, whatever the page size
        page = client.get(url, {"head": head.id, "sort": "quality"})
    assert page.context["page"].paginator.count == 48
    tiles = [t["image"].id for t in page.context["tiles"]]
    by_quality = list(
        ReviewItem.objects.filter(project=project, status="open")
        .order_by("score", "id")
        .values_list("image_id", flat=True)
    )
    assert tiles[: len(by_quality)] == by_quality  # worst label quality first, the rest after
    flagged = client.get(url, {"disagrees": "1"}).context["page"]
    assert {im.id for im in flagged} == set(flipped)
    assert client.get(url, {"flagged": "1"}).context["page"].paginator.count == len(flipped)
    group = Image.objects.get(pk=next(iter(flipped))).group_key
    GroupSplit.objects.update_or_create(project=project, group_key=group, defaults={"split": "test"})
    in_test = client.get(url, {"split": "test"}).context["page"]
    assert next(iter(flipped)) in {im.id for im in in_test}
    assert client.get(url, {"source": "production"}).context["page"].paginator.count == 0
    # bulk relabel: the versions shown are checked; one label changed meanwhile is left alone and reported
    ids = list(flipped)
    before = dict(Label.objects.filter(image_id__in=ids).values_list("image_id", "label_class_id"))
    versions = dict(Label.objects.filter(image_id__in=ids).values_list("image_id", "version"))
    Label.objects.filter(image_id=ids[0]).update(version=versions[ids[0]] + 1)  # someone else saved it
    red = head.classes.get(name="red")
    response = client.post(
        reverse("labeling:bulk-relabel", args=[project.slug]),
        {
            "head": head.id,
            "label_class": red.id,
            "item": [f"{i}:{versions[i]}" for i in ids],
            "next": url,
            "confirm": "1",
        },
        follow=True,
    )
    text = response.content.decode()
    assert f"class: {len(ids) - 1} image(s) -&gt; red" in text and "changed by someone else" in text
    assert {lb.image_id for lb in Label.objects.filter(image_id__in=ids, label_class=red)} >= set(ids[1:])
    action = DatasetAction.objects.get(kind="bulk_relabel")
    action_undo(action=action, user=reviewer)
    assert dict(Label.objects.filter(image_id__in=ids).values_list("image_id", "label_class_id")) == before
    bad = client.post(
        reverse("labeling:bulk-relabel", args=[project.slug]), {"head": head.id, "label_class": red.id}, follow=True
    )
    assert "Select at least one image" in bad.content.decode()


def test_reviewer_statistics(client, admin_user, reviewer, queued):
    import datetime as dt

    from django.utils import timezone

    from review.stats import reviewer_stats

    project, _ = queued
    items = list(ReviewItem.objects.filter(project=project, status="open").order_by("rank"))
    t0 = timezone.now() - dt.timedelta(hours=2)

    def done(item, user, resolution, class_id, minutes):
        ReviewItem.objects.filter(pk=item.pk).update(
            status="done",
            resolution=resolution,
            resolved_by=user,
            resolved_class_id=class_id,
            resolved_at=t0 + dt.timedelta(minutes=minutes),
        )

    # reviewer: 3 decisions in 2 sessions (0-4 min, then 60 min: 5 active minutes -> 36/hour)
    done(items[0], reviewer, "accepted", items[0].suggested_class_id, 0)
    done(items[1], reviewer, "kept", items[1].given_class_id, 4)
    done(items[2], reviewer, "relabeled", items[2].suggested_class_id, 60)
    # admin decided the same image/head as items[0] (a later queue's item) the same way, and items[1] otherwise
    twin0 = ReviewItem.objects.create(**{**_fields(items[0]), "status": "open"})
    twin1 = ReviewItem.objects.create(**{**_fields(items[1]), "status": "open"})
    done(twin0, admin_user, "accepted", items[0].suggested_class_id, 30)
    done(twin1, admin_user, "accepted", items[1].suggested_class_id, 31)
    rows = {r["user"]: r for r in reviewer_stats(project=project)}
    r = rows["reviewer"]
    assert r["decisions"] == 3 and r["per_hour"] == pytest.approx(3 / (5 / 60))
    assert r["accepted_share"] == pytest.approx(1 / 3) and (r["kept"], r["relabeled"]) == (1, 1)
    assert r["agreement"] == pytest.approx(0.5) and r["shared"] == 2
    assert rows["admin"]["accepted_share"] == 1.0 and rows["admin"]["agreement"] == pytest.approx(0.5)
    client.force_login(reviewer)
    assert client.get(reverse("review:stats", args=[project.slug])).status_code == 403
    client.force_login(admin_user)
    page = client.get(reverse("review:stats", args=[project.slug])).content.decode()
    assert "<td>reviewer</td><td>3</td><td>36</td>" in page


def _fields(item):
    return {
        f.name: getattr(item, f.name) for f in ReviewItem._meta.concrete_fields if f.name not in ("id", "created_at")
    }


def test_scored_first_pages_match_the_reference_order(queued):
    """The two-segment sort gives exactly ORDER BY (open item's score NULLS LAST, id), on every slice."""
    from django.db.models import F, OuterRef, Subquery

    from labeling.models import Image
    from review.selectors import sort_images

    project, _ = queued
    ReviewItem.objects.create(**{**_fields(ReviewItem.objects.filter(status="open").first()), "score": -1.0})
    qs = Image.objects.filter(project=project)
    score = (
        ReviewItem.objects.filter(image=OuterRef("pk"), status="open", queue="mislabel")
        .order_by("score")
        .values("score")[:1]
    )
    ref = list(qs.annotate(s=Subquery(score)).order_by(F("s").asc(nulls_last=True), "id").values_list("id", flat=True))
    scored = sort_images(qs, "quality")
    assert scored.count() == len(ref) == 48 and len(scored.scored_ids()) < 10
    for a, b in [(0, 3), (0, 10), (2, 7), (3, 20), (20, 48), (40, 60), (0, 48)]:
        assert [im.id for im in scored[a:b]] == ref[a:b], (a, b)
    assert scored[5].id == ref[5]
    from django.core.paginator import Paginator

    page = Paginator(scored, 10).get_page(2)
    assert [im.id for im in page] == ref[10:20]
