"""Label spelling normalisation: `Toyota`, `TOYOTA`, ` Toyota.` are one class."""

import re
import unicodedata

# Spellings that mean "unknown": never a class, the image stays unlabeled for that head.
UNKNOWN_VALUES = {"", "9999", "unknown", "unk", "n/a", "na", "none", "null", "nan", "-", "?", "unlabeled"}

_TRAILING = re.compile(r"[\s.,;:!]+$")
_SPACES = re.compile(r"\s+")


def clean_label(raw: str | None) -> str | None:
    """The display form of a label: trimmed, inner whitespace collapsed, trailing punctuation dropped.
    None when the value means unknown."""
    if raw is None:
        return None
    text = unicodedata.normalize("NFKC", str(raw)).strip()
    text = _TRAILING.sub("", _SPACES.sub(" ", text)).strip()
    if text.casefold() in UNKNOWN_VALUES:
        return None
    return text


def normalize_key(raw: str) -> str:
    """The uniqueness key of a class name within a head (case- and punctuation-insensitive)."""
    cleaned = clean_label(raw) or ""
    return cleaned.casefold()
