"""Tests for the synthetic demo photo generator (pure Python, no database)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labeling.demo_data import CSV_HEADER, UNKNOWN_COLOR, generate_demo

SMALL = dict(parts=12, colors=8, images_per_combo=1, image_size=96)


def _digest(out: Path) -> dict[str, str]:
    files = sorted((out / "images").iterdir()) + [out / "labels.csv", out / "planted.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _rows(summary) -> list[dict]:
    with summary.csv_path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _loads(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_a")
    return generate_demo(out, seed=3, **SMALL)


def test_deterministic_same_seed(demo, tmp_path):
    again = generate_demo(tmp_path / "b", seed=3, **SMALL)
    assert _digest(demo.out_dir) == _digest(again.out_dir)
    assert again.planted == demo.planted


def test_different_seed_changes_images(demo, tmp_path):
    other = generate_demo(tmp_path / "c", seed=4, **SMALL)
    a, b = _digest(demo.out_dir), _digest(other.out_dir)
    common = set(a) & set(b)
    assert common
    changed = [n for n in common if n.endswith(".jpg") and a[n] != b[n]]
    assert len(changed) > 0.9 * len([n for n in common if n.endswith(".jpg")])


def test_counts_and_csv(demo):
    assert len(demo.parts) >= 12 and len(set(demo.parts)) == len(demo.parts)
    assert len(demo.colors) >= 8 and len(set(demo.colors)) == len(demo.colors)
    with demo.csv_path.open(encoding="utf-8") as fh:
        assert fh.readline().strip() == "image_filename,part,color,source,group"
    assert CSV_HEADER == ["image_filename", "part", "color", "source", "group"]
    rows = _rows(demo)
    files = sorted(p.name for p in (demo.out_dir / "images").iterdir())
    names = [r["image_filename"] for r in rows]
    assert len(names) == len(set(names))
    assert sorted(names) == files
    assert demo.n_images == len(rows)
    # every combination appears at least once
    assert {r["part"] for r in rows} == set(demo.parts)
    assert {r["color"] for r in rows} - {UNKNOWN_COLOR} == set(demo.colors)


def test_sources_unknown_colors_and_groups(demo):
    rows = _rows(demo)
    sources = {r["source"] for r in rows}
    assert sources == {"real", "synthetic"}
    n_real = sum(r["source"] == "real" for r in rows)
    assert 0.15 < n_real / len(rows) < 0.45
    assert any(r["color"] == UNKNOWN_COLOR for r in rows)
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        assert re.fullmatch(r"P\d{4,}", r["group"])
        m = re.fullmatch(r"(P\d{4,})_(\d+)\.jpg", r["image_filename"])
        assert m and m.group(1) == r["group"]
        by_group.setdefault(r["group"], []).append(r)
    for members in by_group.values():
        assert len({m["source"] for m in members}) == 1
        seqs = sorted(int(m["image_filename"].split("_")[1][:-4]) for m in members)
        assert seqs == list(range(1, len(members) + 1))


def test_group_sizes_default_combo(tmp_path):
    s = generate_demo(tmp_path / "g", seed=1, parts=12, colors=8, images_per_combo=8, image_size=48)
    rows = _rows(s)
    planted_groups = {
        r["group"]
        for r in rows
        if r["image_filename"]
        in {d["duplicate"] for d in s.planted["near_duplicates"]} | {d["image_filename"] for d in s.planted["corrupt"]}
    }
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    assert all(2 <= n <= 4 for g, n in sizes.items() if g not in planted_groups)
    assert len(rows) >= 12 * 8 * 8


def test_planted_consistent_with_csv(demo):
    planted = json.loads((demo.out_dir / "planted.json").read_text(encoding="utf-8"))
    assert planted == demo.planted
    rows = {r["image_filename"]: r for r in _rows(demo)}
    img = demo.out_dir / "images"

    flipped = planted["flipped_labels"]
    assert flipped
    for d in flipped:
        assert d["true_part"] != d["written_part"]
        assert rows[d["image_filename"]]["part"] == d["written_part"]
        assert d["true_part"] in demo.parts

    dups = planted["near_duplicates"]
    assert len(dups) >= 3
    for d in dups:
        o, c = rows[d["original"]], rows[d["duplicate"]]
        assert o["part"] == d["original_part"] and c["part"] == d["duplicate_part"]
        assert o["part"] != c["part"]
        assert o["group"] != c["group"]
        with Image.open(img / d["original"]) as a, Image.open(img / d["duplicate"]) as b:
            assert a.size == b.size
            a_small = np.asarray(a.convert("L").resize((16, 16)), dtype=np.float32)
            b_small = np.asarray(b.convert("L").resize((16, 16)), dtype=np.float32)
            diff = float(np.abs(a_small - b_small).mean())
            assert diff < 12  # visually the same picture
        assert (img / d["original"]).read_bytes() != (img / d["duplicate"]).read_bytes()

    corrupt = planted["corrupt"]
    assert len(corrupt) == 2
    assert {d["kind"] for d in corrupt} == {"truncated_jpeg", "not_an_image"}
    for d in corrupt:
        assert d["image_filename"] in rows
        assert not _loads(img / d["image_filename"])
    truncated = next(d for d in corrupt if d["kind"] == "truncated_jpeg")
    assert (img / truncated["image_filename"]).read_bytes()[:2] == b"\xff\xd8"

    corrupt_names = {d["image_filename"] for d in corrupt}
    for name in rows:
        if name not in corrupt_names:
            assert _loads(img / name), name

    small = planted["small_images"]
    assert len(small) >= 3
    for d in small:
        with Image.open(img / d["image_filename"]) as im:
            assert max(im.size) < 224
            assert im.size == (d["width"], d["height"])

    for d in planted["unknown_color"]:
        assert rows[d["image_filename"]]["color"] == UNKNOWN_COLOR
        assert d["true_color"] in demo.colors


def test_size_rule_full_resolution(tmp_path):
    s = generate_demo(tmp_path / "s", seed=5, parts=12, colors=8, images_per_combo=1, image_size=256)
    img = s.out_dir / "images"
    small = {d["image_filename"] for d in s.planted["small_images"]}
    corrupt = {d["image_filename"] for d in s.planted["corrupt"]}
    assert small
    for r in _rows(s):
        name = r["image_filename"]
        if name in corrupt:
            continue
        with Image.open(img / name) as im:
            if name in small:
                assert max(im.size) < 224
            else:
                assert min(im.size) >= 224
                assert im.size == (256, 256)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_demo(tmp_path / "x", parts=0)
    with pytest.raises(ValueError):
        generate_demo(tmp_path / "x", colors=999)
