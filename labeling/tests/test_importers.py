"""Import: folder, CSV with mapping, placeholder; re-import no-op; bad input reported with nothing written."""

from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command

from conftest import make_photo
from labeling import importers
from labeling.models import Image, Label, LabelClass, LabelEvent
from labeling.services import LabelingError, project_create

pytestmark = pytest.mark.django_db


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def test_folder_import_groups_classes_and_is_idempotent(photo_folder, settings):
    project = project_create(name="Shapes", preset="retrieval")
    root = photo_folder(groups=3)
    rows, report = importers.plan_folder(root, head=project.heads.get())
    report = importers.images_import(project=project, rows=rows, report=report)
    assert report.written and report.created == 24 and not report.errors
    assert set(LabelClass.objects.values_list("name", flat=True)) == {"red", "blue", "green", "yellow"}
    assert Image.objects.filter(group_key="R000").count() == 2
    assert Label.objects.filter(label_class__isnull=False).count() == 24
    img = Image.objects.first()
    assert default_storage.exists(img.file) and img.file == f"images/{project.slug}/{img.sha256[:2]}/{img.sha256}.jpg"
    assert default_storage.exists(img.thumbnail)
    files_before = _files(Path(settings.MEDIA_ROOT))
    events_before = LabelEvent.objects.count()

    rows, report = importers.plan_folder(root, head=project.heads.get())
    again = importers.images_import(project=project, rows=rows, report=report)
    assert again.written and again.created == 0 and again.existing == 24 and again.labels_set == 0
    assert Image.objects.count() == 24 and LabelEvent.objects.count() == events_before
    assert _files(Path(settings.MEDIA_ROOT)) == files_before


def _write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def test_csv_import_with_mapping_hierarchy_and_aliases(tmp_path):
    project = project_create(name="Cars", preset="car")
    imgs = tmp_path / "import" / "cars"
    imgs.mkdir(parents=True)
    for i, color in enumerate(["red", "blue", "green", "yellow"]):
        (imgs / f"C{i}_1.jpg").write_bytes(make_photo(color, seed=i))
    csv = _write_csv(
        tmp_path / "import" / "cars.csv",
        "image_filename,make,model,extra",
        ["C0_1.jpg,Toyota,Corolla,x", "C1_1.jpg,TOYOTA,Yaris,x", "C2_1.jpg, Toyota.,Corolla,x", "C3_1.jpg,Honda,,x"],
    )
    rows, report = importers.plan_csv(
        csv,
        images_dir=imgs,
        filename_col="image_filename",
        head_cols={"make": "make", "model": "model"},
        project=project,
    )
    report = importers.images_import(project=project, rows=rows, report=report)
    assert report.written, report.lines()
    toyota = LabelClass.objects.get(head__name="make", normalized_name="toyota")
    assert toyota.name == "Toyota" and set(toyota.aliases) == {"TOYOTA", "Toyota."}
    assert LabelClass.objects.filter(head__name="make").count() == 2
    corolla = LabelClass.objects.get(head__name="model", name="Corolla")
    assert corolla.parent == toyota
    honda_img = Image.objects.get(original_name="C3_1.jpg")
    assert honda_img.labels.get(head__name="model").label_class is None  # empty = unlabeled, never a class
    assert honda_img.group_key == "C3"


def test_csv_model_under_two_makes_fails_whole_import(tmp_path, settings):
    project = project_create(name="Cars", preset="car")
    imgs = tmp_path / "import" / "cars"
    imgs.mkdir(parents=True)
    for i, color in enumerate(["red", "blue"]):
        (imgs / f"C{i}_1.jpg").write_bytes(make_photo(color, seed=100 + i))
    csv = _write_csv(tmp_path / "import" / "c.csv", "f,make,model", ["C0_1.jpg,Toyota,Civic", "C1_1.jpg,Honda,Civic"])
    rows, report = importers.plan_csv(
        csv, images_dir=imgs, filename_col="f", head_cols={"make": "make", "model": "model"}, project=project
    )
    report = importers.images_import(project=project, rows=rows, report=report)
    assert not report.written and "belongs to make 'Toyota'" in report.errors[-1][1]
    assert Image.objects.count() == 0 and LabelClass.objects.count() == 0
    assert _files(Path(settings.MEDIA_ROOT)) == set()


