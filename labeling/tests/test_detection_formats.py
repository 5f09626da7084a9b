"""Box datasets in and out (issue 18.3): YOLO and COCO parsed and written (labeling.detection_formats, pure),
imported into a shelf project and exported again (labeling.boxes) — round trips, sticky splits from train/val/test
folders, and refusals that name the file and line and write nothing."""

import json

import pytest
from django.core.management import CommandError, call_command

from conftest import make_photo
from labeling import boxes
from labeling import detection_formats as fmt
from labeling.models import BoxSet, GroupSplit, Image, LabelClass
from labeling.tests.factories import ProjectFactory

CLASSES = ["bottle", "can", "glass", "unknown_container"]


def _photo(path, seed, size=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_photo("red", size=size, seed=seed))


def _yolo(root, labels: dict[str, str], *, classes="txt", sizes=None):
    """A YOLO folder: labels {"train/a_1": "0 0.5 0.5 0.2 0.4\\n", ...} (None: a photo without a label file)."""
    for i, (stem, text) in enumerate(labels.items()):
        _photo(root / "images" / f"{stem}.jpg", seed=i, size=(sizes or {}).get(stem, 100))
        if text is not None:
            (root / "labels" / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{stem}.txt").write_text(text)
    if classes == "txt":
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    elif classes == "yaml-dict":
        (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {c}\n" for i, c in enumerate(CLASSES)))
    return root


# ------------------------------------------------------------------------------------------------------ pure
def test_yolo_parses_to_pixels_with_splits_and_writes_back(tmp_path):
    root = _yolo(
        tmp_path / "y",
        {"train/a_1": "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.2 0.2\n", "val/b_1": "", "test/c_1": None},
        classes="yaml-dict",
        sizes={"train/a_1": 200},
    )
    ds = fmt.parse_yolo(root)
    assert ds.classes == CLASSES
    by = {i.name: i for i in ds.images}
    assert {n: i.split for n, i in by.items()} == {
        "train/a_1.jpg": "train",
        "val/b_1.jpg": "val",
        "test/c_1.jpg": "test",
    }
    a = by["train/a_1.jpg"]
    assert (a.width, a.height) == (200, 200)
    assert a.boxes[0].cls == 0 and [a.boxes[0].x, a.boxes[0].y, a.boxes[0].w, a.boxes[0].h] == pytest.approx(
        [80, 60, 40, 80]
    )
    assert by["val/b_1.jpg"].boxes == [] and by["test/c_1.jpg"].boxes is None  # annotated-empty vs not annotated
    out = tmp_path / "out"
    fmt.write_yolo(ds, out, read_bytes=lambda i: i.path.read_bytes())
    again = fmt.parse_yolo(out)
    assert again.classes == CLASSES
    for i in again.images:
        j = by[i.name]
        assert i.split == j.split and (i.boxes is None) == (j.boxes is None)
        for b, c in zip(i.boxes or [], j.boxes or [], strict=True):
            assert b.cls == c.cls and [b.x, b.y, b.w, b.h] == pytest.approx([c.x, c.y, c.w, c.h], abs=1e-6)
    assert (out / "labels/val/b_1.txt").read_text() == "" and not (out / "labels/test/c_1.txt").exists()


def test_yolo_refusals_name_the_file_and_line(tmp_path):
    root = _yolo(
        tmp_path / "y",
        {
            "train/a_1": "0 0.5 0.5 0.2 0.4\n0 0.5 0.5 0.2\n7 0.5 0.5 0.1 0.1\n1 1.3 0.5 0.1 0.1\nx 0.5 0.5 0.1 0.1\n",
            "train/b_1": "2 0.95 0.5 0.2 0.2\n3 0.5 0.5 0 0.1\n",
        },
    )
    (root / "labels/train/ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(fmt.FormatError) as exc:
        fmt.parse_yolo(root)
    errors = dict(exc.value.errors)
    assert errors["labels/train/a_1.txt line 2"] == "5 values expected (class xc yc w h), got 4"
    assert errors["labels/train/a_1.txt line 3"] == "class 7 not in the class list (0..3)"
    assert errors["labels/train/a_1.txt line 4"].startswith("xc 1.3 outside 0..1")
    assert "not a class index" in errors["labels/train/a_1.txt line 5"]
    assert "reaches outside the 100×100 image" in errors["labels/train/b_1.txt line 1"]
    assert "w and h must be > 0" in errors["labels/train/b_1.txt line 2"]
    assert errors["labels/train/ghost.txt"].startswith("no photo images/train/ghost.*")
    (root / "classes.txt").unlink()
    with pytest.raises(fmt.FormatError, match="no class list"):
        fmt.parse_yolo(root)
    (root / "data.yaml").write_text("names: {0: a, 2: b}\n")
    with pytest.raises(fmt.FormatError, match="indices must be 0..1"):
        fmt.parse_yolo(root)


def test_coco_parses_writes_and_refuses(tmp_path):
    root = tmp_path / "c"
    _photo(root / "images/train/a_1.jpg", 1, size=120)
    _photo(root / "images/b_1.jpg", 2)
    doc = {
        "images": [
            {"id": 10, "file_name": "train/a_1.jpg", "width": 120, "height": 120},
            {"id": 11, "file_name": "b_1.jpg", "width": 100, "height": 100},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5, "bbox": [1.5, 2, 30, 40]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 120, 120]},
        ],
        "categories": [{"id": 3, "name": "bottle"}, {"id": 5, "name": "can"}],
    }
    (root / "annotations.json").write_text(json.dumps(doc))
    ds = fmt.parse_coco(root)
    assert ds.classes == ["bottle", "can"]
    a, b = ds.images
    assert a.split == "train" and b.split is None and b.boxes == []
    assert [(x.cls, x.x, x.y, x.w, x.h) for x in a.boxes] == [(1, 1.5, 2.0, 30.0, 40.0), (0, 0.0, 0.0, 120.0, 120.0)]
    out = tmp_path / "out"
    fmt.write_coco(ds, out, read_bytes=lambda i: i.path.read_bytes())
    again = fmt.parse_coco(out)
    assert again.classes == ds.classes
    assert [(i.name, i.boxes) for i in again.images] == [(i.name, i.boxes) for i in ds.images]
    # Refusals: every problem, each with where it is.
    doc["images"].append({"id": 12, "file_name": "../etc/passwd", "width": 1, "height": 1})
    doc["images"][1]["width"] = 99
    doc["annotations"] += [
        {"id": 3, "image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1]},
        {"id": 4, "image_id": 10, "category_id": 4, "bbox": [0, 0, 1, 1]},
        {"id": 5, "image_id": 10, "category_id": 3, "bbox": [100, 0, 30, 10]},
        {"id": 6, "image_id": 10, "category_id": 3, "bbox": [0, 0, "1", 1]},
    ]
    (root / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(fmt.FormatError) as exc:
        fmt.parse_coco(root)
    errors = dict(exc.value.errors)
    assert "no .., not absolute" in errors["annotations.json images[2] (../etc/passwd)"]
    assert errors["annotations.json images[1] (b_1.jpg)"] == "width 99 but the photo is 100 px"
    assert "image_id 99 is not one of the images" in errors["annotations.json annotations[2] (id 3)"]
    assert "category_id 4 not in the categories ([3, 5])" in errors["annotations.json annotations[3] (id 4)"]
    assert "reaches outside the 120×120 image" in errors["annotations.json annotations[4] (id 5)"]
    assert "bbox must be [x, y, w, h]" in errors["annotations.json annotations[5] (id 6)"]


# --------------------------------------------------------------------------------------------- into a project
def _sets(project) -> dict[str, list[tuple]]:
    """{photo sha256: [(class, x, y, w, h), ...]} of every box set of the project."""
    return {
        s.image.sha256: [(b.label_class.name, b.x, b.y, b.w, b.h) for b in s.boxes.all()]
        for s in BoxSet.objects.filter(image__project=project, version__gt=0).select_related("image")
    }


def _approx_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert len(a[k]) == len(b[k])
        for x, y in zip(a[k], b[k], strict=True):
            assert x[0] == y[0] and list(x[1:]) == pytest.approx(list(y[1:]), abs=1e-6)


@pytest.mark.django_db
@pytest.mark.parametrize("format", ["yolo", "coco"])
def test_import_export_import_round_trip_with_sticky_splits(tmp_path, settings, format):  # noqa: A002
    src = _yolo(
        settings.IMPORT_ROOTS[0] / "shelf",
        {
            "train/a_1": "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.2 0.2\n",
            "train/a_2": "2 0.25 0.75 0.5 0.5\n",
            "val/b_1": "",
            "test/c_1": "3 0.5 0.5 1 1\n",
            "test/d_1": None,
        },
    )
    (src / "classes.txt").write_text("\n".join([*CLASSES, "jar"]) + "\n")  # a class new to the head
    project = ProjectFactory(name="Shelf A", preset="shelf")
    if format == "coco":  # the same data as COCO, written by the writer
        coco = settings.IMPORT_ROOTS[0] / "coco"
        fmt.write_coco(fmt.parse_yolo(src), coco, read_bytes=lambda i: i.path.read_bytes())
        src = coco
    call_command("import_boxes", project.slug, str(src), "--format", format)
    first = _sets(project)
    n_images = 4 if format == "coco" else 5  # COCO lists annotated photos only
    assert Image.objects.filter(project=project).count() == n_images and len(first) == 4
    assert LabelClass.objects.filter(head__project=project, name="jar").exists()
    splits = dict(GroupSplit.objects.filter(project=project).values_list("group_key", "split"))
    assert splits["a"] == "train" and splits["b"] == "val" and splits["c"] == "test"
    assert sorted(len(v) for v in first.values()) == [0, 1, 1, 2]
    # Re-importing the same folder changes nothing.
    call_command("import_boxes", project.slug, str(src), "--format", format)
    assert _sets(project) == first and BoxSet.objects.filter(version__gt=1).count() == 0
    # Export, import into a fresh project: the same photos, boxes and splits.
    out = settings.IMPORT_ROOTS[0] / "out"
    call_command("export_boxes", project.slug, str(out), "--format", format)
    other = ProjectFactory(name="Shelf B", preset="shelf")
    call_command("import_boxes", other.slug, str(out), "--format", format)
    _approx_equal(_sets(other), first)
    assert dict(GroupSplit.objects.filter(project=other).values_list("group_key", "split")) == splits
    with pytest.raises(CommandError, match="not empty"):
        call_command("export_boxes", project.slug, str(out), "--format", format)


@pytest.mark.django_db
def test_a_bad_line_writes_nothing(tmp_path, settings, capsys):
    src = _yolo(
        settings.IMPORT_ROOTS[0] / "bad",
        {"train/a_1": "0 0.5 0.5 0.2 0.4\n", "train/b_1": "0 0.5 0.5 0.2 0.4\n0 0.5 0.5 0.2\n"},
    )
    project = ProjectFactory(name="Shelf", preset="shelf")
    with pytest.raises(CommandError, match="Nothing was written: 1 problem"):
        call_command("import_boxes", project.slug, str(src), "--format", "yolo")
    assert "labels/train/b_1.txt line 2: 5 values expected (class xc yc w h), got 4" in capsys.readouterr().err
    assert not Image.objects.exists() and not BoxSet.objects.exists() and not GroupSplit.objects.exists()
    assert not list((settings.MEDIA_ROOT).rglob("*.jpg")) if settings.MEDIA_ROOT.exists() else True
    # A group's sticky split already elsewhere: refused too, nothing written.
    (src / "labels/train/b_1.txt").write_text("")
    GroupSplit.objects.create(project=project, group_key="a", split="test")
    report = boxes.boxes_import(project=project, folder=src, format="yolo")
    assert not report.written and "splits are sticky" in report.errors[0][1]
    assert not Image.objects.exists() and not BoxSet.objects.exists()
    # Two detection heads: name one.
    with pytest.raises(boxes.LabelingError, match="Name one detection head"):
        boxes.boxes_import(project=project, folder=src, format="yolo", head="nope")


@pytest.mark.django_db
def test_a_class_folder_import_into_a_detection_head_is_refused(settings):
    from labeling import importers  # noqa: PLC0415

    root = settings.IMPORT_ROOTS[0] / "folder"
    _photo(root / "can" / "a_1.jpg", 1)
    project = ProjectFactory(name="Shelf", preset="shelf")
    rows, report = importers.plan_folder(root, head=project.heads.get())
    report = importers.images_import(project=project, rows=rows, report=report)
    assert not report.written and "container is a detection head" in report.errors[0][1]
    assert not Image.objects.exists()


@pytest.mark.django_db
def test_a_box_import_job_writes_in_batches_and_its_rollback_removes_what_it_wrote(settings, admin_user):
    from labeling import import_jobs  # noqa: PLC0415

    src = _yolo(
        settings.IMPORT_ROOTS[0] / "job",
        {f"train/p{i}_1": f"{i % 4} 0.5 0.5 0.2 0.4\n" for i in range(5)} | {"val/q_1": None},
    )
    project = ProjectFactory(name="Shelf", preset="shelf")
    head = project.heads.get()
    # A photo already in the project, never boxed: the job boxes it, and its rollback takes those boxes back.
    before = boxes.boxes_import(project=project, folder=src, format="yolo")
    assert before.written
    kept = Image.objects.get(project=project, original_name="p0_1.jpg")
    BoxSet.objects.filter(head=head).exclude(image=kept).delete()
    Image.objects.exclude(pk=kept.pk).delete()
    BoxSet.objects.filter(image=kept).delete()
    settings.LOUPE_IMPORT_BATCH = 2
    with pytest.raises(boxes.LabelingError, match="needs the format"):
        import_jobs.import_run_create(project=project, mode="boxes", params={"folder": str(src)}, queue=False)
    run = import_jobs.import_run_create(
        project=project, mode="boxes", params={"folder": str(src), "format": "yolo"}, user=admin_user, queue=False
    )
    done = import_jobs.import_run_execute(run_id=run.id)
    assert done.status == "succeeded", done.error
    assert (done.done, done.total) == (6, 6) and done.report["created"] == 5 and done.report["labels_set"] == 5
    assert BoxSet.objects.filter(head=head, version=1).count() == 5  # q_1 has no label file: not annotated
    assert BoxSet.objects.get(image=kept).boxes.get().label_class.name == "bottle"
    out = import_jobs.import_run_rollback(run_id=run.id)
    assert out["box_sets_removed"] == 1 and out["images_removed"] == 5
    assert list(Image.objects.filter(project=project)) == [kept] and not BoxSet.objects.exists()
    # A bad line: the job fails and writes nothing.
    (src / "labels/train/p3_1.txt").write_text("9 0.5 0.5 0.2 0.4\n")
    bad = import_jobs.import_run_create(
        project=project, mode="boxes", params={"folder": str(src), "format": "yolo"}, queue=False
    )
    failed = import_jobs.import_run_execute(run_id=bad.id)
    assert failed.status == "failed" and "labels/train/p3_1.txt line 1: class 9 not in the class list" in failed.error
    assert Image.objects.filter(project=project).count() == 1 and not BoxSet.objects.exists()
