"""Box datasets in the formats people have (pure: no Django): YOLO and COCO JSON, parsed and written.

Boxes are held in image pixels (`x`, `y` the top-left corner, `w`, `h`), as the app stores them; YOLO's normalised
centres are converted with the image's size (read from the file's header), so YOLO → pixels → YOLO is exact to
within float rounding.

- **YOLO**: `images/…` and `labels/…` mirror each other (`images/train/a.jpg` ↔ `labels/train/a.txt`); each line
  `class xc yc w h`, the class an index into the class list and the rest normalised to 0..1; the class list from
  `data.yaml` (`names:` a list, or a mapping index → name) or `classes.txt` (one name a line). A first folder
  `train`, `val` (`valid`, `validation`) or `test` is the photo's split. An image without a label file was not
  annotated; an empty label file means it holds nothing of the listed classes.
- **COCO**: `annotations.json` (`images` with id, file_name, width, height; `annotations` with image_id,
  category_id, bbox `[x, y, w, h]` in pixels; `categories` with id and name) and the photos under `images/` (or
  beside the JSON); a first folder of `file_name` gives the split as for YOLO. Every listed image is annotated.

Parsing checks everything and raises `FormatError` with every problem (up to `MAX_ERRORS`), each as
(where, what): `("labels/train/a.txt line 3", "5 values expected (class xc yc w h), got 4")`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image as PILImage
from PIL import UnidentifiedImageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_ERRORS = 100
MAX_BOXES = 2000  # per image
# A box may overshoot the image by this many pixels (float rounding in the tool that wrote it); it is clipped.
EDGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class DetBox:
    """One box: `cls` an index into the dataset's classes; x, y (top-left), w, h in pixels."""

    cls: int
    x: float
    y: float
    w: float
    h: float


@dataclass
class DetImage:
    """One photo: `name` its path under `images/` (posix), `path` the file on disk, its size in pixels, its split
    (None: not given) and its boxes (None: not annotated; []: annotated, nothing there)."""

    name: str
    path: Path | None
    width: int
    height: int
    split: str | None = None
    boxes: list[DetBox] | None = None


@dataclass
class DetDataset:
    classes: list[str]
    images: list[DetImage] = field(default_factory=list)


class FormatError(ValueError):
    """A dataset that cannot be read: `errors` lists every problem as (where, what)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors[:MAX_ERRORS]
        more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
        super().__init__("; ".join(f"{w}: {m}" for w, m in self.errors[:10]) + more)


class _Errors(list):
    def add(self, where: str, what: str) -> None:
        self.append((where, what))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header (no full decode). Raises ValueError when it is not an image."""
    try:
        with PILImage.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image ({exc.__class__.__name__})") from None


def split_of(name: str) -> str | None:
    """The split a relative path's first folder names (train, val/valid/validation, test), else None."""
    parts = PurePosixPath(name).parts
    return SPLIT_FOLDERS.get(parts[0].lower()) if len(parts) > 1 else None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def clip_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[float, float, float, float]:
    """Clip a box that overshoots by at most EDGE_TOLERANCE (rounding) back inside the image."""
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    return x0, y0, x1 - x0, y1 - y0


# Of the box's width / height on each side: a little context, and room for a detector box a few pixels off. The
# shelf endpoint cuts each detected box this way (inference.shelf_core), and so are the SKU crops a model learns
# from (labeling.shelf_data): train and serve see the same framing.
CROP_MARGIN = 0.04


def crop_box(image: PILImage.Image, box, *, margin: float = CROP_MARGIN) -> PILImage.Image:
    """The photo cut at box (x, y, w, h in pixels) grown by `margin` of its size on every side (at least 2 px),
    clipped to the photo."""
    x, y, bw, bh = box
    w, h = image.size
    mx, my = max(2.0, bw * margin), max(2.0, bh * margin)
    x0, y0 = max(0, int(x - mx)), max(0, int(y - my))
    x1, y1 = min(w, int(round(x + bw + mx))), min(h, int(round(y + bh + my)))
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def box_problem(x: float, y: float, w: float, h: float, width: int, height: int) -> str | None:
    """Why a pixel box (top-left x, y, size w, h) does not fit a width × height image, or None."""
    if not (w > 0 and h > 0):
        return f"w and h must be > 0 (got w {w:g}, h {h:g})"
    tol = EDGE_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return (
            f"box ({x:g}, {y:g}, {w:g}, {h:g}) reaches outside the {width}×{height} image "
            f"(x + w = {x + w:g}, y + h = {y + h:g})"
        )
    return None


