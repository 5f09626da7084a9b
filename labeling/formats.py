"""Write and read a dataset in the file formats of our users' own training scripts ("the seeds"), so an export
can be trained on by those scripts and re-imported losslessly. Pure: no Django, only the standard library
(plus `labeling.normalize`, itself pure).

Layout written by `export_dataset(out_dir, heads=..., records=...)`:

    images/<filename>                      every record's file (hard link, copy or symlink)
    car_labels.csv | labels.csv            filename,<head1>,<head2>...   (car_labels.csv iff heads == make,model)
    metadata.csv                           filename,group,source,split   (ours: groups and sources round-trip)
    splits.json                            {"train": [entry...], "val": [...], "test": [...]}  (by filename)
    splits/{train,val,test}_ids.json       sorted GROUP ids per split (the retrieval seed splits by ID)
    label_maps.json                        the seed's maps per head + our extras (below)
    class_to_idx.json                      ImageFolder folder name -> index (sorted, 0..N-1, like torchvision)
    imagefolder/<split>/<folder>/<filename>   the folder head's classes (the first head nobody's parent)
    imagefolder_class_names.json           only when a class name is not a safe folder name: {folder: class}

splits.json is seed 000's shape: each entry is one image,

    {"path": "images/<filename>", "filename": "<filename>", "<head>": <class or null>, ..., "<head>_idx": <int>, ...}

for every head (a car export: exactly path, filename, make, model, make_idx, model_idx). `path` is relative to
the export folder (the folder holding splits.json): the image is the file images/<filename> the export writes,
so a seed opens os.path.join(export_dir, entry["path"]). `<head>_idx` is the class's index in label_maps.json
`<head>_to_idx`, -1 when the image has no label for that head (null). Reading accepts these entries and the
plain filename lists of earlier releases ({"train": ["<filename>", ...], ...}); where entries carry labels or
indices they must agree with the labels CSV and label_maps.json (else a problem, nothing imported). File names
are kept as written (images/<filename>), so an import names each photo by its export file name.

label_maps.json, per head h (plural <h>s: make -> makes): the seed's keys h_to_idx (class -> index, classes
sorted, 0..N-1), h_list (the classes in index order) and num_<h>s (N, e.g. num_makes); our extras <h>s (= h_list,
kept for earlier readers), h_counts ({class: images}), <child>_to_<parent> ({child class: parent class}) and
"heads" (the head names in order). Head names whose keys would clash (a head "num_make" next to "make") refuse
the export when a seed key, "heads" or a <child>_to_<parent> key is involved; an extra key that clashes is left
out (the seed's key wins). Head names whose splits.json entry keys would clash ("path", a head "make_idx" next to
"make") refuse the export.

Class names that are not safe folder names ("/", "\\", control characters, Windows-reserved <>:"|?*, "%",
a leading "." or space, a trailing "." or space) are percent-encoded for the ImageFolder tree only (UTF-8
bytes as %XX; "1/2 plate" -> "1%2F2 plate"), and imagefolder_class_names.json records folder -> class. Safe
names are used verbatim, and a verbatim name never contains "%", so the encoding is unambiguous. The CSV and
JSON files always hold the real class names. `read_export` decodes folder names only through that mapping
file (a hand-made folder named "a%20b" stays "a%20b").

`read_export(folder)` reads such an export back (or a seed's own labels CSV, or a plain torchvision ImageFolder)
and raises FormatError listing every problem it found, each as (where, message)."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .normalize import clean_label

SPLITS = ("train", "val", "test")
SOURCES = ("real", "synthetic", "legacy", "production")
LINK_MODES = ("hardlink", "copy", "symlink")
CAR_HEADS = ("make", "model")
CAR_LABELS = "car_labels.csv"
LABELS = "labels.csv"
METADATA = "metadata.csv"
SPLITS_JSON = "splits.json"
LABEL_MAPS = "label_maps.json"
CLASS_TO_IDX = "class_to_idx.json"
IMAGEFOLDER = "imagefolder"
FOLDER_NAMES = "imagefolder_class_names.json"
# torchvision.datasets.folder.IMG_EXTENSIONS: ImageFolder silently skips any other file.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
JUNK_FILES = {"thumbs.db", "desktop.ini"}
MAX_SHOWN = 20
MAX_NAME_BYTES = 255

_GROUP_RE = re.compile(r"^(?P<group>.+?)_(?P<seq>\d+)$")  # the group rule of every import (group_from_name)
_HEAD_RE = re.compile(r"^[-a-zA-Z0-9_]+$")  # Head.name is a slug
_FOLDER_UNSAFE = set('/\\<>:"|?*%')
_LAYOUTS = (
    "car_labels.csv or labels.csv (header filename,<head>,...) with the images in images/<filename>; "
    "imagefolder/<split>/<class>/<image>; or a torchvision ImageFolder: train/<class>/<image> "
    "(+ val/, test/)"
)

Problems = list[tuple[str, str]]


class FormatError(ValueError):
    """Malformed export: .problems is a list of (where, message) strings a person can act on; str() lists the
    first 20."""

    def __init__(self, problems: Problems | str, where: str = "export"):
        if isinstance(problems, str):
            problems = [(where, problems)]
        self.problems: Problems = [(str(w), str(m)) for w, m in problems]
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.problems)
        lines = [f"{where}: {message}" for where, message in self.problems[:MAX_SHOWN]]
        if n > MAX_SHOWN:
            lines.append(f"... and {n - MAX_SHOWN} more problem(s)")
        if n == 1:
            return lines[0]
        return f"{n} problems:\n" + "\n".join(f"  {line}" for line in lines)

    def __str__(self) -> str:
        return self._render()


@dataclass(frozen=True)
class ExportRecord:
    filename: str  # unique name inside the export (the caller makes it unique, e.g. "<ID>_<seq>.jpg")
    src_path: str  # where the image file is now
    labels: dict[str, str | None]
    group: str
    source: str
    split: str


@dataclass(frozen=True)
class ImportedRow:
    where: str  # how errors name this row: "car_labels.csv line 12" or "imagefolder/train/Audi/x.jpg"
    path: Path  # absolute path of the image file inside the export
    labels: dict[str, str | None]
    group: str
    source: str
    split: str | None  # None when the export had no split info for it


@dataclass
class ImportedDataset:
    heads: list[str]
    rows: list[ImportedRow]
    kind: str  # "labels_csv" | "imagefolder"
    # Things done that a person may want to know about, not errors (e.g. a group inferred from file names that
    # would have crossed splits was split in two): (where, message).
    notes: Problems = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- helpers


def plural(head: str) -> str:
    """The label_maps.json key of a head's class list: make → makes, label → labels, sku → skus."""
    return head + "s"


