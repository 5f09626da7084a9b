"""Export in the seeds' formats and read back (labeling.formats): round trips, the exact files the seeds read, link
modes, and one test per malformed input. No database."""

import csv
import errno
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image as PILImage

from labeling import formats
from labeling.formats import ExportRecord, FormatError, export_dataset, read_export

CAR_HEADS = [{"name": "make", "parent": None}, {"name": "model", "parent": "make"}]
LEGO_HEADS = [{"name": "part", "parent": None}, {"name": "color", "parent": None}]
RETRIEVAL_HEADS = [{"name": "label", "parent": None}]


def _jpeg(color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (4, 4), color).save(out, "JPEG")
    return out.getvalue()


def _src(tmp_path: Path, name: str) -> str:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(_jpeg((len(name) * 7 % 255, 40, 90)))
    return str(path)


def _rec(tmp_path, filename, labels, group, split, source="real"):
    return ExportRecord(filename, _src(tmp_path, filename), labels, group, source, split)


def _car_records(tmp_path):
    return [
        _rec(tmp_path, "A1_001.jpg", {"make": "Audi", "model": "A4"}, "A1", "train"),
        _rec(tmp_path, "A1_002.jpg", {"make": "Audi", "model": "A4"}, "A1", "train", "synthetic"),
        _rec(tmp_path, "B7_001.jpg", {"make": "BMW", "model": "X5"}, "B7", "val"),
        _rec(tmp_path, "B8_001.jpg", {"make": "BMW", "model": "M3"}, "B8", "train", "legacy"),
        _rec(tmp_path, "C2_001.jpg", {"make": "Audi", "model": None}, "C2", "test"),
        _rec(tmp_path, "C3_001.jpg", {"make": None, "model": "A6"}, "C3", "test", "production"),
    ]


def _lego_records(tmp_path):
    return [
        _rec(tmp_path, "p1_001.png", {"part": "brick 2x4", "color": "red"}, "p1", "train"),
        _rec(tmp_path, "p1_002.png", {"part": "brick 2x4", "color": None}, "p1", "train"),
        _rec(tmp_path, "p2_001.png", {"part": "plate", "color": "Blue"}, "p2", "val"),
        _rec(tmp_path, "p3_001.png", {"part": "1/2 plate", "color": None}, "p3", "test"),
        _rec(tmp_path, "p4_001.png", {"part": None, "color": "red"}, "p4", "train"),
    ]


def _retrieval_records(tmp_path):
    return [
        _rec(tmp_path, "sha-aa.jpg", {"label": "id-17"}, "id-17", "train"),
        _rec(tmp_path, "sha-bb.jpg", {"label": "id-17"}, "id-17", "train"),
        _rec(tmp_path, "sha-cc.jpg", {"label": "id-03"}, "id-03", "val"),
        _rec(tmp_path, "sha-dd.jpg", {"label": None}, "id-99", "test"),
    ]


def _by_name(dataset):
    return {row.path.name: row for row in dataset.rows}


def _assert_round_trip(out, heads, records):
    data = read_export(out)
    assert data.kind == "labels_csv"
    assert data.heads == [h["name"] for h in heads]
    rows = _by_name(data)
    assert set(rows) == {r.filename for r in records}
    for r in records:
        row = rows[r.filename]
        assert row.labels == {h["name"]: r.labels.get(h["name"]) for h in heads}
        assert (row.group, row.source, row.split) == (r.group, r.source, r.split)
        assert (
            row.path == out.resolve() / "images" / r.filename and row.path.read_bytes() == Path(r.src_path).read_bytes()
        )
    assert data.notes == []
    return data


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ round trips