def test_csv_bad_rows_reported_and_nothing_written(tmp_path, settings):
    project = project_create(name="Cars", preset="car")
    imgs = tmp_path / "import" / "cars"
    imgs.mkdir(parents=True)
    (imgs / "ok_1.jpg").write_bytes(make_photo("red", seed=7))
    (tmp_path / "import" / "secret.jpg").write_bytes(make_photo("blue", seed=8))
    csv = _write_csv(
        tmp_path / "import" / "c.csv",
        "image_filename,make,model",
        ["ok_1.jpg,Toyota,Corolla", "missing_1.jpg,Toyota,Yaris", "../secret.jpg,Honda,Civic", ",Honda,Civic"],
    )
    rows, report = importers.plan_csv(
        csv,
        images_dir=imgs,
        filename_col="image_filename",
        head_cols={"make": "make", "model": "model"},
        project=project,
    )
    report = importers.images_import(project=project, rows=rows, report=report)
    assert not report.written
    errors = dict(report.errors)
    assert "unmatched row" in errors["line 3"]
    assert "outside the images folder" in errors["line 4"]
    assert "empty 'image_filename'" in errors["line 5"]
    assert Image.objects.count() == 0 and _files(Path(settings.MEDIA_ROOT)) == set()

    # With skip_bad_rows the good row goes in and the bad ones stay reported.
    rows, report = importers.plan_csv(
        csv,
        images_dir=imgs,
        filename_col="image_filename",
        head_cols={"make": "make", "model": "model"},
        project=project,
    )
    report = importers.images_import(project=project, rows=rows, report=report, skip_bad_rows=True)
    assert report.written and report.created == 1 and len(report.errors) == 3


def test_csv_missing_mapped_column_is_a_clear_error(tmp_path):
    project = project_create(name="Cars", preset="car")
    imgs = tmp_path / "import" / "cars"
    imgs.mkdir(parents=True)
    csv = _write_csv(tmp_path / "import" / "c.csv", "image_filename,make", ["a.jpg,Toyota"])
    with pytest.raises(LabelingError, match="no column\\(s\\) 'model'.*columns are 'image_filename', 'make'"):
        importers.plan_csv(
            csv,
            images_dir=imgs,
            filename_col="image_filename",
            head_cols={"make": "make", "model": "model"},
            project=project,
        )
    with pytest.raises(LabelingError, match="no head\\(s\\) colour"):
        importers.plan_csv(
            csv, images_dir=imgs, filename_col="image_filename", head_cols={"colour": "make"}, project=project
        )


