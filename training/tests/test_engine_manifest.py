"""Tests of manifest validation: bad manifests fail before training, unknown labels are masked, the test split
is never read or trained on (CPU only, tiny images)."""

import pytest

from training.engine import parse_manifest, train_model
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset


def tiny(**over):
    return {**TINY_TEST_CONFIG, **over}


def _base_manifest():
    return {
        "heads": [{"name": "part", "classes": ["a", "b"], "parent": None}],
        "items": [
            {"id": 1, "path": "/x/1.jpg", "labels": {"part": "a"}, "split": "train"},
            {"id": 2, "path": "/x/2.jpg", "labels": {"part": None}, "split": "val"},
        ],
    }


def _bad(mutate):
    m = _base_manifest()
    mutate(m)
    return m


@pytest.mark.parametrize(
    "manifest, words",
    [
        (_bad(lambda m: m["items"].pop(0)), ["no items with split 'train'"]),
        (_bad(lambda m: m["heads"][0].update(classes=[])), ["head 'part' has no classes"]),
        (
            _bad(lambda m: m["items"][0]["labels"].update(part="zzz")),
            ["'zzz'", "head 'part'", "not one of its classes"],
        ),
        (_bad(lambda m: m["items"][0].pop("path")), ["missing 'path'", "id 1"]),
        (_bad(lambda m: m["items"][0].update(split="training")), ["'split' must be one of"]),
        (_bad(lambda m: m.update(heads=[])), ["at least one head"]),
        (_bad(lambda m: m["heads"].append({"name": "part", "classes": ["x"]})), ["defined twice"]),
        (_bad(lambda m: m["items"][0]["labels"].update(colour="red")), ["unknown head", "colour"]),
        (_bad(lambda m: m["items"][0]["labels"].update(part=None)), ["no train item has a known label"]),
        (_bad(lambda m: m.pop("items")), ["no 'items' key"]),
    ],
)
def test_bad_manifest_raises_before_training(manifest, words, tmp_path):
    with pytest.raises(ValueError) as exc:
        train_model(manifest, tiny(), tmp_path / "out")
    for w in words:
        assert w in str(exc.value)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_parse_manifest_masks_unknown_and_ignores_test():
    m = _base_manifest()
    m["items"].append({"id": 3, "path": "/nope.jpg", "labels": {"part": "b"}, "split": "test"})
    m["items"].append({"id": 4, "path": "/x/4.jpg", "labels": {}, "split": "train"})  # missing key == null
    parsed = parse_manifest(m)
    assert [it.targets for it in parsed.train] == [(0,), (-100,)]
    assert [it.targets for it in parsed.val] == [(-100,)]
    assert parsed.n_test == 1


def test_the_test_split_is_refused_for_training(tmp_path):
    """Test items are never trained on, read, or used for model selection: a manifest whose labeled items are
    all in the test split cannot train."""
    manifest = make_shapes_dataset(tmp_path / "img", n=8, size=24)
    for it in manifest["items"]:
        it["split"] = "test"
    with pytest.raises(ValueError, match="no items with split 'train'"):
        train_model(manifest, tiny(), tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()
    with pytest.raises(ValueError, match="'split' must be one of"):
        parse_manifest({**manifest, "items": [{**manifest["items"][0], "split": "holdout"}]})


def test_all_train_files_unreadable(tmp_path):
    manifest = _base_manifest()
    with pytest.raises(ValueError, match="none of the 1 train images could be read"):
        train_model(manifest, tiny(epochs=1), tmp_path / "out")