def group_from_name(filename: str) -> str:
    """`<ID>_<seq>.jpg` → ID (up to the last `_<digits>`); otherwise the file stem."""
    stem = PurePosixPath(filename.replace("\\", "/")).stem
    m = _GROUP_RE.match(stem)
    return m.group("group") if m else stem


def folder_head(heads: Sequence[Mapping]) -> str:
    """The head whose classes name the ImageFolder folders: the first head no other head names as parent."""
    parents = {h.get("parent") for h in heads}
    return next((h["name"] for h in heads if h["name"] not in parents), heads[0]["name"])


def folder_name_for_class(name: str) -> str:
    """The ImageFolder folder name of a class: verbatim when safe, else percent-encoded (see module doc)."""
    last = len(name) - 1
    out = []
    for i, ch in enumerate(name):
        unsafe = ch in _FOLDER_UNSAFE or ord(ch) < 32 or ord(ch) == 127
        unsafe = unsafe or (i == 0 and ch in ". ") or (i == last and ch in ". ")
        out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")) if unsafe else ch)
    return "".join(out)


def _is_unknown(value: str) -> bool:
    return clean_label(value) is None


def _json_text(obj, *, sort_keys: bool = True) -> str:
    return json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def _quote_list(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------- export


def _check_heads(heads: Sequence[Mapping]) -> tuple[list[str], dict[str, str]]:
    problems: Problems = []
    names: list[str] = []
    parents: dict[str, str] = {}
    if not heads:
        raise FormatError("a project needs at least one head", where="heads")
    for i, head in enumerate(heads):
        name = head.get("name") if isinstance(head, Mapping) else None
        where = f"heads[{i}]"
        if not isinstance(name, str) or not _HEAD_RE.match(name):
            problems.append((where, f"head name {name!r} must be a slug (letters, digits, '-', '_')"))
            continue
        if name == "filename":
            problems.append((where, "a head cannot be called 'filename' (the CSV's first column)"))
        if name in names:
            problems.append((where, f"head {name!r} appears twice"))
        names.append(name)
        parent = head.get("parent")
        if parent is not None:
            parents[name] = parent
    for child, parent in parents.items():
        if parent not in names or parent == child:
            problems.append((f"head {child!r}", f"parent {parent!r} is not another head of the project"))
    for start in parents:  # cycles
        seen, cur = {start}, parents.get(start)
        while cur is not None:
            if cur in seen:
                problems.append((f"head {start!r}", "the parent chain loops back to itself"))
                break
            seen.add(cur)
            cur = parents.get(cur)
    if problems:
        raise FormatError(problems)
    return names, parents


def _check_filename(name) -> str | None:
    if not isinstance(name, str) or not name:
        return "empty filename"
    if name != name.strip():
        return f"filename {name!r} has leading or trailing whitespace"
    if "/" in name or "\\" in name:
        return f"filename {name!r} must be a plain file name (no '/' or '\\')"
    if name.startswith("."):
        return f"filename {name!r} starts with '.'; hidden files are skipped by ImageFolder"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return f"filename {name!r} contains control characters"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"filename {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes"
    if not name.lower().endswith(IMG_EXTENSIONS):
        exts = ", ".join(IMG_EXTENSIONS)
        return f"filename {name!r} has an extension torchvision's ImageFolder skips (use one of {exts})"
    return None


def _label_maps(
    head_names: list[str], parents: dict[str, str], records: Sequence[ExportRecord], problems: Problems
) -> dict:
    maps: dict = {"heads": list(head_names)}
    extras: list[tuple[str, object]] = []  # (key, value): ours, left out where a seed key has the name
    for h in head_names:
        counts = Counter(r.labels.get(h) for r in records if isinstance(r.labels.get(h), str))
        classes = sorted(counts)
        maps[f"{h}_to_idx"] = {c: i for i, c in enumerate(classes)}
        maps[f"{h}_list"] = classes
        maps[f"num_{plural(h)}"] = len(classes)
        extras += [(plural(h), classes), (f"{h}_counts", dict(counts))]
    for child, parent in parents.items():
        seen: dict[str, dict[str, str]] = defaultdict(dict)  # child class → {parent class: first filename}
        for r in records:
            c, p = r.labels.get(child), r.labels.get(parent)
            if isinstance(c, str) and isinstance(p, str):
                seen[c].setdefault(p, r.filename)
        mapping = {}
        for c, ps in seen.items():
            if len(ps) > 1:
                examples = "; ".join(f"{p!r} ({fn})" for p, fn in sorted(ps.items()))
                problems.append(
                    (
                        f"{child} {c!r}",
                        f"has more than one {parent}: {examples}; the seeds need one {parent} per {child}",
                    )
                )
            mapping[c] = next(iter(sorted(ps)))
        maps[f"{child}_to_{parent}"] = mapping
    # Key collisions (e.g. a head named "make_to_idx") would silently overwrite each other: the keys the seeds and
    # read_export use must be distinct; an extra key that clashes with any other key is left out.
    keys = ["heads"]
    for h in head_names:
        keys += [f"{h}_to_idx", f"{h}_list", f"num_{plural(h)}"]
    keys += [f"{c}_to_{p}" for c, p in parents.items()]
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        problems.append(("heads", f"head names give clashing label_maps.json keys: {_quote_list(dupes)}"))
    extra_count = Counter(k for k, _ in extras)
    for key, value in extras:
        if key not in maps and extra_count[key] == 1:
            maps[key] = value
    return maps


def _entry_keys(head_names: Sequence[str]) -> list[str]:
    """The keys of a splits.json entry, in the order written."""
    return ["path", "filename", *head_names, *(f"{h}_idx" for h in head_names)]


def _split_entry(r: ExportRecord, head_names: Sequence[str], label_maps: dict) -> dict:
    entry: dict = {"path": f"images/{r.filename}", "filename": r.filename}
    for h in head_names:
        entry[h] = r.labels.get(h)
    for h in head_names:
        c = r.labels.get(h)
        entry[f"{h}_idx"] = label_maps[f"{h}_to_idx"][c] if c is not None else -1
    return entry


def _place(src: Path, dst: Path, link: str, stats: Counter) -> None:
    if link == "symlink":
        os.symlink(src.resolve(), dst)
    elif link == "copy":
        shutil.copy2(src, dst)
    else:
        try:
            os.link(src, dst)
        except FileNotFoundError:
            raise
        except OSError as exc:  # EXDEV across devices; EPERM/ENOTSUP/EMLINK on some file systems
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EACCES):
                raise
            shutil.copy2(src, dst)
            stats["hardlink_fallback_copies"] += 1