def test_unreadable_files_imported_as_unreadable_with_warning(tmp_path):
    project = project_create(name="Shapes", preset="retrieval")
    root = tmp_path / "import" / "f"
    (root / "red").mkdir(parents=True)
    good = make_photo("red", seed=3, size=128)
    (root / "red" / "A_1.jpg").write_bytes(good)
    (root / "red" / "A_2.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "red" / "A_3.jpg").write_bytes(b"<html>not an image</html>")
    (root / "red" / "A_4.jpg").write_bytes(b"")
    rows, report = importers.plan_folder(root, head=project.heads.get())
    report = importers.images_import(project=project, rows=rows, report=report)
    assert report.written and report.created == 4 and report.unreadable == 3
    statuses = dict(Image.objects.values_list("original_name", "status"))
    assert statuses == {"A_1.jpg": "ok", "A_2.jpg": "unreadable", "A_3.jpg": "unreadable", "A_4.jpg": "unreadable"}
    assert any("truncated" in msg for _, msg in report.warnings)


def test_folder_outside_allowed_roots_refused(tmp_path, settings):
    project = project_create(name="Shapes", preset="retrieval")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(LabelingError, match="outside the import folders"):
        importers.plan_folder(outside, head=project.heads.get(), allowed_roots=settings.IMPORT_ROOTS)


def test_placeholder_import_all_unlabeled(photo_folder):
    project = project_create(name="Lego", preset="lego")
    root = photo_folder(colors=("red",), groups=2)
    rows, report = importers.plan_placeholder(root)
    report = importers.images_import(project=project, rows=rows, report=report)
    assert report.created == 4
    assert Label.objects.filter(label_class__isnull=False).count() == 0
    assert Label.objects.count() == 8  # one per image and head


def test_import_command_reports_rows_and_fails_cleanly(tmp_path, capsys):
    imgs = tmp_path / "import" / "cars"
    imgs.mkdir(parents=True)
    (imgs / "a_1.jpg").write_bytes(make_photo("red", seed=11))
    csv = _write_csv(
        tmp_path / "import" / "c.csv", "image_filename,make,model", ["a_1.jpg,Toyota,Corolla", "b_1.jpg,Toyota,Yaris"]
    )
    with pytest.raises(CommandError, match="nothing was written"):
        call_command(
            "import_images",
            "cars",
            str(imgs),
            "--create",
            "car",
            "--csv",
            str(csv),
            "--filename-col",
            "image_filename",
            "--head",
            "make=make",
            "--head",
            "model=model",
        )
    out = capsys.readouterr().out
    assert "ERROR   line 3: no file 'b_1.jpg'" in out
    assert Image.objects.count() == 0
    with pytest.raises(CommandError, match="no column"):
        call_command("import_images", "cars", str(imgs), "--csv", str(csv), "--head", "make=marque")
    call_command(
        "import_images",
        "cars",
        str(imgs),
        "--csv",
        str(csv),
        "--head",
        "make=make",
        "--head",
        "model=model",
        "--skip-bad-rows",
    )
    assert Image.objects.count() == 1


def _secret(tmp_path: Path) -> Path:
    """A file outside every import folder, as /etc/passwd would be."""
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return secret


@pytest.mark.parametrize("mode", ["folder", "placeholder", "export", "csv"])
@pytest.mark.parametrize("link", ["file", "folder"])
def test_symbolic_links_out_of_the_import_folder_are_refused_in_every_mode(tmp_path, settings, mode, link):
    """A link to a file outside the import root (or a class folder linking outside it) is refused by line, and
    with it nothing is written: no stored copy of the target can be served back by /full."""
    project = project_create(name="Shapes", preset="retrieval")
    root = tmp_path / "import" / "t1"
    secret = _secret(tmp_path)
    if mode == "export":
        cls = root / "imagefolder" / "train" / "cls"
    else:
        cls = root / "cls"
    cls.mkdir(parents=True)
    (cls / "A_1.jpg").write_bytes(make_photo("red", seed=1))
    if link == "file":
        (cls / "G1_1.jpg").symlink_to(secret)
        bad = "G1_1.jpg"
    else:
        elsewhere = secret.parent / "pics"
        elsewhere.mkdir()
        (elsewhere / "G1_1.jpg").write_bytes(secret.read_bytes())
        if mode == "export":
            (cls / "sub").symlink_to(elsewhere, target_is_directory=True)  # os.walk(followlinks=True) enters it
        else:
            (root / "cls2").symlink_to(elsewhere, target_is_directory=True)
        bad = "G1_1.jpg"
    head = project.heads.get()
    if mode == "folder":
        if link == "folder":  # rglob does not enter linked folders; name the file through the link instead
            (cls / "G1_1.jpg").symlink_to(root / "cls2" / "G1_1.jpg")
        rows, report = importers.plan_folder(root, head=head, allowed_roots=settings.IMPORT_ROOTS)
    elif mode == "placeholder":
        if link == "folder":
            (cls / "G1_1.jpg").symlink_to(root / "cls2" / "G1_1.jpg")
        rows, report = importers.plan_placeholder(root, allowed_roots=settings.IMPORT_ROOTS)
    elif mode == "export":
        rows, report = importers.plan_export(root, project=project, allowed_roots=settings.IMPORT_ROOTS)
    else:
        target = "cls/G1_1.jpg" if link == "file" else "cls2/G1_1.jpg"
        csv_path = _write_csv(tmp_path / "import" / "l.csv", "file,label", ["cls/A_1.jpg,red", f"{target},blue"])
        rows, report = importers.plan_csv(
            csv_path,
            images_dir=root,
            filename_col="file",
            head_cols={head.name: "label"},
            project=project,
            allowed_roots=settings.IMPORT_ROOTS,
        )
    report = importers.images_import(project=project, rows=rows, report=report)
    assert not report.written
    messages = [msg for _where, msg in report.errors]
    assert any("points outside the images folder" in m for m in messages), messages
    assert any(bad in f"{where} {msg}" for where, msg in report.errors)
    assert Image.objects.count() == 0
    assert not any(p.read_bytes() == secret.read_bytes() for p in Path(settings.MEDIA_ROOT).rglob("*") if p.is_file())
    # With --skip-bad-rows the good photo goes in and the link still does not.
    rows2 = [r for r in rows]
    report2 = importers.ImportReport(errors=[e for e in report.errors if "points outside" not in e[1]])
    report2 = importers.images_import(project=project, rows=rows2, report=report2, skip_bad_rows=True)
    assert report2.written and Image.objects.count() == 1
    assert Image.objects.get().original_name == "A_1.jpg"


def test_links_inside_the_import_folder_still_import(tmp_path, settings):
    """A link that stays inside the folder (a shared photo linked into two class folders) is fine."""
    project = project_create(name="Shapes", preset="retrieval")
    root = tmp_path / "import" / "t2"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "X_1.jpg").write_bytes(make_photo("red", seed=3))
    (root / "b" / "Y_1.jpg").symlink_to(root / "a" / "X_1.jpg")
    rows, report = importers.plan_folder(root, head=project.heads.get(), allowed_roots=settings.IMPORT_ROOTS)
    report = importers.images_import(project=project, rows=rows, report=report)
    assert report.written and not report.errors