# ------------------------------------------------------------------------------------------------------ YOLO
def _yolo_classes(root: Path, errors: _Errors) -> list[str] | None:
    yaml_path = next((root / n for n in ("data.yaml", "data.yml", "dataset.yaml") if (root / n).is_file()), None)
    if yaml_path is not None:
        import yaml  # noqa: PLC0415 (only YOLO's class list needs it)

        try:
            data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            errors.add(yaml_path.name, f"not valid YAML ({str(exc).splitlines()[0]})")
            return None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            keys = sorted(names, key=lambda k: int(k) if str(k).isdigit() else -1)
            if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
                errors.add(yaml_path.name, f"names: the indices must be 0..{len(keys) - 1}, got {list(names)}")
                return None
            names = [names[k] for k in keys]
        if not isinstance(names, list) or not names:
            errors.add(yaml_path.name, "names: expected a list of class names (or a mapping 0: name, 1: name, ...)")
            return None
        out = [str(n).strip() for n in names]
    elif (root / "classes.txt").is_file():
        try:
            lines = (root / "classes.txt").read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            errors.add("classes.txt", "not UTF-8 text")
            return None
        while lines and not lines[-1].strip():
            lines.pop()
        out = [line.strip() for line in lines]
        if not out:
            errors.add("classes.txt", "no class names (one a line)")
            return None
    else:
        errors.add(str(root), "no class list: give data.yaml (names: [...]) or classes.txt (one name a line)")
        return None
    for i, name in enumerate(out):
        if not name:
            errors.add(yaml_path.name if yaml_path else "classes.txt", f"class {i} has an empty name")
    if len(set(out)) != len(out):
        dupes = sorted({n for n in out if out.count(n) > 1})
        errors.add(yaml_path.name if yaml_path else "classes.txt", f"class names given twice: {', '.join(dupes)}")
    return out


