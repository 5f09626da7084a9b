"""The synthetic shelf generator: determinism, exact boxes and counts, the YOLO / crops layout (pure, no DB)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labeling.detection_formats import crop_box
from labeling.shelf_data import (
    CONTAINER_CLASSES,
    _in_frame_counts,
    detection_manifest,
    generate_shelves,
    make_skus,
    read_yolo_labels,
)

SIZE = (320, 240)


@pytest.fixture(scope="module")
def shelves(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shelves")
    summary = generate_shelves(out, 6, seed=7, size=SIZE)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_output(shelves, tmp_path):
    out, _ = shelves
    generate_shelves(tmp_path / "again", 6, seed=7, size=SIZE)
    assert _files(tmp_path / "again") == _files(out)
    generate_shelves(tmp_path / "other", 6, seed=8, size=SIZE)
    other = _files(tmp_path / "other")
    assert other["images/train/shelf_00000.jpg"] != _files(out)["images/train/shelf_00000.jpg"]


def test_layout_classes_splits_and_skus(shelves):
    out, summary = shelves
    assert (out / "classes.txt").read_text().split() == CONTAINER_CLASSES
    assert summary["splits"] == {"train": 4, "val": 1, "test": 1}
    for split, n in summary["splits"].items():
        assert len(list((out / "images" / split).glob("*.jpg"))) == n
        assert len(list((out / "labels" / split).glob("*.txt"))) == n
    skus = json.loads((out / "skus.json").read_text())
    assert len(skus) == 24
    assert {s["container"] for s in skus} == set(CONTAINER_CLASSES)
    designs = {(s["container"], tuple(s["design"]["label"]), s["design"]["logo"], s["design"]["stripes"]) for s in skus}
    assert len(designs) == 24  # every SKU's label design is its own


def test_skus_are_distinct_for_many_skus():
    skus = make_skus(40, seed=1)
    assert len({s.name for s in skus}) == 40
    assert len({(s.container, tuple(s.design["label"]), s.design["logo"], s.design["stripes"]) for s in skus}) == 40


def test_boxes_are_inside_counts_match_and_yolo_parses(shelves):
    out, summary = shelves
    meta = json.loads((out / "shelves.json").read_text())
    w, h = SIZE
    total = 0
    for photo in meta["photos"]:
        boxes = photo["boxes"]
        assert boxes, photo["image"]
        total += len(boxes)
        counts: dict[str, int] = {}
        for b in boxes:
            x, y, bw, bh = b["box"]
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            fx, fy, fw, fh = b["full_box"]
            assert 0 <= fx and 0 <= fy and fx + fw <= w and fy + fh <= h
            assert meta["min_visible"] <= b["visible"] <= 1.0
            assert b["class"] in CONTAINER_CLASSES
            counts[b["sku"]] = counts.get(b["sku"], 0) + 1
        assert photo["counts"] == counts
        rows = read_yolo_labels(out / photo["label_file"])
        assert len(rows) == len(boxes)
        for (cls, xc, yc, bw, bh), b in zip(rows, boxes, strict=True):
            assert CONTAINER_CLASSES[cls] == b["class"]
            x, y, pw, ph = b["box"]
            assert abs(xc * w - (x + pw / 2)) < 0.01 and abs(yc * h - (y + ph / 2)) < 0.01
            assert abs(bw * w - pw) < 0.01 and abs(bh * h - ph) < 0.01
            assert -1e-5 <= xc - bw / 2 and xc + bw / 2 <= 1 + 1e-5
    assert total == summary["boxes"]
    # occlusion is real: some containers are partly hidden, some too hidden to be labeled
    visible = [b["visible"] for p in meta["photos"] for b in p["boxes"]]
    assert min(visible) < 0.9
    assert summary["hidden"] > 0


def test_visible_counts_only_pixels_the_warp_keeps_in_the_frame():
    # a pure translation 5 px to the left: instance 1 (columns 0-9) loses half its pixels out of the frame,
    # instance 2 (columns 20-29) keeps all; the background (0) is not counted
    ids = np.zeros((8, 40), dtype=np.uint8)
    ids[:, 0:10] = 1
    ids[:, 20:30] = 2
    shift_left = np.array([1, 0, -5, 0, 1, 0, 0, 0], dtype=np.float64)
    counts = _in_frame_counts(ids, shift_left, (40, 8), 3)
    assert counts.tolist() == [0, 8 * 5, 8 * 10, 0]
    # the identity keeps everything
    identity = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float64)
    assert _in_frame_counts(ids, identity, (40, 8), 2).tolist() == [0, 80, 80]


def test_box_crops_show_the_container_not_the_background(shelves):
    """The pixels in a labeled box differ from the wall around the shelves: the box is where something is drawn."""
    out, _ = shelves
    meta = json.loads((out / "shelves.json").read_text())
    for photo in meta["photos"][:3]:
        img = np.asarray(Image.open(out / photo["image"]).convert("RGB"), dtype=np.float32)
        for b in photo["boxes"]:
            x, y, bw, bh = b["box"]
            crop = img[y : y + bh, x : x + bw]
            # a container has a label: colour structure inside the box, unlike the flat wall gradient
            assert crop.std(axis=(0, 1)).max() > 12, (photo["image"], b)


def test_crop_folders_are_a_class_from_folder_sku_set(shelves):
    out, summary = shelves
    crops = list((out / "crops").rglob("*.jpg"))
    assert len(crops) == summary["boxes"]
    skus = {s["name"] for s in json.loads((out / "skus.json").read_text())}
    assert {p.parent.name for p in crops} <= skus
    assert {p.parent.parent.name for p in crops} <= {"train", "val", "test"}
    # each crop is its box cut as the shelf endpoint cuts a detected box (the same margin): train = serve framing
    meta = json.loads((out / "shelves.json").read_text())
    photo = meta["photos"][0]
    stem = Path(photo["image"]).stem
    with Image.open(out / photo["image"]) as img:
        for k, b in enumerate(photo["boxes"][:5]):
            with Image.open(out / "crops" / photo["split"] / b["sku"] / f"{stem}_{k:03d}.jpg") as c:
                assert c.size == crop_box(img, b["box"]).size and c.size != tuple(b["box"][2:])


def test_detection_manifest(shelves):
    out, summary = shelves
    m = detection_manifest(out)
    assert m["classes"] == CONTAINER_CLASSES
    assert len(m["items"]) == 6
    assert sum(len(it["boxes"]) for it in m["items"]) == summary["boxes"]
    assert all(Path(it["path"]).is_file() and b[4] in CONTAINER_CLASSES for it in m["items"] for b in it["boxes"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_photos": 0}, "n_photos"),
        ({"size": (32, 32)}, "size"),
        ({"min_visible": 0}, "min_visible"),
        ({"rows": ()}, "rows"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    args = {"n_photos": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_shelves(tmp_path, args.pop("n_photos"), **args)