def _groups() -> dict[str, str]:
    return dict(Image.objects.values_list("original_name", "group_key"))


def test_class_named_files_would_swallow_their_class_so_each_photo_is_its_own_group(tmp_path):
    """grocery's `Granny-Smith_001.jpg`: `<ID>_<seq>` gives one group per class, so no split could test a class."""
    project = project_create(name="Fruit", preset="retrieval")
    root = tmp_path / "import" / "fruit"
    for cls in ("Granny-Smith", "Banana"):
        (root / cls).mkdir(parents=True)
        for i in range(1, 4):
            (root / cls / f"{cls}_{i:03d}.jpg").write_bytes(make_photo("red" if cls == "Banana" else "green", seed=i))
    rows, report = importers.plan_folder(root, head=project.heads.get())
    report = importers.images_import(project=project, rows=rows, report=report)
    assert report.written
    warning = next(msg for where, msg in report.warnings if where == "groups")
    assert "'Banana' (3) would be in the one group 'Banana'" in warning and "--group-by name" in warning
    groups = _groups()
    assert len(set(groups.values())) == 6 and groups["Banana_001.jpg"] == "img:Banana/Banana_001.jpg"


def test_one_prefix_for_the_whole_project_is_no_group(tmp_path):
    """The car seed's `car_000001.jpg` names put every photo in group "car"."""
    project = project_create(name="Cars", preset="car")
    imgs = tmp_path / "import" / "cars"
    imgs.mkdir(parents=True)
    lines = []
    for i, (make, model) in enumerate([("Toyota", "Corolla"), ("Toyota", "Yaris"), ("BMW", "X5"), ("BMW", "M3")] * 2):
        (imgs / f"car_{i:06d}.jpg").write_bytes(make_photo("red", seed=i))
        lines.append(f"car_{i:06d}.jpg,{make},{model}")
    csv = _write_csv(tmp_path / "import" / "cars.csv", "image_filename,make,model", lines)
    plan = dict(
        images_dir=imgs, filename_col="image_filename", head_cols={"make": "make", "model": "model"}, project=project
    )
    rows, report = importers.plan_csv(csv, **plan)
    report = importers.images_import(project=project, rows=rows, report=report)
    assert "group 'car' would hold 8 of the 8 photos" in dict(report.warnings)["groups"]
    assert len(set(_groups().values())) == 8
    # Told otherwise, the names are kept as they are.
    Image.objects.all().delete()
    rows, report = importers.plan_csv(csv, **plan)
    report = importers.images_import(project=project, rows=rows, report=report, group_by="name")
    assert report.written and "groups" not in dict(report.warnings) and set(_groups().values()) == {"car"}


