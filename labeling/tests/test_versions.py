"""Dataset versions against the database: frozen content, content hash, sticky group splits, the size rule,
LEGO real-only evaluation splits, diff, export in the seeds' formats and re-import."""

import json

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from conftest import make_photo
from labeling import importers, versions
from labeling.models import DatasetVersion, GroupSplit, Image, Label, LabelClass
from labeling.services import LabelingError, label_set, project_create

pytestmark = pytest.mark.django_db


def _split_by_group(version: DatasetVersion) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for group, split in version.items.values_list("group_key", "split"):
        out.setdefault(group, set()).add(split)
    return out


def test_version_freezes_usable_data_with_group_splits(shapes_project):
    project = shapes_project(10)  # 4 colours x 10 groups x 2 photos
    v1, created = versions.dataset_version_create(project=project)
    assert created and v1.number == 1 and v1.parent is None
    assert v1.counts["images"] == 80 and v1.counts["groups"] == 40
    assert sum(v1.counts["splits"].values()) == 80
    # Hard rule: a group never crosses splits.
    assert all(len(s) == 1 for s in _split_by_group(v1).values())
    # Stratified: every colour has train images, and each split has some images.
    for _cls, c in v1.counts["classes"]["class"].items():
        assert c["train"] >= 2
    assert all(v1.counts["splits"][s] > 0 for s in ("train", "val", "test"))
    assert GroupSplit.objects.filter(project=project).count() == 40

    # Same data → same hash, nothing new written.
    again, created = versions.dataset_version_create(project=project)
    assert not created and again.pk == v1.pk and DatasetVersion.objects.count() == 1


def test_new_version_keeps_splits_and_diff_shows_changes(shapes_project, photo_folder, tmp_path):
    project = shapes_project(6)
    v1, _ = versions.dataset_version_create(project=project)
    splits_v1 = {g: s.pop() for g, s in _split_by_group(v1).items()}

    # Relabel one image, exclude another, add new groups.
    head = project.heads.get()
    label = Label.objects.filter(image__project=project, label_class__name="red").order_by("id").first()
    blue = LabelClass.objects.get(head=head, name="blue")
    label_set(label_id=label.id, class_id=blue.id, expected_version=label.version)
    gone = Image.objects.filter(project=project).order_by("-id").first()
    Image.objects.filter(pk=gone.pk).update(status=Image.Status.EXCLUDED)
    root = photo_folder(groups=9, root=tmp_path / "import" / "more")  # groups 006..008 are new
    rows, report = importers.plan_folder(root, head=head)
    assert importers.images_import(project=project, rows=rows, report=report).written

    v2, created = versions.dataset_version_create(project=project, note="more data")
    assert created and v2.parent_id == v1.pk and v2.content_hash != v1.content_hash
    splits_v2 = {g: s.pop() for g, s in _split_by_group(v2).items()}
    for group, split in splits_v1.items():
        if group in splits_v2:
            assert splits_v2[group] == split, f"group {group} moved from {split} to {splits_v2[group]}"

    diff = versions.dataset_version_diff(old=v1, new=v2)
    assert diff["summary"]["added"] == 4 * 3 * 2
    assert diff["removed"] == [gone.id]
    assert diff["relabeled"] == [{"image_id": label.image_id, "changes": {"class": ["red", "blue"]}}]
    per_class = {r["class"]: r for r in diff["per_class"]["class"]}
    assert per_class["blue"]["delta"] == 6 + 1 - (1 if gone.labels.get().label_class.name == "blue" else 0)
    assert diff["summary"]["split_changed"] == 0


def test_too_small_image_excludes_its_whole_group(shapes_project):
    project = shapes_project(4)
    victim = Image.objects.filter(project=project).order_by("id").first()
    Image.objects.filter(pk=victim.pk).update(width=20, height=64)
    v, _ = versions.dataset_version_create(project=project)
    groups = set(v.items.values_list("group_key", flat=True))
    assert victim.group_key not in groups
    assert v.counts["images"] == 32 - 2
    assert v.counts["left_out"][versions.LEFT_TOO_SMALL] == 2


def test_excluded_class_and_unreadable_images_are_left_out(shapes_project):
    project = shapes_project(4)
    LabelClass.objects.filter(name="green").update(excluded_from_training=True)
    Image.objects.filter(project=project, group_key="R000").update(status=Image.Status.UNREADABLE)
    v, _ = versions.dataset_version_create(project=project)
    assert "green" not in v.counts["classes"]["class"]
    assert v.counts["images"] == 32 - 8 - 2