def export_dataset(
    out_dir: Path, *, heads: Sequence[dict], records: Sequence[ExportRecord], link: str = "hardlink"
) -> dict:
    """Write `records` into `out_dir` (which must not exist or be empty) in the seeds' formats, atomically: into a
    sibling temporary folder, renamed into place at the end. `link`: "hardlink" (copies where a hard link is
    impossible, e.g. across devices), "copy" or "symlink" (absolute links to the source files).
    Returns {"images", "files" (relative paths written, sorted), "per_split", "labels_file", "folder_head",
    "hardlink_fallback_copies"}. Raises FormatError listing every problem before writing anything."""
    out_dir = Path(out_dir)
    if link not in LINK_MODES:
        raise FormatError(f"link must be one of {', '.join(LINK_MODES)}, not {link!r}", where="link")
    head_names, parents = _check_heads(heads)
    fhead = next(h for h in head_names if h not in set(parents.values()))
    problems: Problems = []
    if out_dir.is_symlink():
        problems.append((str(out_dir), "is a symbolic link; export into a new or empty folder"))
    elif out_dir.exists():
        if not out_dir.is_dir():
            problems.append((str(out_dir), "exists and is not a folder"))
        elif any(out_dir.iterdir()):
            problems.append((str(out_dir), "is not empty; export into a new or empty folder"))

    seen: dict[str, int] = {}
    group_splits: dict[str, dict[str, str]] = defaultdict(dict)  # group → {split: first filename}
    for i, r in enumerate(records):
        where = f"record {i} ({r.filename!r})" if isinstance(r.filename, str) else f"record {i}"
        bad = _check_filename(r.filename)
        if bad:
            problems.append((where, bad))
        elif r.filename in seen:
            problems.append((where, f"filename {r.filename!r} is also used by record {seen[r.filename]}"))
        else:
            seen[r.filename] = i
        if not isinstance(r.src_path, (str, os.PathLike)) or not Path(r.src_path).is_file():
            problems.append((where, f"source image {r.src_path} does not exist"))
        for key in r.labels:
            if key not in head_names:
                problems.append((where, f"label for {key!r}, which is not a head ({', '.join(head_names)})"))
        for h in head_names:
            value = r.labels.get(h)
            if value is None:
                continue
            if not isinstance(value, str):
                problems.append((where, f"{h} label {value!r} is not a string"))
            elif _is_unknown(value):
                problems.append((where, f"{h} label {value!r} reads back as unknown; pass None for unknown"))
        if r.split not in SPLITS:
            problems.append((where, f"split {r.split!r} is not one of {', '.join(SPLITS)}"))
        if r.source not in SOURCES:
            problems.append((where, f"source {r.source!r} is not one of {', '.join(SOURCES)}"))
        if not isinstance(r.group, str) or not r.group.strip() or r.group != r.group.strip():
            problems.append((where, f"group {r.group!r} must be a non-empty string without surrounding spaces"))
        elif r.split in SPLITS:
            group_splits[r.group].setdefault(r.split, r.filename)
    for group, by_split in group_splits.items():
        if len(by_split) > 1:
            detail = ", ".join(f"{s} ({fn})" for s, fn in sorted(by_split.items()))
            problems.append((f"group {group!r}", f"is in more than one split: {detail}; groups never cross splits"))
    label_maps = _label_maps(head_names, parents, records, problems)
    entry_dupes = sorted(k for k, n in Counter(_entry_keys(head_names)).items() if n > 1)
    if entry_dupes:
        problems.append(("heads", f"head names give clashing splits.json entry keys: {_quote_list(entry_dupes)}"))

    folder_of: dict[str, str] = {}  # class of the folder head → folder name
    for r in records:
        cls = r.labels.get(fhead)
        if isinstance(cls, str) and cls not in folder_of:
            folder_of[cls] = folder_name_for_class(cls)
            if len(folder_of[cls].encode("utf-8")) > MAX_NAME_BYTES:
                problems.append(
                    (
                        f"{fhead} {cls[:40]!r}",
                        f"class name too long for an ImageFolder folder (> {MAX_NAME_BYTES} bytes)",
                    )
                )
    if problems:
        raise FormatError(problems)

    ordered = sorted(records, key=lambda r: r.filename)
    labels_file = CAR_LABELS if tuple(head_names) == CAR_HEADS else LABELS
    in_tree = [r for r in ordered if r.labels.get(fhead) is not None]
    folder_names = sorted({folder_of[r.labels[fhead]] for r in in_tree})
    encoded = {folder_of[c]: c for c in folder_of if folder_of[c] != c}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    files: list[str] = []
    stats: Counter = Counter()

    def write_text(rel: str, text: str) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        files.append(rel)

    def write_csv(rel: str, header: list[str], rows: list[list[str]]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        with open(tmp / rel, "w", encoding="utf-8", newline="") as fh:
            fh.write(buf.getvalue())
        files.append(rel)

    try:
        (tmp / "images").mkdir()
        for r in ordered:
            _place(Path(r.src_path), tmp / "images" / r.filename, link, stats)
            files.append(f"images/{r.filename}")
        write_csv(
            labels_file,
            ["filename", *head_names],
            [[r.filename, *(r.labels.get(h) or "" for h in head_names)] for r in ordered],
        )
        write_csv(
            METADATA,
            ["filename", "group", "source", "split"],
            [[r.filename, r.group, r.source, r.split] for r in ordered],
        )
        splits = {s: [_split_entry(r, head_names, label_maps) for r in ordered if r.split == s] for s in SPLITS}
        write_text(SPLITS_JSON, _json_text(splits, sort_keys=False))
        for s in SPLITS:
            write_text(f"splits/{s}_ids.json", _json_text(sorted({r.group for r in records if r.split == s})))
        write_text(LABEL_MAPS, _json_text(label_maps))
        write_text(CLASS_TO_IDX, _json_text({name: i for i, name in enumerate(folder_names)}))
        if encoded:
            write_text(FOLDER_NAMES, _json_text(encoded))
        for s in SPLITS:
            (tmp / IMAGEFOLDER / s).mkdir(parents=True)
        for r in in_tree:
            rel = f"{IMAGEFOLDER}/{r.split}/{folder_of[r.labels[fhead]]}/{r.filename}"
            dst = tmp / rel
            dst.parent.mkdir(exist_ok=True)
            # Hard links point at images/ (same file system by construction); copies and symlinks at the source.
            _place(tmp / "images" / r.filename if link == "hardlink" else Path(r.src_path), dst, link, stats)
            files.append(rel)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename needs the name free on every platform
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "images": len(records),
        "files": sorted(files),
        "per_split": {s: sum(1 for r in records if r.split == s) for s in SPLITS},
        "labels_file": labels_file,
        "folder_head": fhead,
        "hardlink_fallback_copies": stats["hardlink_fallback_copies"],
    }