def test_car_round_trip_and_seed_files(tmp_path):
    records = _car_records(tmp_path)
    out = tmp_path / "export"
    summary = export_dataset(out, heads=CAR_HEADS, records=records)
    assert summary["images"] == 6 and summary["per_split"] == {"train": 3, "val": 1, "test": 2}
    assert summary["folder_head"] == "model" and summary["labels_file"] == "car_labels.csv"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()) == summary["files"]
    assert not (out / "labels.csv").exists()
    assert (out / "car_labels.csv").read_text().splitlines()[0] == "filename,make,model"
    with open(out / "car_labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[4] == {"filename": "C2_001.jpg", "make": "Audi", "model": ""}
    assert (out / "metadata.csv").read_text().splitlines()[:2] == [
        "filename,group,source,split",
        "A1_001.jpg,A1,real,train",
    ]
    splits = _read_json(out / "splits.json")
    assert {s: [e["filename"] for e in entries] for s, entries in splits.items()} == {
        "train": ["A1_001.jpg", "A1_002.jpg", "B8_001.jpg"],
        "val": ["B7_001.jpg"],
        "test": ["C2_001.jpg", "C3_001.jpg"],
    }
    assert splits["test"] == [
        {"path": "images/C2_001.jpg", "filename": "C2_001.jpg", "make": "Audi", "model": None, "make_idx": 0,
         "model_idx": -1},
        {"path": "images/C3_001.jpg", "filename": "C3_001.jpg", "make": None, "model": "A6", "make_idx": -1,
         "model_idx": 1},
    ]  # fmt: skip
    assert _read_json(out / "splits/train_ids.json") == ["A1", "B8"]
    assert _read_json(out / "splits/val_ids.json") == ["B7"]
    assert _read_json(out / "splits/test_ids.json") == ["C2", "C3"]
    maps = _read_json(out / "label_maps.json")
    assert set(maps) == {
        "heads",
        "make_to_idx",
        "make_list",
        "num_makes",
        "makes",
        "make_counts",
        "model_to_idx",
        "model_list",
        "num_models",
        "models",
        "model_counts",
        "model_to_make",
    }
    assert maps["make_list"] == ["Audi", "BMW"] and maps["num_makes"] == 2
    assert maps["model_list"] == ["A4", "A6", "M3", "X5"] and maps["num_models"] == 4
    assert maps["heads"] == ["make", "model"]
    assert maps["make_to_idx"] == {"Audi": 0, "BMW": 1} and maps["makes"] == ["Audi", "BMW"]
    assert maps["models"] == ["A4", "A6", "M3", "X5"] and maps["model_counts"] == {"A4": 2, "A6": 1, "M3": 1, "X5": 1}
    assert maps["model_to_make"] == {"A4": "Audi", "M3": "BMW", "X5": "BMW"}  # A6 never had a make
    assert (out / "label_maps.json").read_text().startswith('{\n  "heads"')  # indent=2, sorted keys
    assert _read_json(out / "class_to_idx.json") == {"A4": 0, "A6": 1, "M3": 2, "X5": 3}
    tree = sorted(p.relative_to(out / "imagefolder").as_posix() for p in (out / "imagefolder").rglob("*.jpg"))
    assert tree == [
        "test/A6/C3_001.jpg",
        "train/A4/A1_001.jpg",
        "train/A4/A1_002.jpg",
        "train/M3/B8_001.jpg",
        "val/X5/B7_001.jpg",
    ]
    _assert_round_trip(out, CAR_HEADS, records)


def test_lego_round_trip_with_unknown_colours_and_unsafe_class(tmp_path):
    records = _lego_records(tmp_path)
    out = tmp_path / "lego"
    summary = export_dataset(out, heads=LEGO_HEADS, records=records, link="copy")
    assert summary["folder_head"] == "part" and summary["labels_file"] == "labels.csv"
    assert (out / "labels.csv").read_text().splitlines()[:3] == [
        "filename,part,color",
        "p1_001.png,brick 2x4,red",
        "p1_002.png,brick 2x4,",
    ]
    maps = _read_json(out / "label_maps.json")
    assert maps["colors"] == ["Blue", "red"] and maps["color_counts"] == {"Blue": 1, "red": 2}
    assert maps["parts"] == ["1/2 plate", "brick 2x4", "plate"]
    assert not any(k.endswith("_to_part") or k.endswith("_to_color") for k in maps)
    # "1/2 plate" is not a folder name: percent-encoded in the tree, mapping recorded.
    assert (out / "imagefolder/test/1%2F2 plate/p3_001.png").is_file()
    assert _read_json(out / "imagefolder_class_names.json") == {"1%2F2 plate": "1/2 plate"}
    assert _read_json(out / "class_to_idx.json") == {"1%2F2 plate": 0, "brick 2x4": 1, "plate": 2}
    _assert_round_trip(out, LEGO_HEADS, records)


def test_retrieval_round_trip_one_head(tmp_path):
    records = _retrieval_records(tmp_path)
    out = tmp_path / "retrieval"
    export_dataset(out, heads=RETRIEVAL_HEADS, records=records)
    maps = _read_json(out / "label_maps.json")
    assert maps["labels"] == ["id-03", "id-17"] and maps["label_to_idx"] == {"id-03": 0, "id-17": 1}
    assert _read_json(out / "splits/train_ids.json") == ["id-17"]
    assert _read_json(out / "splits/test_ids.json") == ["id-99"]
    assert not list((out / "imagefolder/test").iterdir())  # unlabeled: not in the tree
    _assert_round_trip(out, RETRIEVAL_HEADS, records)


def test_sku_head_plural(tmp_path):
    out = tmp_path / "sku"
    export_dataset(
        out, heads=[{"name": "sku", "parent": None}], records=[_rec(tmp_path, "x_1.jpg", {"sku": "4711"}, "x", "train")]
    )
    maps = _read_json(out / "label_maps.json")
    assert maps["skus"] == ["4711"] and maps["heads"] == ["sku"]


def test_imagefolder_kind_from_an_export_without_csv(tmp_path):
    out = tmp_path / "lego"
    export_dataset(out, heads=LEGO_HEADS, records=_lego_records(tmp_path))
    (out / "labels.csv").unlink()
    data = read_export(out)
    assert data.kind == "imagefolder" and data.heads == ["part", "color"]
    rows = {row.where: row for row in data.rows}
    assert rows["imagefolder/test/1%2F2 plate/p3_001.png"].labels == {"part": "1/2 plate", "color": None}
    assert rows["imagefolder/train/brick 2x4/p1_001.png"].split == "train"
    assert rows["imagefolder/train/brick 2x4/p1_001.png"].group == "p1"
    assert len(data.rows) == 4  # p4 has no part


def test_read_hand_made_torchvision_imagefolder(tmp_path):
    root = tmp_path / "hand"
    for split, cls, name in [
        ("train", "cat", "c1.jpg"),
        ("train", "cat", "c2.JPG"),
        ("train", "dog", "d1.png"),
        ("val", "cat", "c3.jpg"),
        ("val", "dog", "d2.jpg"),
    ]:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / name).write_bytes(_jpeg())
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    data = read_export(root)
    assert data.kind == "imagefolder" and data.heads == ["label"]
    assert sorted((r.where, r.labels["label"], r.split, r.source) for r in data.rows) == [
        ("train/cat/c1.jpg", "cat", "train", "real"),
        ("train/cat/c2.JPG", "cat", "train", "real"),
        ("train/dog/d1.png", "dog", "train", "real"),
        ("val/cat/c3.jpg", "cat", "val", "real"),
        ("val/dog/d2.jpg", "dog", "val", "real"),
    ]
    assert all(r.path.is_absolute() and r.path.is_file() for r in data.rows)


