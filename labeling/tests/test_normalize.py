import pytest

from labeling.normalize import clean_label, normalize_key


@pytest.mark.parametrize("raw", ["Toyota", "TOYOTA", " Toyota.", "toyota ", "Toyota;", "\tToyota  "])
def test_spellings_share_one_key(raw):
    assert normalize_key(raw) == "toyota"


@pytest.mark.parametrize("raw", ["", "  ", "9999", "unknown", "N/A", None, "?"])
def test_unknown_values_are_not_classes(raw):
    assert clean_label(raw) is None


def test_inner_whitespace_collapsed_and_case_kept():
    assert clean_label("  Land   Rover. ") == "Land Rover"