# ------------------------------------------------------------------------------------------------------ read

_ABSENT = object()  # a file that is not there, or could not be read (its problem is already recorded)


def _load_json(path: Path, rel: str, problems: Problems):
    if not path.exists():
        return _ABSENT
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append((rel, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
        return _ABSENT
    except OSError as exc:
        problems.append((rel, f"cannot read: {exc.strerror}"))
        return _ABSENT
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append((f"{rel} line {exc.lineno} column {exc.colno}", f"malformed JSON: {exc.msg}"))
        return _ABSENT


def _read_csv(path: Path, rel: str, problems: Problems) -> tuple[list[str] | None, int, list[tuple[int, list[str]]]]:
    """(header or None, header line, [(line number where the record starts, cells)]), blank lines skipped."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append((rel, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
        return None, 0, []
    except OSError as exc:
        problems.append((rel, f"cannot read: {exc.strerror}"))
        return None, 0, []
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    rows: list[tuple[int, list[str]]] = []
    prev = 0
    try:
        for cells in reader:
            start, prev = prev + 1, reader.line_num
            if not cells:
                continue
            if header is None:
                header, header_line = [c.strip() for c in cells], start
            else:
                rows.append((start, cells))
    except csv.Error as exc:
        problems.append(
            (f"{rel} line {reader.line_num}", f"cannot parse CSV: {exc}; the rest of the file was not read")
        )
    return header, header_line, rows


def _escape_problem(name: str, folder: str) -> str | None:
    if "\x00" in name:
        return f"filename {name!r} contains a NUL character"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return f"filename {name!r} is an absolute path; filenames are relative to {folder}"
    if ".." in PurePosixPath(norm).parts:
        return f"filename {name!r} tries to leave the {folder} folder ('..')"
    return None


def _cell_label(cell: str) -> str | None:
    return None if _is_unknown(cell) else cell


@dataclass
class _Row:
    where: str
    line: int
    path: Path
    labels: dict[str, str | None]
    group: str | None = None  # explicit (metadata.csv); None = infer from the file name
    source: str = "real"
    split: str | None = None


def read_export(folder: Path) -> ImportedDataset:
    """Read an export (ours or a seed's): a labels CSV (car_labels.csv / labels.csv + images/), else an ImageFolder
    tree (imagefolder/<split>/<class>/ or <folder>/train/<class>/). Raises FormatError listing every problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder", where=str(folder))
    folder = folder.resolve()
    if (folder / CAR_LABELS).exists() or (folder / LABELS).exists():
        return _read_labels_csv(folder)
    if (folder / IMAGEFOLDER).is_dir():
        return _read_imagefolder(folder, folder / IMAGEFOLDER, f"{IMAGEFOLDER}/")
    if (folder / "train").is_dir():
        return _read_imagefolder(folder, folder, "")
    raise FormatError(
        f"no {CAR_LABELS}, {LABELS} or {IMAGEFOLDER}/ found; expected one of these layouts: {_LAYOUTS}",
        where=str(folder),
    )


def _read_labels_csv(folder: Path) -> ImportedDataset:
    problems: Problems = []
    notes: Problems = []
    if (folder / CAR_LABELS).exists() and (folder / LABELS).exists():
        problems.append((LABELS, f"both {CAR_LABELS} and {LABELS} exist; keep only one"))
    name = CAR_LABELS if (folder / CAR_LABELS).exists() else LABELS
    header, header_line, csv_rows = _read_csv(folder / name, name, problems)
    if header is None:
        if not problems:
            problems.append((name, "the file is empty; expected a header line filename,<head>,..."))
        raise FormatError(problems)
    hwhere = f"{name} line {header_line}"
    heads = header[1:]
    if name == CAR_LABELS and tuple(header) != ("filename", *CAR_HEADS):
        problems.append((hwhere, f"header is {','.join(header)!r}; the car seed reads exactly 'filename,make,model'"))
        raise FormatError(problems)
    if header[0] != "filename" or not heads:
        problems.append((hwhere, f"header is {','.join(header)!r}; expected filename,<head1>,<head2>,..."))
        raise FormatError(problems)
    bad_heads = [h for h in heads if not h or h == "filename"]
    dup_heads = sorted(h for h, n in Counter(heads).items() if n > 1)
    if bad_heads or dup_heads:
        problems.append(
            (hwhere, f"head columns must be non-empty, unique and not 'filename'; got {','.join(header)!r}")
        )
        raise FormatError(problems)

    images_dir = folder / "images"
    has_images = images_dir.is_dir()
    if not has_images:
        problems.append(("images/", f"no images/ folder; {name} names files as images/<filename>"))
    rows: dict[str, _Row] = {}
    all_names: set[str] = set()  # every filename the CSV mentions, valid or not (to not report them twice)
    for line, cells in csv_rows:
        where = f"{name} line {line}"
        if len(cells) != len(header):
            problems.append((where, f"{len(cells)} cell(s), expected {len(header)} ({','.join(header)})"))
            continue
        fn = cells[0].strip()
        if not fn:
            problems.append((where, "empty filename"))
            continue
        all_names.add(fn)
        escape = _escape_problem(fn, "images/")
        if escape:
            problems.append((where, escape))
            continue
        if fn in rows:
            problems.append((where, f"duplicate filename {fn!r} (first on line {rows[fn].line})"))
            continue
        path = images_dir / fn
        if has_images and not path.is_file():
            problems.append((where, f"image file images/{fn} is missing"))
        rows[fn] = _Row(where, line, path, {h: _cell_label(c) for h, c in zip(heads, cells[1:], strict=True)})

    meta_groups, meta_splits = _apply_metadata(folder, name, rows, all_names, problems)
    entries: dict[str, tuple[str, dict]] = {}
    splits_ok = _apply_splits_json(folder, name, heads, rows, all_names, meta_splits, entries, problems)
    if not splits_ok and meta_splits is not None:
        for fn, split in meta_splits.items():
            rows[fn].split = split
    maps = _check_label_maps_csv(folder, name, heads, rows, problems)
    _check_split_entries(heads, rows, maps, entries, problems)
    if meta_groups:
        _check_id_files(folder, rows, problems)
    else:  # well-formedness only: without metadata.csv the groups are guesses
        for s in SPLITS:
            _load_id_file(folder, s, problems)
    imported = [
        ImportedRow(
            where=r.where,
            path=r.path,
            labels=r.labels,
            group=r.group if r.group is not None else group_from_name(fn),
            source=r.source,
            split=r.split,
        )
        for fn, r in rows.items()
    ]
    imported = _check_groups(imported, {r.where for r in rows.values() if r.group is not None}, notes, problems)
    if problems:
        raise FormatError(problems)
    return ImportedDataset(heads=list(heads), rows=imported, kind="labels_csv", notes=notes)


def _apply_metadata(folder, name, rows, all_names, problems) -> tuple[bool, dict[str, str | None] | None]:
    """Fill group/source from metadata.csv. Returns (whether it gave groups, {filename: split} or None when it has
    no split column)."""
    path = folder / METADATA
    if not path.exists():
        return False, None
    header, header_line, meta_rows = _read_csv(path, METADATA, problems)
    if header is None:
        problems.append((METADATA, "the file is empty; expected a header line filename,group,source,split"))
        return False, None
    hwhere = f"{METADATA} line {header_line}"
    known = ("filename", "group", "source", "split")
    unknown = [c for c in header if c not in known]
    dupes = sorted(c for c, n in Counter(header).items() if n > 1)
    if "filename" not in header or unknown or dupes:
        problems.append((hwhere, f"header is {','.join(header)!r}; expected filename,group,source,split"))
        return False, None
    col = {c: header.index(c) for c in header}
    splits: dict[str, str | None] | None = {} if "split" in col else None
    seen: dict[str, int] = {}
    for line, cells in meta_rows:
        where = f"{METADATA} line {line}"
        if len(cells) != len(header):
            problems.append((where, f"{len(cells)} cell(s), expected {len(header)} ({','.join(header)})"))
            continue
        fn = cells[col["filename"]].strip()
        if not fn:
            problems.append((where, "empty filename"))
            continue
        if fn in seen:
            problems.append((where, f"duplicate filename {fn!r} (first on line {seen[fn]})"))
            continue
        seen[fn] = line
        if fn not in rows:
            if fn not in all_names:
                problems.append((where, f"{fn!r} is not in {name}"))
            continue
        row = rows[fn]
        if "group" in col and cells[col["group"]].strip():
            row.group = cells[col["group"]].strip()
        if "source" in col:
            source = cells[col["source"]].strip().lower() or "real"
            if source not in SOURCES:
                problems.append((where, f"source {source!r} is not one of {', '.join(SOURCES)}"))
            row.source = source
        if splits is not None:
            split = cells[col["split"]].strip().lower() or None
            if split is not None and split not in SPLITS:
                problems.append((where, f"split {split!r} is not one of {', '.join(SPLITS)}"))
                split = None
            splits[fn] = split
    for fn, row in rows.items():
        if fn not in seen:
            problems.append((row.where, f"{fn!r} has no row in {METADATA}"))
    if splits is not None:
        for fn in rows:
            splits.setdefault(fn, None)
    return "group" in col, splits


def _entry_shape(heads: Sequence[str]) -> str:
    fields = ", ".join(f'"{h}": <class or null>, "{h}_idx": <index or -1>' for h in heads)
    return f'{{"path": "images/<filename>", "filename": <filename>, {fields}}}'


def _apply_splits_json(folder, name, heads, rows, all_names, meta_splits, entries, problems) -> bool:
    """Set each row's split from splits.json: lists of entries (see the module doc) or, as earlier releases wrote
    it, of filenames. The entries' labels and indices are checked later (`_check_split_entries`): `entries` gets
    {filename: (where, entry)}. False when there is no usable splits.json."""
    data = _load_json(folder / SPLITS_JSON, SPLITS_JSON, problems)
    if data is _ABSENT:
        return False
    entry_shape = _entry_shape(heads)
    shape = 'a JSON object {"train": [entries], "val": [entries], "test": [entries]}'
    if not isinstance(data, dict):
        problems.append((SPLITS_JSON, f"must be {shape}, found {type(data).__name__}"))
        return False
    ok = True
    for key in data:
        if key not in SPLITS:
            problems.append((SPLITS_JSON, f"unknown key {key!r}; must be {shape}"))
            ok = False
    allowed = _entry_keys(heads)
    split_of: dict[str, str] = {}
    for s in SPLITS:
        if s not in data:
            problems.append((SPLITS_JSON, f"no {s!r} list; must be {shape} (an empty list is fine)"))
            ok = False
            continue
        items = data[s]
        if not isinstance(items, list):
            problems.append(
                (f"{SPLITS_JSON} {s}", f"must be a list of entries {entry_shape}, found {type(items).__name__}")
            )
            ok = False
            continue
        for i, item in enumerate(items):
            where = f"{SPLITS_JSON} {s}[{i}]"
            if isinstance(item, dict):
                if "filename" not in item:
                    problems.append((where, f"entry has no 'filename'; expected {entry_shape}"))
                    ok = False
                    continue
                fn = item["filename"]
                if not isinstance(fn, str) or not fn:
                    problems.append((where, f"filename {fn!r} is not a filename string; expected {entry_shape}"))
                    ok = False
                    continue
                unknown = [k for k in item if k not in allowed]
                if unknown:
                    problems.append(
                        (where, f"unknown key(s) {_quote_list(unknown)}; an entry has {', '.join(allowed)}")
                    )
                if "path" in item:
                    path = item["path"]
                    if not isinstance(path, str) or PurePosixPath(path.replace("\\", "/")).name != fn:
                        problems.append((where, f"path {path!r} does not name the file {fn!r}; expected 'images/{fn}'"))
            elif isinstance(item, str):
                fn = item
            else:
                problems.append((where, f"{item!r} is not a filename string or an entry {entry_shape}"))
                ok = False
                continue
            if fn in split_of:
                if split_of[fn] == s:
                    problems.append((where, f"{fn!r} is listed twice in {s}"))
                else:
                    problems.append((where, f"{fn!r} is in both {split_of[fn]} and {s}"))
                ok = False
                continue
            split_of[fn] = s
            if fn not in all_names:
                problems.append((where, f"{fn!r} is not in {name}"))
            elif isinstance(item, dict):
                entries[fn] = (where, item)
    if not ok:
        return False
    for fn, row in rows.items():
        row.split = split_of.get(fn)
        if meta_splits is not None and meta_splits.get(fn) != row.split:
            problems.append(
                (
                    row.where,
                    f"{METADATA} says split {meta_splits.get(fn)!r} for {fn!r}, {SPLITS_JSON} says {row.split!r}",
                )
            )
    return True


def _check_split_entries(heads, rows, maps, entries, problems) -> None:
    """The labels and indices splits.json entries carry agree with the labels CSV and label_maps.json (without a
    label_maps.json: -1 exactly when unlabeled, and one index per class)."""
    seen_idx: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)  # head → class → (index, where)
    seen_cls: dict[str, dict[int, tuple[str, str]]] = defaultdict(dict)  # head → index → (class, where)
    for fn, (where, item) in entries.items():
        row = rows.get(fn)
        if row is None:  # its CSV row is malformed: already reported
            continue
        for h in heads:
            label = row.labels[h]
            if h in item:
                given = item[h]
                if given is not None and not isinstance(given, str):
                    problems.append((where, f"{h} {given!r} must be a class name string or null"))
                elif (None if given is None else _cell_label(given)) != label:
                    problems.append((where, f"{h} is {given!r}, but {row.where} says {label!r}; they must agree"))
            key = f"{h}_idx"
            if key not in item:
                continue
            idx = item[key]
            if type(idx) is not int:
                problems.append((where, f"{key} {idx!r} must be an integer (the {h}_to_idx index, -1 when unlabeled)"))
                continue
            if label is None:
                if idx != -1:
                    problems.append((where, f"{key} is {idx}, but {fn!r} has no {h} label ({row.where}); expected -1"))
                continue
            to_idx = maps.get(f"{h}_to_idx") if isinstance(maps, dict) else None
            if isinstance(to_idx, dict):
                if label in to_idx and idx != to_idx[label]:
                    problems.append(
                        (where, f"{key} is {idx}, but {LABEL_MAPS} {h}_to_idx[{label!r}] is {to_idx[label]!r}")
                    )
                continue  # a class missing from h_to_idx is reported by _check_label_maps_csv
            if maps is not None:
                continue  # label_maps.json is there but broken: already reported
            if idx < 0:
                problems.append(
                    (where, f"{key} is {idx}, but {fn!r} has {h} {label!r}; expected its index (0 or more)")
                )
                continue
            first_idx, first_where = seen_idx[h].setdefault(label, (idx, where))
            first_cls, cls_where = seen_cls[h].setdefault(idx, (label, where))
            if first_idx != idx:
                problems.append((where, f"{key} is {idx}, but {first_where} gives {h} {label!r} index {first_idx}"))
            elif first_cls != label:
                problems.append((where, f"{key} {idx} is {h} {first_cls!r} in {cls_where}, not {label!r}"))


def _check_label_maps_csv(folder, name, heads, rows, problems):
    """Check label_maps.json (this release's keys or an earlier one's) against the labels CSV. Returns the maps,
    None when there is no label_maps.json, or _ABSENT when it is unusable (the problem is recorded)."""
    maps = _load_json(folder / LABEL_MAPS, LABEL_MAPS, problems)
    if maps is _ABSENT:
        return None if not (folder / LABEL_MAPS).exists() else _ABSENT
    if not isinstance(maps, dict):
        problems.append((LABEL_MAPS, f"must be a JSON object, found {type(maps).__name__}"))
        return _ABSENT
    if "heads" in maps and maps["heads"] != list(heads):
        problems.append((LABEL_MAPS, f"heads {maps['heads']!r} differ from the {name} columns {list(heads)!r}"))
    for h in heads:
        key = f"{h}_to_idx"
        to_idx = maps.get(key)
        if not isinstance(to_idx, dict):
            problems.append((LABEL_MAPS, f"no {key} object" if to_idx is None else f"{key} must be an object"))
            continue
        n = len(to_idx)
        if sorted(v if type(v) is int else -1 for v in to_idx.values()) != list(range(n)):
            problems.append(
                (
                    LABEL_MAPS,
                    f"{key} must give its {n} class(es) the indices 0..{n - 1}, each once; found "
                    f"{_quote_list(to_idx.values())}",
                )
            )
        else:
            order = sorted(to_idx, key=to_idx.__getitem__)
            list_key, num_key = f"{h}_list", f"num_{plural(h)}"
            if list_key in maps and maps[list_key] != order:
                problems.append(
                    (LABEL_MAPS, f"{list_key} must list the {key} classes in index order: {_quote_list(order)}")
                )
            if num_key in maps and (type(maps[num_key]) is not int or maps[num_key] != n):
                problems.append((LABEL_MAPS, f"{num_key} is {maps[num_key]!r}, but {key} has {n} class(es)"))
        missing: dict[str, list[_Row]] = defaultdict(list)
        for r in rows.values():
            c = r.labels[h]
            if c is not None and c not in to_idx:
                missing[c].append(r)
        for c, rs in missing.items():
            more = f" (and {len(rs) - 1} other row(s))" if len(rs) > 1 else ""
            problems.append((rs[0].where, f"{h} {c!r} is not in {LABEL_MAPS} {key}{more}"))
    for child in heads:
        for parent in heads:
            key = f"{child}_to_{parent}"
            if child == parent or key not in maps:
                continue
            mapping = maps[key]
            if not isinstance(mapping, dict):
                problems.append((LABEL_MAPS, f"{key} must be an object {{{child}: {parent}}}"))
                continue
            bad: dict[tuple[str, str], list[_Row]] = defaultdict(list)
            for r in rows.values():
                c, p = r.labels[child], r.labels[parent]
                if c is not None and p is not None and mapping.get(c) != p:
                    bad[(c, p)].append(r)
            for (c, p), rs in bad.items():
                more = f" (and {len(rs) - 1} other row(s))" if len(rs) > 1 else ""
                if c in mapping:
                    msg = f"{child} {c!r} has {parent} {p!r} here, but {LABEL_MAPS} {key} says {mapping[c]!r}{more}"
                else:
                    msg = f"{child} {c!r} (with {parent} {p!r}) is not in {LABEL_MAPS} {key}{more}"
                problems.append((rs[0].where, msg))
    return maps


def _load_id_file(folder: Path, split: str, problems: Problems):
    rel = f"splits/{split}_ids.json"
    data = _load_json(folder / rel, rel, problems)
    if data is _ABSENT:
        return _ABSENT
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        problems.append((rel, "must be a JSON list of group ID strings"))
        return _ABSENT
    return data


def _check_id_files(folder: Path, rows: dict[str, _Row], problems: Problems) -> None:
    for s in SPLITS:
        ids = _load_id_file(folder, s, problems)
        if ids is _ABSENT:
            continue
        rel = f"splits/{s}_ids.json"
        actual = {r.group if r.group is not None else group_from_name(fn) for fn, r in rows.items() if r.split == s}
        lacking, extra = sorted(actual - set(ids)), sorted(set(ids) - actual)
        if lacking:
            problems.append((rel, f"lacks group(s) {_quote_list(lacking)} that have {s} images"))
        if extra:
            problems.append((rel, f"lists group(s) {_quote_list(extra)} that have no {s} images"))


def _check_groups(
    rows: list[ImportedRow], explicit: set[str], notes: Problems, problems: Problems
) -> list[ImportedRow]:
    """Groups never cross splits. An explicit group (from metadata.csv; `explicit` holds those rows' `where`) that
    does is an error. A group inferred from file names that does is a wrong guess (IMG_0001.jpg,
    n02085620_10074.jpg): it becomes one group per split ("<ID>@<split>") and a note says so."""
    by_group: dict[str, dict[str, list[ImportedRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.split is not None:
            by_group[r.group][r.split].append(r)
    requalify: set[str] = set()
    for group, by_split in by_group.items():
        if len(by_split) < 2:
            continue
        detail = ", ".join(f"{s} ({len(rs)}, e.g. {rs[0].where})" for s, rs in sorted(by_split.items()))
        members = [r for rs in by_split.values() for r in rs]
        if any(r.where in explicit for r in members):
            problems.append(
                (f"group {group!r}", f"has images in more than one split: {detail}; groups never cross splits")
            )
        else:
            requalify.add(group)
            notes.append(
                (
                    f"group {group!r}",
                    f"inferred from file names, it spans {detail}; kept as one group per split ({group}@<split>)",
                )
            )
    if not requalify:
        return rows
    return [
        ImportedRow(r.where, r.path, r.labels, f"{r.group}@{r.split}", r.source, r.split)
        if r.group in requalify and r.split is not None
        else r
        for r in rows
    ]


# -------------------------------------------------------------------------------------------------- imagefolder


def _read_imagefolder(folder: Path, root: Path, prefix: str) -> ImportedDataset:
    problems: Problems = []
    notes: Problems = []
    heads, fhead, to_idx = ["label"], "label", None
    maps = _load_json(folder / LABEL_MAPS, LABEL_MAPS, problems)
    if isinstance(maps, dict) and "heads" in maps:
        names = maps["heads"]
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(h, str) and h for h in names)
            or len(set(names)) != len(names)
        ):
            problems.append((LABEL_MAPS, "heads must be a non-empty list of distinct head names"))
        else:
            heads = list(names)
            parents = {p for c in heads for p in heads if c != p and f"{c}_to_{p}" in maps}
            fhead = next((h for h in heads if h not in parents), heads[0])
            to_idx = maps.get(f"{fhead}_to_idx")
            if not isinstance(to_idx, dict):
                problems.append((LABEL_MAPS, f"no {fhead}_to_idx object for the folder head {fhead!r}"))
                to_idx = None
    elif maps is not _ABSENT and not isinstance(maps, dict):
        problems.append((LABEL_MAPS, f"must be a JSON object, found {type(maps).__name__}"))

    class_of: dict[str, str] = {}
    mapping = _load_json(folder / FOLDER_NAMES, FOLDER_NAMES, problems)
    if mapping is not _ABSENT:
        if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
            problems.append((FOLDER_NAMES, "must be a JSON object {folder name: class name}"))
        elif len(set(mapping.values())) != len(mapping):
            dupes = sorted(v for v, n in Counter(mapping.values()).items() if n > 1)
            problems.append((FOLDER_NAMES, f"several folders map to the same class: {_quote_list(dupes)}"))
        else:
            class_of = dict(mapping)

    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in SPLITS and prefix:
            problems.append(
                (
                    f"{prefix}{entry.name}/",
                    "unexpected folder; expected split folders train/, val/, test/ holding class folders",
                )
            )
    rows: list[ImportedRow] = []
    folder_names: set[str] = set()
    for s in SPLITS:
        sdir = root / s
        if not sdir.is_dir():
            continue
        for cdir in sorted(sdir.iterdir()):
            rel_c = f"{prefix}{s}/{cdir.name}"
            if cdir.name.startswith(".") or cdir.name.lower() in JUNK_FILES:
                continue
            if not cdir.is_dir():
                problems.append(
                    (rel_c, f"file outside a class folder; ImageFolder expects {prefix}{s}/<class>/<image>")
                )
                continue
            folder_names.add(cdir.name)
            cls = class_of.get(cdir.name, cdir.name)
            if to_idx is not None and cls not in to_idx:
                problems.append((f"{rel_c}/", f"{fhead} {cls!r} is not in {LABEL_MAPS} {fhead}_to_idx"))
            n = 0
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):  # as torchvision does
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fname in sorted(filenames):
                    if fname.startswith(".") or fname.lower() in JUNK_FILES:
                        continue
                    path = Path(dirpath) / fname
                    rel = f"{prefix}{s}/{path.relative_to(sdir).as_posix()}"
                    if not fname.lower().endswith(IMG_EXTENSIONS):
                        problems.append((rel, f"not an image file ImageFolder reads ({', '.join(IMG_EXTENSIONS)})"))
                        continue
                    if not path.is_file():
                        problems.append((rel, "image file is missing (broken link?)"))
                        continue
                    labels: dict[str, str | None] = {h: None for h in heads}
                    labels[fhead] = cls
                    rows.append(ImportedRow(rel, path, labels, group_from_name(fname), "real", s))
                    n += 1
            if n == 0:
                problems.append(
                    (f"{rel_c}/", "class folder has no images; torchvision's ImageFolder refuses empty classes")
                )

    cti = _load_json(folder / CLASS_TO_IDX, CLASS_TO_IDX, problems)
    if cti is not _ABSENT:
        expected = {name: i for i, name in enumerate(sorted(folder_names))}
        if not isinstance(cti, dict):
            problems.append((CLASS_TO_IDX, f"must be a JSON object {{folder name: index}}, found {type(cti).__name__}"))
        else:
            for key in sorted(set(cti) | set(expected)):
                if key not in expected:
                    problems.append((CLASS_TO_IDX, f"entry {key!r}: {cti[key]!r} has no class folder"))
                elif key not in cti:
                    problems.append(
                        (CLASS_TO_IDX, f"class folder {key!r} has no entry (sorted folder names give {expected[key]})")
                    )
                elif cti[key] != expected[key]:
                    problems.append(
                        (
                            CLASS_TO_IDX,
                            f"entry {key!r} is {cti[key]!r}, but the sorted folder names give {expected[key]}",
                        )
                    )
    rows = _check_groups(rows, set(), notes, problems)
    if problems:
        raise FormatError(problems)
    return ImportedDataset(heads=heads, rows=rows, kind="imagefolder", notes=notes)
