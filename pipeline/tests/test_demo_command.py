import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from labeling.models import Image, LabelClass, Project

pytestmark = pytest.mark.django_db


def test_demo_command_imports_project_and_creates_admin(tmp_path, settings, capsys):
    out = tmp_path / "demo"
    call_command("demo", "--images-per-combo", "1", "--out", str(out))
    project = Project.objects.get(slug="lego-demo")
    assert project.preset == "lego" and [h.name for h in project.heads.all()] == ["part", "color"]
    assert LabelClass.objects.filter(head__name="part").count() >= 12
    assert LabelClass.objects.filter(head__name="color").count() >= 8
    assert not LabelClass.objects.filter(normalized_name="9999").exists()  # unknown colour is never a class
    assert Image.objects.filter(status="unreadable").count() == 2  # the two planted corrupt files
    assert set(Image.objects.values_list("source", flat=True)) == {"real", "synthetic"}
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_staff and admin.is_superuser
    text = capsys.readouterr().out
    password = text.split("Admin login: admin / ")[1].split()[0]
    assert admin.check_password(password)
    # Running it again changes nothing and keeps the same login.
    n = Image.objects.count()
    call_command("demo", "--images-per-combo", "1", "--out", str(out))
    assert Image.objects.count() == n
    assert f"admin / {password}" in capsys.readouterr().out


def test_demo_shelf_creates_the_shelf_project_and_its_sku_project(tmp_path):
    from labeling.models import BoxSet

    out = tmp_path / "demo"
    call_command("demo", "--images-per-combo", "1", "--out", str(out), "--shelf", "--shelf-photos", "6")
    shelf, skus = Project.objects.get(slug="shelf-demo"), Project.objects.get(slug="shelf-skus")
    assert shelf.preset == "shelf" and shelf.sku_project_id == skus.id
    assert skus.training_options["quick_views"] == []  # tight crops: no shifted views (bench-shelf)
    assert skus.training_options["resize"] == "fit"  # tall / wide crops: fitted whole
    from training.selectors import run_config

    for quick in (True, False):  # the project's options reach both kinds of run
        cfg = run_config(skus, {"quick": quick})
        assert cfg["quick_views"] == [] and cfg["resize"] == "fit" and cfg["tail_views"] == 5
    assert shelf.images.count() == 6 and BoxSet.objects.filter(image__project=shelf, version__gt=0).count() == 6
    assert skus.images.count() > 100  # one crop per box, labeled with its SKU from the folder name
    # every crop is usable for training (a crop is as small as its box: the project's minimum side is lowered)
    from labeling.versions import dataset_version_create

    version, _ = dataset_version_create(project=skus)
    assert sum(version.counts["splits"].values()) == skus.images.count()
    assert LabelClass.objects.filter(head__project=skus).count() >= 10
    n = (shelf.images.count(), skus.images.count())
    call_command("demo", "--images-per-combo", "1", "--out", str(out), "--shelf", "--shelf-photos", "6")
    assert (shelf.images.count(), skus.images.count()) == n  # a second run adds nothing


def test_demo_train_shelf_in_one_invocation_trains_the_sku_project_as_stored(tmp_path, monkeypatch):
    """`demo --train --shelf` on an empty database hands _train the SKU project with its lowered minimum side (the
    object the import changed in the database, not a stale copy that would leave every crop out)."""
    from labeling.shelf_data import SKU_PROJECT_MIN_SIDE
    from pipeline.management.commands.demo import Command

    seen = {}
    monkeypatch.setattr(
        Command, "_train", lambda self, project, timeout, config=None: seen.update({project.slug: project})
    )
    call_command(
        "demo", "--images-per-combo", "1", "--out", str(tmp_path / "demo"), "--shelf", "--shelf-photos", "6", "--train"
    )
    assert set(seen) == {"lego-demo", "shelf-skus", "shelf-demo"}
    assert seen["shelf-skus"].min_image_side == SKU_PROJECT_MIN_SIDE
    assert seen["shelf-demo"].sku_project_id == seen["shelf-skus"].id