def test_lego_val_and_test_take_real_images_only(tmp_path):
    project = project_create(name="Lego", preset="lego")
    project.min_image_side = 32
    project.save()
    root = tmp_path / "import" / "lego"
    root.mkdir(parents=True)
    lines = ["image_filename,part,color,source,group"]
    n = 0
    for part, color in [("3001", "red"), ("3003", "blue")]:
        for g in range(12):
            for s, source in enumerate(["real", "synthetic", "real"]):
                name = f"{part}-{g}_{s}.jpg"
                (root / name).write_bytes(make_photo(color, "square" if part == "3001" else "circle", seed=n))
                lines.append(f"{name},{part},{color},{source},{part}-{g}")
                n += 1
        for g in range(12, 16):  # synthetic-only groups: train only
            name = f"{part}-{g}_0.jpg"
            (root / name).write_bytes(make_photo(color, seed=n))
            lines.append(f"{name},{part},{color},synthetic,{part}-{g}")
            n += 1
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    report = importers.demo_import(project=project, csv_path=root / "labels.csv", images_dir=root)
    assert report.written, report.lines()
    v, _ = versions.dataset_version_create(project=project)
    sources = dict(Image.objects.filter(project=project).values_list("id", "source"))
    for image_id, split, group in v.items.values_list("image_id", "split", "group_key"):
        if split != "train":
            assert sources[image_id] == "real", f"{group}: a {sources[image_id]} image in {split}"
        if int(group.split("-")[1]) >= 12:
            assert split == "train"
    left = sum(n for k, n in v.counts["left_out"].items() if k.startswith(versions.LEFT_NON_REAL))
    assert left == v.items.exclude(split="train").count() // 2  # one synthetic per real pair in eval groups
    assert all(len(s) == 1 for s in _split_by_group(v).values())


def test_version_manifest_has_frozen_splits_and_cap(shapes_project):
    project = shapes_project(10)
    v, _ = versions.dataset_version_create(project=project)
    manifest = versions.version_manifest(version=v)
    by_id = {it["id"]: it for it in manifest["items"]}
    for image_id, split in v.items.values_list("image_id", "split"):
        assert by_id[image_id]["split"] == split
    capped = versions.version_manifest(version=v, per_class_cap=3)
    train = [it for it in capped["items"] if it["split"] == "train"]
    assert max(sum(1 for it in train if it["labels"]["class"] == c) for c in ("red", "blue")) == 3
    assert capped == versions.version_manifest(version=v, per_class_cap=3)  # the same images every time
    assert [it for it in capped["items"] if it["split"] != "train"] == [
        it for it in manifest["items"] if it["split"] != "train"
    ]


def test_export_in_seed_formats_and_round_trip(tmp_path, car_project):
    project = car_project(groups=8, per_group=2)
    v, _ = versions.dataset_version_create(project=project)
    out = tmp_path / "import" / "export-v1"
    call_command("dataset_version", project.slug, "export", str(v.number), str(out))
    assert (out / "car_labels.csv").read_text().splitlines()[0] == "filename,make,model"
    maps = json.loads((out / "label_maps.json").read_text())
    assert maps["make_to_idx"] == {"Honda": 0, "Toyota": 1} and maps["models"] == ["Civic", "Corolla", "Yaris"]
    assert json.loads((out / "class_to_idx.json").read_text()) == {"Civic": 0, "Corolla": 1, "Yaris": 2}
    splits = json.loads((out / "splits.json").read_text())
    assert sum(len(v) for v in splits.values()) == 48
    train_ids = json.loads((out / "splits" / "train_ids.json").read_text())
    assert set(train_ids) == set(v.items.filter(split="train").values_list("group_key", flat=True))
    assert any((out / "imagefolder" / "train" / "Civic").iterdir())

    # Import into a fresh project: same labels, same groups, same splits → the same content hash.
    other = project_create(name="Cars copy", preset="car")
    other.min_image_side = 32
    other.save()
    call_command("import_images", other.slug, str(out), "--mode", "export")
    v_other, _ = versions.dataset_version_create(project=other)
    assert v_other.content_hash == v.content_hash
    mine = {(Image.objects.get(pk=i).sha256, s) for i, s in v.items.values_list("image_id", "split")}
    theirs = {(Image.objects.get(pk=i).sha256, s) for i, s in v_other.items.values_list("image_id", "split")}
    assert mine == theirs


def test_malformed_export_is_refused_and_nothing_is_written(tmp_path, car_project):
    project = car_project(groups=8, per_group=2)
    v, _ = versions.dataset_version_create(project=project)
    out = tmp_path / "import" / "broken"
    versions.dataset_version_export(version=v, out_dir=out)
    (out / "splits.json").write_text('{"train": ["a.jpg",], "val": []')  # malformed JSON
    other = project_create(name="Other", preset="car")
    with pytest.raises(CommandError, match="splits.json"):
        call_command("import_images", other.slug, str(out), "--mode", "export")
    assert Image.objects.filter(project=other).count() == 0
    assert GroupSplit.objects.filter(project=other).count() == 0

    # A group split the project already has differently: refused, nothing written.
    out2 = tmp_path / "import" / "ok"
    versions.dataset_version_export(version=v, out_dir=out2)
    splits = json.loads((out2 / "splits.json").read_text())
    first = splits["train"][0]["filename"]
    group = first.rsplit("_", 1)[0]
    GroupSplit.objects.create(project=other, group_key=group, split="test")
    rows, report = importers.plan_export(out2, project=other)
    report = importers.images_import(project=other, rows=rows, report=report)
    assert not report.written and "sticky" in "\n".join(report.lines())
    assert Image.objects.filter(project=other).count() == 0
    assert GroupSplit.objects.filter(project=other).count() == 1

    # A project with other heads cannot take a car export.
    shop = project_create(name="Shop", preset="sku")
    with pytest.raises(LabelingError, match="same heads"):
        importers.plan_export(out2, project=shop)