def test_inferred_group_crossing_splits_is_split_not_refused(tmp_path):
    root = tmp_path / "dogs"
    for split in ("train", "val"):
        (root / split / "n0208").mkdir(parents=True)
        (root / split / "n0208" / f"n0208_{len(split)}.jpg").write_bytes(_jpeg())
    data = read_export(root)
    assert sorted(r.group for r in data.rows) == ["n0208@train", "n0208@val"]
    assert len(data.notes) == 1 and "n0208" in data.notes[0][0]


# --------------------------------------------------------------------------------------------------- link modes


def test_hardlink_mode_shares_the_inode(tmp_path):
    records = _car_records(tmp_path)
    out = tmp_path / "export"
    summary = export_dataset(out, heads=CAR_HEADS, records=records, link="hardlink")
    assert summary["hardlink_fallback_copies"] == 0
    src = Path(records[0].src_path)
    assert os.path.samefile(out / "images/A1_001.jpg", src)
    assert os.path.samefile(out / "imagefolder/train/A4/A1_001.jpg", src)
    assert not (out / "images/A1_001.jpg").is_symlink()


def test_hardlink_falls_back_to_copy_across_devices(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(formats.os, "link", no_link)
    records = _car_records(tmp_path)
    summary = export_dataset(tmp_path / "export", heads=CAR_HEADS, records=records)
    assert summary["hardlink_fallback_copies"] == 6 + 5
    copy = tmp_path / "export/images/A1_001.jpg"
    assert copy.read_bytes() == Path(records[0].src_path).read_bytes()
    assert not os.path.samefile(copy, records[0].src_path)


def test_copy_mode_is_independent(tmp_path):
    records = _car_records(tmp_path)
    out = tmp_path / "export"
    export_dataset(out, heads=CAR_HEADS, records=records, link="copy")
    for rel in ("images/A1_001.jpg", "imagefolder/train/A4/A1_001.jpg"):
        assert not (out / rel).is_symlink() and not os.path.samefile(out / rel, records[0].src_path)
        assert (out / rel).read_bytes() == Path(records[0].src_path).read_bytes()


def test_symlink_mode_links_to_the_sources(tmp_path):
    records = _car_records(tmp_path)
    out = tmp_path / "export"
    export_dataset(out, heads=CAR_HEADS, records=records, link="symlink")
    for rel in ("images/A1_001.jpg", "imagefolder/train/A4/A1_001.jpg"):
        assert (out / rel).is_symlink() and (out / rel).resolve() == Path(records[0].src_path).resolve()
    _assert_round_trip(out, CAR_HEADS, records)


def test_unknown_link_mode_refused(tmp_path):
    with pytest.raises(FormatError, match="link must be one of"):
        export_dataset(tmp_path / "x", heads=CAR_HEADS, records=[], link="move")


# ----------------------------------------------------------------------------------------------- export refusals


def test_export_into_non_empty_folder_refused_and_nothing_written(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FormatError, match="not empty"):
        export_dataset(out, heads=CAR_HEADS, records=_car_records(tmp_path))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_into_existing_empty_folder_works(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    export_dataset(out, heads=CAR_HEADS, records=_car_records(tmp_path))
    assert (out / "car_labels.csv").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(formats, "_json_text", boom)  # fails after images/ and the CSVs are written
    with pytest.raises(OSError, match="disk on fire"):
        export_dataset(tmp_path / "export", heads=CAR_HEADS, records=_car_records(tmp_path))
    assert not (tmp_path / "export").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_lists_every_record_problem(tmp_path):
    good = _src(tmp_path, "ok_1.jpg")
    records = [
        ExportRecord("ok_1.jpg", good, {"make": "Audi", "model": "A4"}, "g1", "real", "train"),
        ExportRecord("ok_1.jpg", good, {"make": "Audi", "model": "A4"}, "g2", "real", "train"),  # duplicate
        ExportRecord("../evil.jpg", good, {"make": "Audi"}, "g3", "real", "train"),
        ExportRecord("notes.txt", good, {"make": "Audi"}, "g4", "real", "train"),
        ExportRecord("gone_1.jpg", str(tmp_path / "nope.jpg"), {"make": "Audi"}, "g5", "real", "train"),
        ExportRecord("x_1.jpg", good, {"make": "BMW", "model": "A4", "trim": "S"}, "g1", "web", "dev"),
        ExportRecord("y_1.jpg", good, {"make": "n/a"}, "g6", "real", "val"),
        ExportRecord("z_1.jpg", good, {}, "g1", "real", "val"),  # g1 now in train and val
    ]
    with pytest.raises(FormatError) as exc:
        export_dataset(tmp_path / "export", heads=CAR_HEADS, records=records)
    text = " | ".join(f"{w}: {m}" for w, m in exc.value.problems)
    for expected in [
        "is also used by record 0",
        "plain file name",
        "extension torchvision",
        "nope.jpg does not exist",
        "'trim', which is not a head",
        "split 'dev'",
        "source 'web'",
        "reads back as unknown",
        "group 'g1'",
        "more than one make",
    ]:
        assert expected in text
    assert not (tmp_path / "export").exists()


def test_export_bad_heads(tmp_path):
    with pytest.raises(FormatError, match="parent 'brand' is not another head"):
        export_dataset(tmp_path / "x", heads=[{"name": "model", "parent": "brand"}], records=[])
    with pytest.raises(FormatError, match="'filename'"):
        export_dataset(tmp_path / "x", heads=[{"name": "filename", "parent": None}], records=[])


def test_format_error_str_lists_first_20():
    err = FormatError([(f"line {i}", "bad") for i in range(25)])
    text = str(err)
    assert text.startswith("25 problems:") and "line 19: bad" in text and "line 20: bad" not in text
    assert "and 5 more" in text
    assert isinstance(err, ValueError) and str(FormatError("only", where="x")) == "x: only"


# ---------------------------------------------------------------------------------------------- malformed inputs


@pytest.fixture
def car_export(tmp_path):
    out = tmp_path / "export"
    export_dataset(out, heads=CAR_HEADS, records=_car_records(tmp_path))
    return out


def _problems(folder) -> str:
    with pytest.raises(FormatError) as exc:
        read_export(folder)
    return "\n".join(f"{w}: {m}" for w, m in exc.value.problems)


def _write_csv(path, text):
    path.write_text(text, encoding="utf-8")


def test_no_known_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    text = _problems(tmp_path / "stuff")
    assert "no car_labels.csv, labels.csv or imagefolder/ found" in text and "expected one of these layouts" in text


def test_wrong_header(car_export):
    _write_csv(car_export / "car_labels.csv", "image,make,model\nA1_001.jpg,Audi,A4\n")
    text = _problems(car_export)
    assert "car_labels.csv line 1" in text and "filename,make,model" in text


def test_labels_csv_header_must_start_with_filename(tmp_path):
    out = tmp_path / "lego"
    export_dataset(out, heads=LEGO_HEADS, records=_lego_records(tmp_path))
    _write_csv(out / "labels.csv", "part,color,filename\n")
    assert "labels.csv line 1" in _problems(out)


def test_wrong_cell_count_and_empty_filename_and_duplicate(car_export):
    lines = (car_export / "car_labels.csv").read_text().splitlines()
    lines[2] = "A1_002.jpg,Audi"  # line 3: too few cells
    lines[3] = ",BMW,X5"  # line 4: empty filename
    lines[4] = "A1_001.jpg,BMW,M3"  # line 5: duplicate of line 2
    _write_csv(car_export / "car_labels.csv", "\n".join(lines) + "\n")
    text = _problems(car_export)
    assert "car_labels.csv line 3: 2 cell(s), expected 3" in text
    assert "car_labels.csv line 4: empty filename" in text
    assert "car_labels.csv line 5: duplicate filename 'A1_001.jpg' (first on line 2)" in text


def test_missing_image_file(car_export):
    (car_export / "images/B7_001.jpg").unlink()
    assert "car_labels.csv line 4: image file images/B7_001.jpg is missing" in _problems(car_export)


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/passwd", "sub/../../x.jpg", "C:\\x.jpg"])
def test_path_escape(car_export, name):
    with open(car_export / "car_labels.csv", "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow([name, "Audi", "A4"])
    text = _problems(car_export)
    assert "car_labels.csv line 8" in text and ("absolute path" in text or "tries to leave" in text)


def test_malformed_json_names_file_line_and_column(car_export):
    (car_export / "splits.json").write_text('{\n  "train": ["A1_001.jpg",]\n}\n')
    text = _problems(car_export)
    assert "splits.json line 2 column" in text and "malformed JSON" in text


def test_malformed_label_maps_json(car_export):
    (car_export / "label_maps.json").write_text("{nope")
    assert "label_maps.json line 1 column 2: malformed JSON" in _problems(car_export)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (["A1_001.jpg"], "splits.json: must be a JSON object"),
        ({"train": [], "val": [], "test": [], "valid": []}, "unknown key 'valid'"),
        ({"train": [], "val": []}, "no 'test' list"),
        ({"train": "A1_001.jpg", "val": [], "test": []}, "splits.json train: must be a list"),
        ({"train": [3], "val": [], "test": []}, "splits.json train[0]: 3 is not a filename"),
    ],
)
def test_splits_json_shape(car_export, content, expected):
    (car_export / "splits.json").write_text(json.dumps(content))
    assert expected in _problems(car_export)


def test_filename_in_two_splits_and_unknown_filename(car_export):
    splits = _read_json(car_export / "splits.json")
    splits["val"] += ["A1_001.jpg", "ghost.jpg"]
    (car_export / "splits.json").write_text(json.dumps(splits))
    text = _problems(car_export)
    assert "splits.json val[1]: 'A1_001.jpg' is in both train and val" in text
    assert "splits.json val[2]: 'ghost.jpg' is not in car_labels.csv" in text


def test_metadata_problems(car_export):
    lines = (car_export / "metadata.csv").read_text().splitlines()
    lines[1] = "A1_001.jpg,A1,scraped,train"  # bad source
    lines[2] = "A1_002.jpg,A1,real,val"  # disagrees with splits.json
    del lines[3]  # B7_001.jpg has no metadata row
    lines.append("ghost.jpg,G,real,train")
    lines.append("A1_001.jpg,A1")
    _write_csv(car_export / "metadata.csv", "\n".join(lines) + "\n")
    text = _problems(car_export)
    assert "metadata.csv line 2: source 'scraped'" in text
    assert "metadata.csv says split 'val' for 'A1_002.jpg', splits.json says 'train'" in text
    assert "car_labels.csv line 4: 'B7_001.jpg' has no row in metadata.csv" in text
    assert "metadata.csv line 7: 'ghost.jpg' is not in car_labels.csv" in text
    assert "metadata.csv line 8: 2 cell(s), expected 4" in text


def test_metadata_bad_header(car_export):
    _write_csv(car_export / "metadata.csv", "file,grp\n")
    assert "metadata.csv line 1: header is 'file,grp'" in _problems(car_export)


def test_label_maps_disagreeing_with_csv(car_export):
    maps = _read_json(car_export / "label_maps.json")
    del maps["make_to_idx"]["BMW"]
    maps["model_to_make"]["A4"] = "VW"
    (car_export / "label_maps.json").write_text(json.dumps(maps))
    text = _problems(car_export)
    assert "car_labels.csv line 4: make 'BMW' is not in label_maps.json make_to_idx (and 1 other row(s))" in text
    assert "car_labels.csv line 2: model 'A4' has make 'Audi' here, but label_maps.json model_to_make says 'VW'" in text


def test_class_to_idx_mismatch(car_export):
    (car_export / "car_labels.csv").unlink()
    (car_export / "class_to_idx.json").write_text(json.dumps({"A4": 0, "A6": 2, "M3": 1, "Z1": 4}))
    text = _problems(car_export)
    assert "class_to_idx.json: entry 'A6' is 2, but the sorted folder names give 1" in text
    assert "class_to_idx.json: entry 'M3' is 1, but the sorted folder names give 2" in text
    assert "class_to_idx.json: entry 'Z1': 4 has no class folder" in text
    assert "class_to_idx.json: class folder 'X5' has no entry" in text


def test_group_crossing_splits(car_export):
    metadata = (car_export / "metadata.csv").read_text().replace("B7_001.jpg,B7,", "B7_001.jpg,A1,")
    _write_csv(car_export / "metadata.csv", metadata)
    (car_export / "splits/val_ids.json").write_text('["A1"]')
    text = _problems(car_export)
    assert "group 'A1': has images in more than one split" in text and "car_labels.csv line 4" in text
    assert "splits/train_ids.json" not in text  # consistent: A1 is in train and val, both list it


def test_id_files_must_match_groups(car_export):
    (car_export / "splits/train_ids.json").write_text('["A1", "Q9"]')
    text = _problems(car_export)
    assert "splits/train_ids.json: lacks group(s) 'B8'" in text and "lists group(s) 'Q9'" in text


def test_every_problem_reported_together(car_export):
    (car_export / "images/B7_001.jpg").unlink()
    (car_export / "splits.json").write_text("[")
    (car_export / "class_to_idx.json").write_text("ignored in labels_csv mode")
    with open(car_export / "car_labels.csv", "a") as fh:
        fh.write("../x.jpg,Audi,A4\nonly_two,cells\n")
    text = _problems(car_export)
    for expected in ["images/B7_001.jpg is missing", "splits.json line 1", "line 8", "line 9: 2 cell(s)"]:
        assert expected in text


def test_imagefolder_layout_problems(tmp_path):
    root = tmp_path / "export" / "imagefolder"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "c1.jpg").write_bytes(_jpeg())
    (root / "train" / "cat" / "notes.txt").write_text("x")
    (root / "train" / "empty").mkdir()
    (root / "train" / "loose.jpg").write_bytes(_jpeg())
    (root / "valid" / "cat").mkdir(parents=True)
    text = _problems(tmp_path / "export")
    assert "imagefolder/valid/: unexpected folder" in text
    assert "imagefolder/train/cat/notes.txt: not an image file" in text
    assert "imagefolder/train/empty/: class folder has no images" in text
    assert "imagefolder/train/loose.jpg: file outside a class folder" in text


