"""Whole-file writes, the project's one helper for them: every artifact, cache entry and derived picture is written
to a unique temp name in its target's folder, then os.replace()d onto the target, so a reader never sees half a
file and a crash leaves no partial one (the temp file is removed when the writer fails). Pure: no Django."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path, writer: Callable[[Path], None]) -> None:
    """Call writer(tmp) on a fresh temp file next to `path` (its folder is created), then replace `path` with it.
    The writer must write to the given name (e.g. open it, or torch.save to it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path, data, *, indent: int = 1) -> None:
    """JSON (NaN/inf refused: json.dumps(allow_nan=False) raises ValueError before anything is written)."""
    write_text_atomic(path, json.dumps(data, indent=indent, allow_nan=False))