def test_version_command_and_no_usable_images(car_project, capsys):
    empty = project_create(name="Empty", preset="sku")
    with pytest.raises(CommandError, match="no usable labeled images"):
        call_command("dataset_version", empty.slug, "create")
    project = car_project(groups=8, per_group=2)
    call_command("dataset_version", project.slug, "create", "--note", "first")
    call_command("dataset_version", project.slug, "create")
    out = capsys.readouterr().out
    assert "Created dataset version 1" in out and "Nothing changed" in out
    with pytest.raises(CommandError, match="expected three numbers"):
        call_command("dataset_version", project.slug, "create", "--ratios", "a,b")
    with pytest.raises(CommandError, match="sum"):
        call_command("dataset_version", project.slug, "create", "--ratios", "0.5,0.1,0.1")
    call_command("dataset_version", project.slug, "list")
    assert "v1" in capsys.readouterr().out
    with pytest.raises(CommandError, match="no dataset version 7"):
        call_command("dataset_version", project.slug, "diff", "1", "7")


def test_plain_imagefolder_import_keeps_its_splits(tmp_path, client, admin_user):
    """A torchvision-style ImageFolder (train/<class>/…, val/<class>/…) from the admin Import page."""
    root = tmp_path / "import" / "imagefolder"
    n = 0
    for split, groups in (("train", range(0, 6)), ("val", range(6, 8))):
        for color in ("red", "blue"):
            for g in groups:
                p = root / split / color / f"{color}{g}_0.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(make_photo(color, seed=n))
                n += 1
    project = project_create(name="Folders", preset="retrieval")
    project.min_image_side = 32
    project.save()
    client.force_login(admin_user)
    response = client.post(f"/p/{project.slug}/import/", {"mode": "export", "folder": str(root)})
    assert response.status_code == 200 and b"Imported 16 new image" in response.content
    assert dict(GroupSplit.objects.filter(project=project).values_list("group_key", "split"))["red7"] == "val"
    with pytest.raises(LabelingError, match=r"no labeled photos in test \(train 12, val 4, test 0\)"):
        versions.dataset_version_create(project=project)  # the ImageFolder has no test split: asked first
    v, _ = versions.dataset_version_create(project=project, allow_empty_eval=True)
    assert v.counts["splits"] == {"train": 12, "val": 4, "test": 0}
    # Outside the import folders: refused.
    response = client.post(f"/p/{project.slug}/import/", {"mode": "export", "folder": str(tmp_path)})
    assert b"outside the import folders" in response.content


def test_a_freeze_with_no_val_or_test_photos_for_a_head_is_refused_unless_asked(tmp_path, client, admin_user, capsys):
    """The seeds' trap: every photo in one name group → train N / val 0 / test 0, and "val" figures that are
    really train figures. Refused with why and what to do; the override exists (command, page, API)."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    project = project_create(name="Cars", preset="retrieval")
    project.min_image_side = 32
    project.save(update_fields=["min_image_side"])
    root = tmp_path / "import" / "one"
    for c, color in enumerate(("red", "blue")):
        (root / color).mkdir(parents=True)
        for i in range(4):
            (root / color / f"car_{c * 4 + i:06d}.jpg").write_bytes(make_photo(color, seed=i))
    rows, report = importers.plan_folder(root, head=project.heads.get())
    # Told to keep the name groups: "car" holds every photo.
    assert importers.images_import(project=project, rows=rows, report=report, group_by="name").written
    with pytest.raises(LabelingError, match=r"no labeled photos in val or test \(train 8, val 0, test 0\)") as exc:
        versions.dataset_version_create(project=project)
    assert "--group-by image" in str(exc.value) and "--allow-empty-eval" in str(exc.value)
    assert not DatasetVersion.objects.exists() and not GroupSplit.objects.exists()  # nothing half-written

    with pytest.raises(CommandError, match="Not frozen"):
        call_command("dataset_version", project.slug, "create")
    client.force_login(admin_user)
    url = reverse("labeling:version-create", args=[project.slug])
    assert "Not frozen" in client.post(url, follow=True).content.decode()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    response = api.post(f"/api/v1/projects/{project.slug}/dataset-versions/", {}, format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "empty_eval_split"
    assert not DatasetVersion.objects.exists()

    call_command("dataset_version", project.slug, "create", "--allow-empty-eval")
    version = DatasetVersion.objects.get()
    assert version.counts["splits"] == {"train": 8, "val": 0, "test": 0}
