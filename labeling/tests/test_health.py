"""Health scan against the database: planted corrupt, truncated, empty, missing, too-small and near-duplicate
images are found; fixing actions are logged in the history and can be undone."""

import io

import pytest
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command
from PIL import Image as PILImage
from PIL import ImageEnhance

from conftest import make_photo
from labeling import health, importers, storage, versions
from labeling.models import DatasetAction, HealthReport, Image, ImageEvent, Label, LabelClass, LabelEvent
from labeling.services import LabelingError, label_class_get_or_create, project_create

pytestmark = pytest.mark.django_db


def _jpeg(img: PILImage.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _photo(seed: int, size: int = 96) -> PILImage.Image:
    return PILImage.open(io.BytesIO(make_photo(["red", "blue", "green", "yellow"][seed % 4], seed=seed, size=size)))


@pytest.fixture
def planted(tmp_path):
    """A car project whose files hide every problem the scan must find (ids in the returned dict)."""
    project = project_create(name="Cars", preset="car")
    project.min_image_side = 64
    project.save()
    root = tmp_path / "import" / "cars"
    root.mkdir(parents=True)
    lines = ["image_filename,make,model,group"]
    cars = [("Toyota", "Corolla"), ("Toyota", "Yaris"), ("Honda", "Civic"), ("Toyta", "Prius")]
    n = 0
    for make, model in cars:
        for g in range(3):
            for s in range(2):
                name = f"{model}{g}_{s}.jpg"
                size = 40 if (model, g, s) == ("Civic", 1, 0) else 96  # one too-small photo in group Civic1
                img = _photo(n * 7 + 1, size=size)
                (root / name).write_bytes(_jpeg(img))
                lines.append(f"{name},{make},{model},{model}{g}")
                n += 1
    # A near-duplicate of Corolla0_0 (re-encoded, resized, brighter) labeled as a Yaris: a conflicting cluster.
    src = PILImage.open(root / "Corolla0_0.jpg")
    dup = ImageEnhance.Brightness(src.resize((80, 80))).enhance(1.08)
    (root / "dupe_0.jpg").write_bytes(_jpeg(dup, quality=60))
    lines.append("dupe_0.jpg,Toyota,Yaris,dupe")
    (root / "cars.csv").write_text("\n".join(lines) + "\n")
    rows, report = importers.plan_csv(
        root / "cars.csv",
        images_dir=root,
        filename_col="image_filename",
        head_cols={"make": "make", "model": "model"},
        group_col="group",
        project=project,
    )
    assert importers.images_import(project=project, rows=rows, report=report).written
    by_name = {im.original_name: im for im in Image.objects.filter(project=project)}
    # Damage files after import (as happens on disks): garbage, truncated, empty, missing.
    damaged = {}
    for name, kind in [
        ("Yaris0_0.jpg", "garbage"),
        ("Yaris1_0.jpg", "truncated"),
        ("Yaris2_0.jpg", "empty"),
        ("Prius0_0.jpg", "missing"),
    ]:
        im = by_name[name]
        path = storage.local_path(im.file)
        data = open(path, "rb").read()
        if kind == "garbage":
            open(path, "wb").write(b"this is not a jpeg" * 50)
        elif kind == "truncated":
            open(path, "wb").write(data[: len(data) // 2])
        elif kind == "empty":
            open(path, "wb").close()
        else:
            default_storage.delete(im.file)
        damaged[im.id] = kind
    return {"project": project, "by_name": by_name, "damaged": damaged}


def test_scan_finds_every_planted_problem(planted):
    project, by_name = planted["project"], planted["by_name"]
    report = health.health_report_create(project=project, queue=False)
    report = health.health_report_execute(report_id=report.id, workers=1)
    assert report.status == HealthReport.Status.SUCCEEDED, report.error
    s, f = report.summary, report.findings

    problems = {x["image_id"]: x["problem"] for x in f["files"]}
    expected = {"garbage": "unreadable", "truncated": "truncated", "empty": "zero_byte", "missing": "missing"}
    assert problems == {i: expected[k] for i, k in planted["damaged"].items()}
    for image_id in planted["damaged"]:
        im = Image.objects.get(pk=image_id)
        assert im.status == Image.Status.UNREADABLE
        assert ImageEvent.objects.filter(image=im, new_status="unreadable").exists()

    small = by_name["Civic1_0.jpg"]
    assert [x["image_id"] for x in f["small"]["images"]] == [small.id]
    assert f["small"]["groups"] == [{"group": "Civic1", "images": 2}]
    assert s["excluded_by_size_rule"] == 2

    clusters = list(report.clusters.all())
    dupe = by_name["dupe_0.jpg"].id
    first = clusters[0]
    assert first.conflicting and set(first.image_ids) == {by_name["Corolla0_0.jpg"].id, dupe}
    assert s["conflicting_clusters"] == 1

    make = f["classes"]["make"]
    assert {(p["a"], p["b"]) for p in make["similar_names"]} & {("Toyota", "Toyta"), ("Toyta", "Toyota")}
    # Readable make labels: Toyota 13 - 3 damaged = 10, Honda 6, Toyta 6 - 1 missing = 5.
    assert {r["name"] for r in make["rare"]} == {"Honda", "Toyta"}
    assert make["dominant"] == ["Toyota"]  # 10 of 21
    assert f["accuracy"] is None  # no active model yet

    # A version excludes the unreadable images and the too-small group.
    v, _ = versions.dataset_version_create(project=project)
    ids = set(v.items.values_list("image_id", flat=True))
    assert not ids & set(planted["damaged"]) and not ids & {small.id, by_name["Civic1_1.jpg"].id}


def test_resolve_cluster_keep_one_and_undo(planted):
    project, by_name = planted["project"], planted["by_name"]
    report = health.health_report_execute(
        report_id=health.health_report_create(project=project, queue=False).id, workers=1
    )
    cluster = report.clusters.get(conflicting=True)
    keep = by_name["Corolla0_0.jpg"].id
    action = health.cluster_resolve(cluster=cluster, mode="keep_one", keep_image_id=keep)
    dupe = Image.objects.get(pk=by_name["dupe_0.jpg"].id)
    assert dupe.status == Image.Status.EXCLUDED and "duplicate of image" in dupe.status_reason
    assert ImageEvent.objects.filter(image=dupe, action=action, new_status="excluded").exists()
    assert Image.objects.get(pk=keep).status == Image.Status.OK

    health.action_undo(action=action)
    dupe.refresh_from_db()
    assert dupe.status == Image.Status.OK
    assert ImageEvent.objects.filter(image=dupe, reason__startswith="undo:").exists()
    with pytest.raises(LabelingError, match="already undone"):
        health.action_undo(action=action)


def test_resolve_cluster_label_all_logged_and_undo_keeps_later_edits(planted):
    project, by_name = planted["project"], planted["by_name"]
    report = health.health_report_execute(
        report_id=health.health_report_create(project=project, queue=False).id, workers=1
    )
    cluster = report.clusters.get(conflicting=True)
    model_head = project.heads.get(name="model")
    corolla = LabelClass.objects.get(head=model_head, name="Corolla")
    action = health.cluster_resolve(cluster=cluster, mode="label_all", labels={model_head.id: corolla.id})
    dupe_label = Label.objects.get(image=by_name["dupe_0.jpg"], head=model_head)
    assert dupe_label.label_class == corolla and dupe_label.version == 3  # import set it once, this once more
    assert LabelEvent.objects.filter(action=action, image=by_name["dupe_0.jpg"], new_class=corolla).exists()

    # The other head's labels are untouched; undo restores the model label.
    result = health.action_undo(action=action)
    dupe_label.refresh_from_db()
    assert dupe_label.label_class.name == "Yaris" and result["skipped"] == 0

    with pytest.raises(LabelingError, match="numeric ids"):
        health.cluster_resolve(cluster=cluster, mode="label_all", labels={"model": "Corolla"})
    with pytest.raises(LabelingError, match="Unknown resolution"):
        health.cluster_resolve(cluster=cluster, mode="delete")
    with pytest.raises(LabelingError, match="Choose which photo"):
        health.cluster_resolve(cluster=cluster, mode="keep_one", keep_image_id=123456)


def test_merge_classes_moves_labels_children_and_future_imports_and_undo(planted):
    project = planted["project"]
    make = project.heads.get(name="make")
    toyota = LabelClass.objects.get(head=make, name="Toyota")
    toyta = LabelClass.objects.get(head=make, name="Toyta")
    prius = LabelClass.objects.get(head__name="model", name="Prius")
    n_toyta = Label.objects.filter(label_class=toyta).count()
    action = health.classes_merge(source=toyta, target=toyota)
    assert Label.objects.filter(label_class=toyta).count() == 0
    assert LabelEvent.objects.filter(action=action).count() == n_toyta
    prius.refresh_from_db()
    toyota.refresh_from_db()
    assert prius.parent == toyota and "Toyta" in toyota.aliases
    # An import that still says "Toyta" lands on Toyota.
    cls, created = label_class_get_or_create(head=make, raw_name="Toyta")
    assert cls == toyota and not created

    health.action_undo(action=action)
    toyta.refresh_from_db()
    prius.refresh_from_db()
    toyota.refresh_from_db()
    assert toyta.merged_into is None and prius.parent == toyta and "Toyta" not in toyota.aliases
    assert Label.objects.filter(label_class=toyta).count() == n_toyta

    with pytest.raises(LabelingError, match="different heads"):
        health.classes_merge(source=toyta, target=prius)


def test_exclude_rare_classes_and_training_options_with_undo(planted):
    project = planted["project"]
    civic = LabelClass.objects.get(head__name="model", name="Civic")
    action = health.classes_set_excluded(project=project, class_ids=[civic.id], excluded=True)
    civic.refresh_from_db()
    assert civic.excluded_from_training
    v, _ = versions.dataset_version_create(project=project)
    assert "Civic" not in v.counts["classes"]["model"]
    assert Label.objects.filter(label_class=civic).count() == 6  # the data stays
    health.action_undo(action=action)
    civic.refresh_from_db()
    assert not civic.excluded_from_training

    opts = health.training_options_set(project=project, class_weighting="inverse", per_class_cap=50)
    project.refresh_from_db()
    assert project.training_options == {"class_weighting": "inverse", "per_class_cap": 50}
    health.action_undo(action=opts)
    project.refresh_from_db()
    assert project.training_options == {}
    with pytest.raises(LabelingError, match="class weighting"):
        health.training_options_set(project=project, class_weighting="loud")
    with pytest.raises(LabelingError, match="per-class cap"):
        health.training_options_set(project=project, per_class_cap=0)
    framing = health.training_options_set(project=project, resize="fit")
    project.refresh_from_db()
    assert project.training_options["resize"] == "fit" and "framing: whole photo, padded" in framing.summary
    health.training_options_set(project=project, class_weighting="inverse")  # resize not given: kept
    project.refresh_from_db()
    assert project.training_options["resize"] == "fit"
    with pytest.raises(LabelingError, match="Photo framing"):
        health.training_options_set(project=project, resize="squash")
    from training.engine.data import RESIZE_MODES

    assert tuple(health.RESIZE_CHOICES) == RESIZE_MODES  # the form offers exactly what the engine takes
    assert DatasetAction.objects.filter(project=project).count() == 4  # an undo marks its action, adds none


def test_check_dataset_command_and_bad_parameters(planted, capsys):
    project = planted["project"]
    call_command("check_dataset", project.slug, "--workers", "1")
    out = capsys.readouterr().out
    assert (
        "file problems            4" in out
        and "CONFLICT" in out
        and "'Toyota' / 'Toyta'" in out.replace("'Toyta' / 'Toyota'", "'Toyota' / 'Toyta'")
    )
    with pytest.raises(CommandError, match="max_distance must be"):
        call_command("check_dataset", project.slug, "--max-distance", "99")
    with pytest.raises(CommandError, match="No project"):
        call_command("check_dataset", "nope")


def test_a_scan_lost_with_its_worker_is_requeued_and_fails_after_three_losses(planted, settings):
    """A running scan whose heartbeat went stale lost its worker: the next request for a scan (or the periodic
    reconciler) requeues it and says so; the third loss fails it so a new scan can start."""
    import datetime as dt

    from django.utils import timezone

    project = planted["project"]
    lost = health.health_report_create(project=project, queue=False)

    def lose():
        HealthReport.objects.filter(pk=lost.pk).update(
            status="running",
            heartbeat_at=timezone.now() - dt.timedelta(seconds=settings.LOUPE_JOB_LOST_AFTER_SECONDS + 5),
        )

    lose()
    with pytest.raises(LabelingError, match="already queued or running"):
        health.health_report_create(project=project, queue=False)
    lost.refresh_from_db()
    assert lost.status == "queued" and lost.attempts == 1
    assert "Worker lost" in lost.error and "the scan starts again" in lost.error
    # A fresh heartbeat is a live worker, however long the scan takes: nothing changes.
    HealthReport.objects.filter(pk=lost.pk).update(status="running", heartbeat_at=timezone.now())
    assert health.health_reports_reconcile(project=project)["lost"] == []
    lose()
    assert health.health_reports_reconcile(project=project)["lost"] == [lost.pk]
    lose()
    fresh = health.health_report_create(project=project, queue=False)
    lost.refresh_from_db()
    assert lost.status == "failed" and "lost 3 times" in lost.error
    assert fresh.status == "queued"


def test_a_duplicate_delivery_of_a_claimed_scan_does_nothing(planted):
    from django.utils import timezone

    project = planted["project"]
    report = health.health_report_create(project=project, queue=False)
    HealthReport.objects.filter(pk=report.pk).update(status="running", heartbeat_at=timezone.now(), phase="hashing")
    again = health.health_report_execute(report_id=report.pk)
    assert again.status == "running" and again.phase == "hashing"  # left to the worker that holds it


def test_scan_finds_exactly_what_the_demo_generator_planted(tmp_path):
    """The demo generator lists what it planted (planted.json); the scan must find all of it and no other
    duplicates."""
    import json

    from labeling.demo_data import generate_demo

    summary = generate_demo(tmp_path / "import" / "lego", seed=5, images_per_combo=2, parts=12, colors=8)
    planted = json.loads((summary.out_dir / "planted.json").read_text())
    project = project_create(name="Lego", preset="lego")
    assert importers.demo_import(
        project=project, csv_path=summary.csv_path, images_dir=summary.out_dir / "images"
    ).written
    name_of = dict(Image.objects.filter(project=project).values_list("id", "original_name"))
    report = health.health_report_execute(
        report_id=health.health_report_create(project=project, queue=False).id, workers=2
    )
    assert report.status == "succeeded", report.error
    found_files = {name_of[f["image_id"]] for f in report.findings["files"]}
    assert found_files == {c["image_filename"] for c in planted["corrupt"]}
    found_small = {name_of[s["image_id"]] for s in report.findings["small"]["images"]}
    assert found_small == {s["image_filename"] for s in planted["small_images"]}
    clusters = [{name_of[i] for i in c.image_ids} for c in report.clusters.all()]
    expected = [{d["original"], d["duplicate"]} for d in planted["near_duplicates"]]
    assert sorted(map(sorted, clusters)) == sorted(map(sorted, expected))
    assert all(c.conflicting for c in report.clusters.all())  # each planted copy carries another part label
