"""Leakage by similarity: the pure rule (labeling/similarity.py), the freeze that keeps linked groups in one split,
and the health scan that finds the pairs with the real pretrained backbone and reports leaky splits."""

import numpy as np
import pytest
from django.urls import reverse

from conftest import make_photo
from labeling import health, importers, similarity, versions
from labeling.models import DuplicateCluster, GroupSplit, HealthReport, Image, SimilarPair


# ---------------------------------------------------------------------------------------------- pure rule
def _sessions(rng, centres, per, spread):
    return np.concatenate([c + spread * rng.standard_normal((per, len(c))) for c in centres]).astype(np.float32)


def test_shots_of_one_session_pair_and_other_sessions_of_the_class_do_not():
    rng = np.random.default_rng(0)
    d = 64
    base = rng.standard_normal((4, d)) * 3
    # class A: two sessions (a0, a1) far apart; class B: one session near a0's product but a different class
    X = _sessions(rng, [base[0], base[1], base[0] + base[2] * 0.6, base[3]], per=5, spread=0.3)
    labels = ["A"] * 10 + ["B"] * 5 + ["C"] * 5
    found = similarity.leak_pairs(X, labels, margin=0.05)
    pairs = {tuple(p) for p in found.pairs.tolist()}
    in_a0 = {(i, j) for i in range(5) for j in range(i + 1, 5)}
    in_a1 = {(i, j) for i in range(5, 10) for j in range(i + 1, 10)}
    assert in_a0 <= pairs and in_a1 <= pairs  # shots of one session: more alike than any other product
    assert not any(i < 5 <= j < 10 for i, j in pairs)  # the two sessions of A never pair
    assert all(labels[i] == labels[j] for i, j in pairs)  # only photos of one label pair
    assert found.stats["pairs"] == len(pairs) and found.similarity.shape == (len(pairs),)
    # A larger margin never adds pairs.
    assert {tuple(p) for p in similarity.leak_pairs(X, labels, margin=0.3).pairs.tolist()} <= pairs


def test_unlabeled_photos_never_pair_and_tiny_inputs_are_fine():
    rng = np.random.default_rng(1)
    X = _sessions(rng, [np.zeros(8) + 1, np.zeros(8) - 1], per=4, spread=0.01)
    found = similarity.leak_pairs(X, [None] * 4 + ["B"] * 4)
    assert all(i >= 4 and j >= 4 for i, j in found.pairs.tolist()) and len(found.pairs) == 6
    assert np.isnan(found.impostor[:4]).all()
    assert similarity.leak_pairs(X[:1], ["A"]).stats["pairs"] == 0
    with pytest.raises(ValueError, match="3 feature rows for 2 labels"):
        similarity.leak_pairs(X[:3], ["A", "B"])


def test_merge_groups_joins_transitively_and_ignores_unknown_keys():
    comp = similarity.merge_groups(["g3", "g1", "g2", "g4"], [("g3", "g2"), ("g2", "g1"), ("g4", "nope")])
    assert comp == {"g1": "g1", "g2": "g1", "g3": "g1", "g4": "g4"}


# ---------------------------------------------------------------------------------------------- freeze
def _finished_report(project):
    from django.utils import timezone

    return HealthReport.objects.create(
        project=project, status=HealthReport.Status.SUCCEEDED, started_at=timezone.now(), finished_at=timezone.now()
    )


@pytest.mark.django_db
def test_freeze_keeps_photos_a_scan_linked_in_one_split(shapes_project):
    project = shapes_project(10)  # 4 colours x 10 groups x 2 photos, group keys R000 ...
    red = list(Image.objects.filter(project=project, labels__label_class__name="red").order_by("group_key", "id"))
    report = _finished_report(project)
    # Link every red group to the next one (single linkage: all red photos become one component).
    for a, b in zip(red[::2], red[2::2], strict=False):
        SimilarPair.objects.create(report=report, image_a=a, image_b=b, similarity=0.9)
    blue = list(Image.objects.filter(project=project, labels__label_class__name="blue").order_by("group_key", "id"))
    DuplicateCluster.objects.create(report=report, kind="near", image_ids=[blue[0].id, blue[4].id, blue[8].id])

    v1, _ = versions.dataset_version_create(project=project, allow_empty_eval=True)
    split = dict(v1.items.values_list("image_id", "split"))
    assert len({split[im.id] for im in red}) == 1  # ten red groups, one split
    assert len({split[blue[i].id] for i in (0, 1, 4, 5, 8, 9)}) == 1  # the near-duplicate cluster's groups
    info = v1.params["similarity"]
    assert info["report"] == report.id and info["links"] == 9 + 2 and info["groups_merged"] == 9 + 2
    assert info["components"] == 40 - 11 and info["not_scanned"] == 0

    # Without a scan nothing is linked, and the version says so.
    GroupSplit.objects.filter(project=project).delete()
    HealthReport.objects.filter(project=project).delete()
    Image.objects.filter(pk=red[0].pk).update(status=Image.Status.EXCLUDED)  # new content: a new version
    v2, _ = versions.dataset_version_create(project=project)
    assert v2.params["similarity"]["report"] is None and v2.params["similarity"]["groups_merged"] == 0
    assert v2.params["similarity"]["not_scanned"] == 79