# ---------------------------------------------------------------------------- seed 000 shapes: splits.json entries


SEED_ENTRY_KEYS = {"path", "filename", "make", "model", "make_idx", "model_idx"}


def test_car_export_splits_entries_and_label_maps_in_seed_000_shapes(tmp_path):
    records = _car_records(tmp_path)
    out = tmp_path / "export"
    export_dataset(out, heads=CAR_HEADS, records=records)
    splits, maps = _read_json(out / "splits.json"), _read_json(out / "label_maps.json")
    assert list(splits) == ["train", "val", "test"]
    for head in ("make", "model"):
        to_idx, order = maps[f"{head}_to_idx"], maps[f"{head}_list"]
        assert order == sorted(to_idx) and [to_idx[c] for c in order] == list(range(len(order)))
        assert maps[f"num_{head}s"] == len(order) == len(to_idx) and maps[f"{head}s"] == order
    by_name = {r.filename: r for r in records}
    entries = [e for split in splits.values() for e in split]
    assert len(entries) == len(records)
    for split, items in splits.items():
        for e in items:
            assert set(e) == SEED_ENTRY_KEYS
            r = by_name[e["filename"]]
            assert r.split == split and e["path"] == f"images/{e['filename']}" and (out / e["path"]).is_file()
            for head in ("make", "model"):
                assert e[head] == r.labels[head]
                expected = maps[f"{head}_to_idx"][e[head]] if e[head] is not None else -1
                assert e[f"{head}_idx"] == expected
    # Read back: same labels, splits, groups, sources and file names.
    _assert_round_trip(out, CAR_HEADS, records)