def test_real_object_ids_keep_their_groups_and_group_by_column_needs_the_column(photo_folder, tmp_path):
    project = project_create(name="Shapes", preset="retrieval")
    rows, report = importers.plan_folder(photo_folder(groups=3), head=project.heads.get())
    report = importers.images_import(project=project, rows=rows, report=report)
    assert report.written and "groups" not in dict(report.warnings)
    assert _groups()["R000_0.jpg"] == _groups()["R000_1.jpg"] == "R000"
    rows, report = importers.plan_folder(photo_folder(groups=3), head=project.heads.get())
    report = importers.images_import(project=project, rows=rows, report=report, group_by="column")
    assert not report.written and "group by column needs the CSV's group column" in report.errors[0][1]
    with pytest.raises(LabelingError, match="group_by must be one of"):
        importers.images_import(project=project, rows=rows, report=importers.ImportReport(), group_by="folder")


def test_import_command_takes_group_by(tmp_path, capsys):
    root = tmp_path / "import" / "fruit"
    for cls in ("Kiwi", "Lemon"):
        (root / cls).mkdir(parents=True)
        for i in range(1, 3):
            (root / cls / f"{cls}_{i:03d}.jpg").write_bytes(make_photo("green" if cls == "Kiwi" else "yellow", seed=i))
    call_command("import_images", "fruit", str(root), "--create", "retrieval", "--group-by", "name")
    assert set(_groups().values()) == {"Kiwi", "Lemon"}
    with pytest.raises(CommandError):
        call_command("import_images", "fruit", str(root), "--group-by", "folders")


# ------------------------------------------------------------------------------------- --update: CSV re-imports


def _cars_imported(tmp_path):
    """A car project with three photos imported from a CSV: C0 Toyota Corolla, C1 Toyota Yaris, C2 Honda Civic."""
    project = project_create(name="Cars", preset="car", slug="cars")
    imgs = tmp_path / "import" / "cars"
    imgs.mkdir(parents=True)
    for i, color in enumerate(["red", "blue", "green"]):
        (imgs / f"C{i}_1.jpg").write_bytes(make_photo(color, seed=200 + i))
    lines = ["C0_1.jpg,Toyota,Corolla", "C1_1.jpg,Toyota,Yaris", "C2_1.jpg,Honda,Civic"]
    report = _csv_import(project, tmp_path, imgs, lines)
    assert report.written and report.labels_set == 6, report.lines()
    return project, imgs


def _csv_import(project, tmp_path, imgs, lines, **kwargs):
    csv = _write_csv(tmp_path / "import" / "cars.csv", "image_filename,make,model", lines)
    rows, report = importers.plan_csv(
        csv,
        images_dir=imgs,
        filename_col="image_filename",
        head_cols={"make": "make", "model": "model"},
        project=project,
    )
    return importers.images_import(project=project, rows=rows, report=report, **kwargs)


def _labels() -> dict[str, tuple[str | None, str | None]]:
    out = {}
    for image in Image.objects.all():
        by_head = {lb.head.name: lb.label_class.name if lb.label_class else None for lb in image.labels.all()}
        out[image.original_name] = (by_head["make"], by_head["model"])
    return out


CHANGED = ["C0_1.jpg,Toyota,Corolla", "C1_1.jpg,Toyota,Corolla", "C2_1.jpg,Honda,Civic"]  # C1: Yaris -> Corolla


def test_update_sets_a_changed_label_with_a_history_event_by_the_importing_user(tmp_path, admin_user):
    project, imgs = _cars_imported(tmp_path)
    events = LabelEvent.objects.count()
    label = Label.objects.get(image__original_name="C1_1.jpg", head__name="model")
    report = _csv_import(project, tmp_path, imgs, CHANGED, user=admin_user, update=True)
    assert report.written and report.existing == 3 and report.created == 0, report.lines()
    assert report.labels_updated == 1 and report.labels_set == 0 and not report.warnings
    assert "0 label(s) set, 1 label(s) updated" in report.lines()[-1]
    assert _labels()["C1_1.jpg"] == ("Toyota", "Corolla")
    assert LabelEvent.objects.count() == events + 1  # the unchanged rows are left alone
    event = LabelEvent.objects.first()
    assert (event.image.original_name, event.head.name, event.user, event.reason) == (
        "C1_1.jpg",
        "model",
        admin_user,
        "import update",
    )
    assert (event.old_class.name, event.new_class.name) == ("Yaris", "Corolla")
    after = Label.objects.get(pk=label.pk)
    assert after.version == label.version + 1 and after.updated_by == admin_user

    # The same CSV again: nothing to change, nothing recorded.
    again = _csv_import(project, tmp_path, imgs, CHANGED, user=admin_user, update=True)
    assert again.written and again.labels_updated == 0 and LabelEvent.objects.count() == events + 1