@pytest.mark.django_db
def test_a_new_group_linked_to_a_frozen_one_joins_its_sticky_split(shapes_project, settings):
    project = shapes_project(10)
    v1, _ = versions.dataset_version_create(project=project)
    test_group = v1.items.filter(split="test").values_list("group_key", flat=True).first()
    anchor = Image.objects.get(pk=v1.items.filter(group_key=test_group).values_list("image_id", flat=True).first())
    label = anchor.labels.get()
    # A later photo of the same product in a new group (another file name) that the scan links to the anchor.
    src = settings.IMPORT_ROOTS[0] / "later" / label.label_class.name / "Z999_0.jpg"
    src.parent.mkdir(parents=True)
    src.write_bytes(make_photo(label.label_class.name, seed=999))
    rows, rep = importers.plan_folder(src.parent.parent, head=project.heads.get())
    assert importers.images_import(project=project, rows=rows, report=rep).written
    new = Image.objects.get(project=project, group_key="Z999")
    report = _finished_report(project)
    SimilarPair.objects.create(report=report, image_a=anchor, image_b=new, similarity=0.95)
    v2, created = versions.dataset_version_create(project=project)
    assert created
    split = dict(v2.items.values_list("image_id", "split"))
    assert split[new.id] == "test" == split[anchor.id]
    assert GroupSplit.objects.get(project=project, group_key="Z999").split == "test"
    # Frozen groups keep their splits, linked or not.
    assert dict(v1.items.values_list("image_id", "split")).items() <= split.items()


@pytest.mark.django_db
def test_moving_linked_photos_into_one_split_fixes_a_version_frozen_before_the_scan(
    shapes_project, client, admin_user, reviewer
):
    project = shapes_project(10)
    v1, _ = versions.dataset_version_create(project=project)  # no scan yet: nothing linked
    split1 = dict(v1.items.values_list("image_id", "split"))
    by_split = {
        s: list(v1.items.filter(split=s).order_by("image_id").values_list("image_id", flat=True))
        for s in ("train", "val", "test")
    }
    url = reverse("labeling:splits-unleak", args=[project.slug])
    client.force_login(admin_user)
    client.post(url)  # no finished scan: refused, nothing changes
    assert not project.dataset_actions.exists()
    report = _finished_report(project)
    # One test photo is the twin of two train photos (of three groups); one val photo of one test photo (a tie).
    photo = {i.id: i for i in Image.objects.filter(project=project)}
    t, tr1 = photo[by_split["test"][0]], photo[by_split["train"][0]]
    tr2 = next(photo[i] for i in by_split["train"] if photo[i].group_key != tr1.group_key)
    for img in (tr1, tr2):
        SimilarPair.objects.create(report=report, image_a=t, image_b=img, similarity=0.9)
    v, te = photo[by_split["val"][0]], photo[by_split["test"][-1]]
    DuplicateCluster.objects.create(report=report, kind="near", image_ids=[v.id, te.id])

    client.force_login(reviewer)
    assert client.post(url).status_code == 403
    assert not project.dataset_actions.exists()
    client.force_login(admin_user)
    page = client.get(reverse("labeling:health", args=[project.slug]))
    assert page.status_code == 200
    resp = client.post(url, follow=True)
    assert resp.status_code == 200
    action = project.dataset_actions.get()
    # test 2 / train 4 -> train; val 2 / test 2 -> val (a tie: the test split keeps no twin)
    assert "moved 4 photo(s) of 2 group(s)" in action.summary and "test→train 2" in action.summary
    assert "test→val 2" in action.summary
    assert f"Done: {action.summary}" in resp.content.decode()
    assert GroupSplit.objects.get(project=project, group_key=t.group_key).split == "train"
    assert GroupSplit.objects.get(project=project, group_key=te.group_key).split == "val"

    # The same photos and labels freeze into a new version with the new splits; nothing else moved.
    v2, created = versions.dataset_version_create(project=project)
    assert created and v2.content_hash == v1.content_hash
    split2 = dict(v2.items.values_list("image_id", "split"))
    moved = {i for i in split1 if split1[i] != split2[i]}
    keys = [t.group_key, te.group_key]
    assert moved == set(Image.objects.filter(project=project, group_key__in=keys).values_list("id", flat=True))
    assert len({split2[i] for i in (t.id, tr1.id, tr2.id)}) == 1 and split2[v.id] == split2[te.id]
    assert versions.dataset_version_create(project=project) == (v2, False)  # nothing changed since
    with pytest.raises(versions.LabelingError, match="Nothing to move"):
        versions.splits_unleak(project=project)

    # Undo puts the groups back; the next freeze follows.
    assert health.action_undo(action=action) == {"skipped": 0}
    assert GroupSplit.objects.get(project=project, group_key=t.group_key).split == "test"
    v3, created = versions.dataset_version_create(project=project)
    assert created and dict(v3.items.values_list("image_id", "split")) == split1