def test_non_car_heads_get_their_own_entry_keys(tmp_path):
    out = tmp_path / "lego"
    export_dataset(out, heads=LEGO_HEADS, records=_lego_records(tmp_path))
    entry = _read_json(out / "splits.json")["train"][0]
    assert entry == {
        "path": "images/p1_001.png",
        "filename": "p1_001.png",
        "part": "brick 2x4",
        "color": "red",
        "part_idx": 1,
        "color_idx": 1,
    }
    maps = _read_json(out / "label_maps.json")
    assert maps["num_parts"] == 3 and maps["color_list"] == ["Blue", "red"] and maps["num_colors"] == 2


def test_old_format_export_still_imports(tmp_path):
    """Earlier releases wrote splits.json as filename lists and label_maps.json without h_list/num_<h>s."""
    records = _car_records(tmp_path)
    out = tmp_path / "export"
    export_dataset(out, heads=CAR_HEADS, records=records)
    splits = _read_json(out / "splits.json")
    (out / "splits.json").write_text(json.dumps({s: [e["filename"] for e in items] for s, items in splits.items()}))
    maps = _read_json(out / "label_maps.json")
    for key in ("make_list", "model_list", "num_makes", "num_models"):
        del maps[key]
    (out / "label_maps.json").write_text(json.dumps(maps))
    _assert_round_trip(out, CAR_HEADS, records)