def test_without_update_existing_labels_are_kept(tmp_path, admin_user):
    project, imgs = _cars_imported(tmp_path)
    before, events = _labels(), LabelEvent.objects.count()
    report = _csv_import(project, tmp_path, imgs, CHANGED, user=admin_user)
    assert report.written and report.labels_updated == 0 and report.existing == 3
    assert ("line 3", "model is already 'Yaris'; kept (the file says 'Corolla')") in report.warnings
    assert _labels() == before and LabelEvent.objects.count() == events


def test_update_leaves_unknown_cells_and_stale_labels_alone(tmp_path, admin_user, monkeypatch):
    project, imgs = _cars_imported(tmp_path)
    before, events = _labels(), LabelEvent.objects.count()
    # An empty cell is unknown: it clears nothing.
    report = _csv_import(project, tmp_path, imgs, ["C0_1.jpg,Toyota,", "C2_1.jpg,,"], user=admin_user, update=True)
    assert report.written and report.labels_updated == 0 and _labels() == before
    assert LabelEvent.objects.count() == events

    # Somebody edits C1's model while the import runs: their edit wins, the row is reported, the rest goes in.
    from django.db.models import F

    real_label_set = importers.label_set

    def edited_meanwhile(*, label_id, **kwargs):
        Label.objects.filter(pk=label_id).update(version=F("version") + 1)
        return real_label_set(label_id=label_id, **kwargs)

    monkeypatch.setattr(importers, "label_set", edited_meanwhile)
    lines = ["C0_1.jpg,Toyota,Corolla", "C1_1.jpg,Toyota,Corolla", "C2_1.jpg,Honda,Civic"]
    report = _csv_import(project, tmp_path, imgs, lines, user=admin_user, update=True)
    assert report.written and report.labels_updated == 0
    assert ("line 3", "model was changed by someone else during the import (now 'Yaris'); kept") in report.warnings
    assert _labels() == before and LabelEvent.objects.count() == events


def test_a_bad_row_with_update_writes_nothing(tmp_path, admin_user, settings):
    project, imgs = _cars_imported(tmp_path)
    before, events = _labels(), LabelEvent.objects.count()
    files = _files(Path(settings.MEDIA_ROOT))
    (imgs / "C3_1.jpg").write_bytes(make_photo("yellow", seed=300))
    # Line 3's update is fine; line 4 puts Civic (a Honda) under Toyota: refused inside the transaction.
    lines = ["C0_1.jpg,Toyota,Corolla", "C1_1.jpg,Toyota,Corolla", "C2_1.jpg,Toyota,Civic", "C3_1.jpg,Honda,Civic"]
    report = _csv_import(project, tmp_path, imgs, lines, user=admin_user, update=True)
    assert not report.written and "belongs to make 'Honda'" in report.errors[-1][1]
    assert report.labels_updated == 0 and report.created == 0
    assert _labels() == before and LabelEvent.objects.count() == events and Image.objects.count() == 3
    assert _files(Path(settings.MEDIA_ROOT)) == files
    # A row naming a missing file: refused before anything is written.
    lines = ["C1_1.jpg,Toyota,Corolla", "gone_1.jpg,Toyota,Yaris"]
    report = _csv_import(project, tmp_path, imgs, lines, user=admin_user, update=True)
    assert not report.written and "no file 'gone_1.jpg'" in report.errors[0][1]
    assert _labels() == before and LabelEvent.objects.count() == events


def test_import_command_update(tmp_path, admin_user, capsys):
    project, imgs = _cars_imported(tmp_path)
    csv = _write_csv(tmp_path / "import" / "cars.csv", "image_filename,make,model", CHANGED)
    args = ["import_images", project.slug, str(imgs), "--csv", str(csv), "--head", "make=make", "--head", "model=model"]
    call_command(*args)
    assert _labels()["C1_1.jpg"] == ("Toyota", "Yaris") and "0 label(s) updated" in capsys.readouterr().out
    call_command(*args, "--update", "--user", "admin")
    assert _labels()["C1_1.jpg"] == ("Toyota", "Corolla") and "1 label(s) updated" in capsys.readouterr().out
    assert LabelEvent.objects.first().user == admin_user
    with pytest.raises(CommandError, match="No user 'nobody'"):
        call_command(*args, "--update", "--user", "nobody")