def parse_yolo(root: Path, *, size_of: Callable[[Path], tuple[int, int]] = image_size) -> DetDataset:
    """A YOLO folder (see the module doc) → DetDataset with pixel boxes. Raises FormatError listing every problem."""
    root = Path(root)
    errors = _Errors()
    classes = _yolo_classes(root, errors)
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        errors.add(str(root), "no images/ folder (expected images/ and labels/, optionally with train/val/test)")
        raise FormatError(errors)
    images: dict[str, DetImage] = {}  # by the name's stem path ("train/a")
    for path in sorted(p for p in images_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(images_dir).as_posix()
        if path.suffix.lower() not in IMAGE_EXTS:
            continue
        key = str(PurePosixPath(rel).with_suffix(""))
        if key in images:
            errors.add(f"images/{rel}", f"two photos for one label file (images/{images[key].name} too)")
            continue
        try:
            width, height = size_of(path)
        except ValueError as exc:
            errors.add(f"images/{rel}", str(exc))
            continue
        images[key] = DetImage(name=rel, path=path, width=width, height=height, split=split_of(rel))
    if not images and not errors:
        errors.add("images/", "no photos (.jpg/.jpeg/.png/.webp/.bmp)")
    label_files = sorted(p for p in labels_dir.rglob("*.txt") if p.is_file()) if labels_dir.is_dir() else []
    for path in label_files:
        rel = path.relative_to(labels_dir).as_posix()
        where = f"labels/{rel}"
        image = images.get(str(PurePosixPath(rel).with_suffix("")))
        if image is None:
            errors.add(where, f"no photo images/{PurePosixPath(rel).with_suffix('.*')} for this label file")
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            errors.add(where, "not UTF-8 text")
            continue
        image.boxes = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            box = _yolo_line(line, classes, image, f"{where} line {n}", errors)
            if box is not None:
                image.boxes.append(box)
        if len(image.boxes) > MAX_BOXES:
            errors.add(where, f"{len(image.boxes)} boxes; at most {MAX_BOXES} per photo")
        if len(errors) >= MAX_ERRORS:
            break
    if errors:
        raise FormatError(errors)
    return DetDataset(classes=classes or [], images=list(images.values()))


def _yolo_line(line: str, classes: list[str] | None, image: DetImage, where: str, errors: _Errors) -> DetBox | None:
    parts = line.split()
    if len(parts) != 5:
        errors.add(where, f"5 values expected (class xc yc w h), got {len(parts)}")
        return None
    if not parts[0].isdigit():
        errors.add(where, f"class {parts[0]!r} is not a class index (a whole number from 0)")
        return None
    cls = int(parts[0])
    if classes is not None and cls >= len(classes):
        errors.add(where, f"class {cls} not in the class list (0..{len(classes) - 1})")
        return None
    values = [_number(p) for p in parts[1:]]
    bad = False
    for label, raw, value in zip(("xc", "yc", "w", "h"), parts[1:], values, strict=True):
        if value is None:
            errors.add(where, f"{label} {raw!r} is not a number")
            bad = True
        elif not 0 <= value <= 1:
            errors.add(where, f"{label} {raw} outside 0..1 (YOLO values are normalised by the photo's size)")
            bad = True
    if bad:
        return None
    xc, yc, w, h = values
    x, y = (xc - w / 2) * image.width, (yc - h / 2) * image.height
    w, h = w * image.width, h * image.height
    problem = box_problem(x, y, w, h, image.width, image.height)
    if problem:
        errors.add(where, problem)
        return None
    return DetBox(cls, *clip_box(x, y, w, h, image.width, image.height))


def _num(v: float) -> str:
    return f"{v:.10g}"


def _copy(image: DetImage, dest: Path, read_bytes: Callable[[DetImage], bytes]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(read_bytes(image))


def _checked_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"unsafe image name {name!r}")
    return p.as_posix()


def write_yolo(dataset: DetDataset, out: Path, *, read_bytes: Callable[[DetImage], bytes]) -> None:
    """Write `dataset` as a YOLO folder under `out` (images/, labels/, classes.txt, data.yaml). `read_bytes` gives a
    photo's bytes. Photos without boxes (not annotated) get no label file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for image in dataset.images:
        name = _checked_name(image.name)
        _copy(image, out / "images" / name, read_bytes)
        if image.boxes is None:
            continue
        lines = []
        for b in image.boxes:
            xc, yc = (b.x + b.w / 2) / image.width, (b.y + b.h / 2) / image.height
            w, h = b.w / image.width, b.h / image.height
            lines.append(f"{b.cls} {_num(xc)} {_num(yc)} {_num(w)} {_num(h)}")
        label = out / "labels" / PurePosixPath(name).with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out / "classes.txt").write_text("".join(c + "\n" for c in dataset.classes), encoding="utf-8")
    splits = sorted({i.split for i in dataset.images if i.split})
    yaml_lines = [f"path: {json.dumps(str(out.resolve()))}"]
    for split in splits:
        yaml_lines.append(f"{split}: images/{split}")
    if not splits:
        yaml_lines.append("train: images")
    yaml_lines.append(f"nc: {len(dataset.classes)}")
    yaml_lines.append("names:")
    yaml_lines += [f"  {i}: {json.dumps(c, ensure_ascii=False)}" for i, c in enumerate(dataset.classes)]
    (out / "data.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ COCO
def _coco_file(root: Path) -> Path | None:
    for name in ("annotations.json", "instances.json", "_annotations.coco.json"):
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob("*.json"))
    return found[0] if len(found) == 1 else None


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_coco(root: Path, *, size_of: Callable[[Path], tuple[int, int]] = image_size) -> DetDataset:
    """A COCO folder (see the module doc) → DetDataset. Raises FormatError listing every problem."""
    root = Path(root)
    errors = _Errors()
    path = _coco_file(root)
    if path is None:
        raise FormatError([(str(root), "no COCO file: expected annotations.json beside images/")])
    fname = path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError([(fname, f"not valid JSON ({exc})")]) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise FormatError([(fname, "expected an object with lists images, annotations and categories")])
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise FormatError([(fname, "annotations must be a list")])
    images_dir = root / "images" if (root / "images").is_dir() else root

    cats: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        where = f"{fname} categories[{i}]"
        if not isinstance(c, dict) or not _int(c.get("id")) or not isinstance(c.get("name"), str):
            errors.add(where, "expected {id: integer, name: text}")
        elif c["id"] in cats:
            errors.add(where, f"category id {c['id']} given twice")
        elif not c["name"].strip() or c["name"].strip() in cats.values():
            errors.add(where, f"category name {c['name']!r} is empty or given twice")
        else:
            cats[c["id"]] = c["name"].strip()
    cat_ids = sorted(cats)
    index = {cid: i for i, cid in enumerate(cat_ids)}

    by_id: dict[int, DetImage] = {}
    names: set[str] = set()
    for i, im in enumerate(data["images"]):
        where = f"{fname} images[{i}]"
        if not isinstance(im, dict) or not _int(im.get("id")) or not isinstance(im.get("file_name"), str):
            errors.add(where, "expected {id: integer, file_name: text, width, height}")
            continue
        name = im["file_name"].replace("\\", "/")
        where = f"{where} ({name})"
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            errors.add(where, "file_name must be a path under images/ (no .., not absolute)")
            continue
        if im["id"] in by_id:
            errors.add(where, f"image id {im['id']} given twice")
            continue
        if name in names:
            errors.add(where, "file_name given twice")
            continue
        file = images_dir / p
        if not file.is_file():
            errors.add(where, f"no such photo {file.relative_to(root).as_posix()}")
            continue
        try:
            width, height = size_of(file)
        except ValueError as exc:
            errors.add(where, str(exc))
            continue
        for key, actual in (("width", width), ("height", height)):
            given = im.get(key)
            if given is not None and (not _int(given) or given != actual):
                errors.add(where, f"{key} {given!r} but the photo is {actual} px")
        names.add(name)
        by_id[im["id"]] = DetImage(name=p.as_posix(), path=file, width=width, height=height, split=split_of(name))
        by_id[im["id"]].boxes = []
    for i, a in enumerate(annotations):
        where = f"{fname} annotations[{i}]" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            errors.add(where, "expected an object")
            continue
        image = by_id.get(a.get("image_id"))
        if image is None:
            errors.add(where, f"image_id {a.get('image_id')!r} is not one of the images")
            continue
        if a.get("category_id") not in index or isinstance(a.get("category_id"), bool):
            errors.add(where, f"category_id {a.get('category_id')!r} not in the categories ({cat_ids})")
            continue
        bbox = a.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            errors.add(where, f"bbox must be [x, y, w, h], 4 numbers in pixels; got {bbox!r:.80}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        problem = box_problem(x, y, w, h, image.width, image.height)
        if problem:
            errors.add(where, problem)
            continue
        image.boxes.append(DetBox(index[a["category_id"]], *clip_box(x, y, w, h, image.width, image.height)))
        if len(errors) >= MAX_ERRORS:
            break
    for image in by_id.values():
        if len(image.boxes) > MAX_BOXES:
            errors.add(f"{fname} ({image.name})", f"{len(image.boxes)} boxes; at most {MAX_BOXES} per photo")
    if errors:
        raise FormatError(errors)
    return DetDataset(classes=[cats[c] for c in cat_ids], images=list(by_id.values()))


def write_coco(dataset: DetDataset, out: Path, *, read_bytes: Callable[[DetImage], bytes]) -> None:
    """Write `dataset` as annotations.json + images/ under `out`. COCO lists annotated photos only (a listed photo
    without annotations holds nothing), so photos without boxes (None) are left out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image in dataset.images:
        if image.boxes is None:
            continue
        name = _checked_name(image.name)
        _copy(image, out / "images" / name, read_bytes)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": image.width, "height": image.height})
        for b in image.boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": b.cls + 1,
                    "bbox": [b.x, b.y, b.w, b.h],
                    "area": b.w * b.h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": c, "supercategory": ""} for i, c in enumerate(dataset.classes)]
    text = json.dumps({"images": images, "annotations": annotations, "categories": categories}, indent=1)
    tmp = out / "annotations.json.tmp"
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(out / "annotations.json")