def test_entries_without_label_maps_are_checked_for_consistent_indices(tmp_path):
    records = _car_records(tmp_path)
    out = tmp_path / "export"
    export_dataset(out, heads=CAR_HEADS, records=records)
    (out / "label_maps.json").unlink()
    _assert_round_trip(out, CAR_HEADS, records)
    splits = _read_json(out / "splits.json")
    splits["train"][1]["make_idx"] = 5  # A1_002 is Audi like A1_001, which says 0
    splits["train"][2]["make_idx"] = 0  # B8_001 is BMW: 0 is Audi's
    splits["val"][0]["make_idx"] = 3  # B7_001 is BMW too
    (out / "splits.json").write_text(json.dumps(splits))
    text = _problems(out)
    assert "splits.json train[1]: make_idx is 5, but splits.json train[0] gives make 'Audi' index 0" in text
    assert "splits.json train[2]: make_idx 0 is make 'Audi' in splits.json train[0], not 'BMW'" in text
    assert "splits.json val[0]: make_idx is 3, but splits.json train[2] gives make 'BMW' index 0" in text


def _edit_entries(folder, edit):
    splits = _read_json(folder / "splits.json")
    edit(splits)
    (folder / "splits.json").write_text(json.dumps(splits))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: s["train"][0].pop("filename"),
            'splits.json train[0]: entry has no \'filename\'; expected {"path": "images/<filename>"',
        ),
        (lambda s: s["train"][1].update(filename=""), "splits.json train[1]: filename '' is not a filename string"),
        (
            lambda s: s["val"][0].update(make_idx=0),
            "splits.json val[0]: make_idx is 0, but label_maps.json make_to_idx['BMW'] is 1",
        ),
        (
            lambda s: s["test"][0].update(model_idx=2),
            "splits.json test[0]: model_idx is 2, but 'C2_001.jpg' has no model label (car_labels.csv line 6); "
            "expected -1",
        ),
        (
            lambda s: s["train"][0].update(model_idx="0"),
            "splits.json train[0]: model_idx '0' must be an integer",
        ),
        (
            lambda s: s["train"][2].update(model="X5"),
            "splits.json train[2]: model is 'X5', but car_labels.csv line 5 says 'M3'; they must agree",
        ),
        (
            lambda s: s["test"][1].update(make="Audi"),
            "splits.json test[1]: make is 'Audi', but car_labels.csv line 7 says None",
        ),
        (
            lambda s: s["train"][0].update(path="images/other.jpg"),
            "splits.json train[0]: path 'images/other.jpg' does not name the file 'A1_001.jpg'; expected "
            "'images/A1_001.jpg'",
        ),
        (
            lambda s: s["train"][0].update(colour="red"),
            "splits.json train[0]: unknown key(s) 'colour'; an entry has path, filename, make, model, make_idx, "
            "model_idx",
        ),
        (lambda s: s["train"].append(7), "splits.json train[3]: 7 is not a filename string or an entry {"),
    ],
)
def test_malformed_new_format_entries_are_refused(car_export, edit, expected):
    _edit_entries(car_export, edit)
    assert expected in _problems(car_export)