def test_import_page_update_box(client, admin_user, tmp_path):
    from django.urls import reverse

    project, imgs = _cars_imported(tmp_path)
    csv = _write_csv(tmp_path / "import" / "cars.csv", "image_filename,make,model", CHANGED)
    client.force_login(admin_user)
    url = reverse("labeling:import", args=[project.slug])
    assert b"Update labels" in client.get(url).content
    form = {
        "mode": "csv",
        "folder": str(imgs),
        "csv_path": str(csv),
        "filename_col": "image_filename",
        "head_map": "make=make, model=model",
        "group_by": "auto",
    }
    response = client.post(url, form)
    assert b"Import done" in response.content and b"0 label(s) updated" in response.content
    assert _labels()["C1_1.jpg"] == ("Toyota", "Yaris")
    response = client.post(url, {**form, "update": "on"})
    assert b"1 label(s) updated" in response.content
    assert _labels()["C1_1.jpg"] == ("Toyota", "Corolla") and LabelEvent.objects.first().user == admin_user


# ------------------------------------------------------------------------------- exports in seed 000's shapes


def test_export_import_round_trip_keeps_labels_splits_and_file_names(tmp_path, car_project):
    import json

    from labeling import versions
    from labeling.models import GroupSplit

    source = car_project(groups=2, per_group=2)
    v, _ = versions.dataset_version_create(project=source)
    out = tmp_path / "import" / "export"
    versions.dataset_version_export(version=v, out_dir=out)
    splits = json.loads((out / "splits.json").read_text())
    maps = json.loads((out / "label_maps.json").read_text())
    entries = {e["filename"]: (s, e) for s, items in splits.items() for e in items}
    assert len(entries) == 12 and all(set(e) == {"path", "filename", "make", "model", "make_idx", "model_idx"}
                                      for _, e in entries.values())  # fmt: skip
    assert all(e["make_idx"] == maps["make_to_idx"][e["make"]] for _, e in entries.values())

    other = project_create(name="Copy", preset="car", slug="copy")
    rows, report = importers.plan_export(out, project=other)
    report = importers.images_import(project=other, rows=rows, report=report)
    assert report.written and report.created == 12, report.lines()
    imported = {im.original_name: im for im in Image.objects.filter(project=other)}
    assert set(imported) == set(entries)  # the export's file names
    sticky = dict(GroupSplit.objects.filter(project=other).values_list("group_key", "split"))
    for name, (split, entry) in entries.items():
        image = imported[name]
        labels = {lb.head.name: lb.label_class.name for lb in image.labels.select_related("head", "label_class")}
        assert labels == {"make": entry["make"], "model": entry["model"]}
        assert sticky[image.group_key] == split


def test_malformed_entry_refuses_the_export_import_and_writes_nothing(tmp_path, car_project):
    import json

    from labeling import versions
    from labeling.models import GroupSplit

    v, _ = versions.dataset_version_create(project=car_project(groups=2, per_group=1))
    out = tmp_path / "import" / "export"
    versions.dataset_version_export(version=v, out_dir=out)
    splits = json.loads((out / "splits.json").read_text())
    split = next(s for s in ("train", "val", "test") if splits[s])
    splits[split][0]["model_idx"] = 99
    (out / "splits.json").write_text(json.dumps(splits))
    other = project_create(name="Copy", preset="car", slug="copy")
    with pytest.raises(LabelingError, match=rf"splits.json {split}\[0\]: model_idx is 99, but label_maps.json"):
        importers.plan_export(out, project=other)
    assert Image.objects.filter(project=other).count() == 0 and GroupSplit.objects.filter(project=other).count() == 0

    # The same export as earlier releases wrote it (filename lists) imports.
    splits[split][0]["model_idx"] = json.loads((out / "label_maps.json").read_text())["model_to_idx"][
        splits[split][0]["model"]
    ]
    (out / "splits.json").write_text(json.dumps({s: [e["filename"] for e in items] for s, items in splits.items()}))
    rows, report = importers.plan_export(out, project=other)
    assert importers.images_import(project=other, rows=rows, report=report).written
    assert Image.objects.filter(project=other).count() == 6