# ---------------------------------------------------------------------------------------------- scan
@pytest.mark.django_db
def test_scan_embeds_with_the_pretrained_backbone_finds_the_pairs_and_reports_leaky_splits(
    shapes_project, settings, admin_user, client
):
    """Real bundled ImageNet weights, real photos of the generator: the two shots of one group are pairs, and
    after a freeze that split them (a per-photo freeze before any scan), the scan reports the leak."""
    settings.LOUPE_SCAN_SIMILARITY = True
    project = shapes_project(5)  # 4 colours x 5 groups x 2 shots
    # Split every shot into its own group, as an import by photo would, then freeze without a scan.
    for im in Image.objects.filter(project=project):
        Image.objects.filter(pk=im.pk).update(group_key=f"{im.group_key}-{im.id}")
    v1, _ = versions.dataset_version_create(project=project)
    assert v1.params["similarity"]["report"] is None

    report = health.health_report_create(project=project, queue=False)
    report = health.health_report_execute(report_id=report.id)
    assert report.status == HealthReport.Status.SUCCEEDED, report.error
    sim = report.findings["similarity"]
    assert sim["status"] == "done" and sim["pretrained_source"] == "bundled" and sim["photos"] == 40
    pairs = list(
        SimilarPair.objects.filter(report=report).values_list(
            "image_a__labels__label_class__name", "image_b__labels__label_class__name"
        )
    )
    assert pairs and all(a == b for a, b in pairs)  # only photos of one colour pair
    assert report.summary["similar_pairs"] == len(pairs)

    leaky = report.findings["leaky_splits"]
    split = dict(v1.items.values_list("image_id", "split"))
    crossing = [p for p in SimilarPair.objects.filter(report=report) if split[p.image_a_id] != split[p.image_b_id]]
    assert leaky["version"] == v1.number and leaky["pairs"] >= len(crossing) > 0
    assert sum(leaky["by_splits"].values()) == leaky["pairs"]
    assert leaky["examples"] and all(e["split_a"] != e["split_b"] for e in leaky["examples"])

    # The Health page shows the leak with example pairs.
    client.force_login(admin_user)
    page = client.get(reverse("labeling:health", args=[project.slug])).content.decode()
    assert 'id="leaky-splits"' in page and f"version {v1.number}" in page
    e = leaky["examples"][0]
    assert reverse("labeling:image-file", args=[project.slug, e["a"], "thumb"]) in page

    # The next freeze keeps new photos with their linked ones; the scan's cache served the features.
    v2_report = health.health_report_execute(report_id=health.health_report_create(project=project, queue=False).id)
    assert v2_report.findings["similarity"]["cache"]["misses"] == 0


@pytest.mark.django_db
def test_a_failed_similarity_pass_leaves_the_rest_of_the_scan_and_says_why(shapes_project, settings, monkeypatch):
    settings.LOUPE_SCAN_SIMILARITY = True
    project = shapes_project(2)

    def broken(*args, **kwargs):
        raise MemoryError("no room for the features")

    monkeypatch.setattr("pipeline.similarity.cached_features", broken)
    report = health.health_report_execute(report_id=health.health_report_create(project=project, queue=False).id)
    assert report.status == HealthReport.Status.SUCCEEDED
    assert report.findings["similarity"]["status"] == "failed"
    assert "MemoryError: no room for the features" in report.findings["similarity"]["reason"]
    assert report.summary["images"] == 16 and not SimilarPair.objects.filter(report=report).exists()
    # The freeze still works and records which scan it used.
    v, _ = versions.dataset_version_create(project=project, allow_empty_eval=True)
    assert v.params["similarity"]["report"] == report.id and v.params["similarity"]["similarity"] == "failed"


def test_large_projects_search_with_hnsw_and_find_the_same_pairs():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32)) * 3
    X = _sessions(rng, centres, per=6, spread=0.2)
    labels = [f"c{i // 12}" for i in range(len(X))]  # two sessions per label
    exact = similarity.leak_pairs(X, labels)
    approx = similarity.leak_pairs(X, labels, exact_max=10)
    assert exact.stats["search"] == "exact" and approx.stats["search"] == "hnsw"
    assert len(exact.pairs) > 0 and {tuple(p) for p in approx.pairs.tolist()} == {
        tuple(p) for p in exact.pairs.tolist()
    }