def test_label_maps_new_keys_must_agree(car_export):
    maps = _read_json(car_export / "label_maps.json")
    maps["make_list"] = ["BMW", "Audi"]
    maps["num_models"] = 3
    maps["model_to_idx"]["A4"] = 7
    (car_export / "label_maps.json").write_text(json.dumps(maps))
    text = _problems(car_export)
    assert "label_maps.json: make_list must list the make_to_idx classes in index order: 'Audi', 'BMW'" in text
    assert "label_maps.json: model_to_idx must give its 4 class(es) the indices 0..3, each once" in text


def test_label_maps_num_must_match(car_export):
    maps = _read_json(car_export / "label_maps.json")
    maps["num_models"] = 3
    (car_export / "label_maps.json").write_text(json.dumps(maps))
    assert "label_maps.json: num_models is 3, but model_to_idx has 4 class(es)" in _problems(car_export)


def test_clashing_head_names(tmp_path):
    rec = _rec(tmp_path, "x_1.jpg", {"make": "Audi"}, "x", "train")
    with pytest.raises(FormatError, match="clashing splits.json entry keys: 'make_idx'"):
        export_dataset(
            tmp_path / "a",
            heads=[{"name": "make", "parent": None}, {"name": "make_idx", "parent": None}],
            records=[rec],
        )
    with pytest.raises(FormatError, match="clashing splits.json entry keys: 'path'"):
        export_dataset(tmp_path / "b", heads=[{"name": "path", "parent": None}], records=[])
    # "num_make"'s extra key "num_makes" would clash with make's seed key num_makes: the extra is left out.
    out = tmp_path / "c"
    export_dataset(out, heads=[{"name": "make", "parent": None}, {"name": "num_make", "parent": None}], records=[rec])
    maps = _read_json(out / "label_maps.json")
    assert maps["num_makes"] == 1 and maps["num_make_list"] == [] and maps["num_num_makes"] == 0
    # A head called "head": its extra key "heads" is left out; "heads" stays the head names.
    out = tmp_path / "d"
    export_dataset(
        out, heads=[{"name": "head", "parent": None}], records=[_rec(tmp_path, "y_1.jpg", {"head": "h"}, "y", "train")]
    )
    maps = _read_json(out / "label_maps.json")
    assert maps["heads"] == ["head"] and maps["head_list"] == ["h"]
    assert read_export(out).rows[0].labels == {"head": "h"}
