"""Manifest validation: turn the manifest dict into train/val item lists with class indices, or fail with a
message a person can act on (before any training starts)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label index of an unknown/unlabelled head: masked out of loss and metrics
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    id: object
    path: str
    targets: tuple[int, ...]  # one class index per head, IGNORE_INDEX when unknown


@dataclass
class ParsedManifest:
    heads: list[dict]  # [{"name", "classes", "parent"[, "class_parents"]}] as given (normalised copies)
    train: list[Item]
    val: list[Item]
    n_test: int

    @property
    def head_names(self) -> list[str]:
        return [h["name"] for h in self.heads]

    @property
    def label_maps(self) -> dict[str, list[str]]:
        return {h["name"]: list(h["classes"]) for h in self.heads}


def _item_ref(i: int, item: dict) -> str:
    ident = item.get("id") if isinstance(item, dict) else None
    return f"item #{i}" + (f" (id {ident!r})" if ident is not None else "")


def parse_manifest(manifest: dict) -> ParsedManifest:
    """Validate `manifest` (see training.engine docs) and return the parsed train/val items.

    Items of split "test" are counted and otherwise ignored entirely (their files are never opened)."""
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest must be a dict with 'heads' and 'items', got {type(manifest).__name__}")
    for key in ("heads", "items"):
        if key not in manifest:
            raise ValueError(f"manifest has no {key!r} key; expected {{'heads': [...], 'items': [...]}}")
    raw_heads = manifest["heads"]
    if not isinstance(raw_heads, list) or not raw_heads:
        raise ValueError("manifest 'heads' is empty: define at least one head (e.g. 'part') with its classes")
    heads: list[dict] = []
    names: set[str] = set()
    class_index: list[dict[str, int]] = []
    for h_i, head in enumerate(raw_heads):
        if not isinstance(head, dict) or not isinstance(head.get("name"), str) or not head.get("name"):
            raise ValueError(f"manifest head #{h_i} must be a dict with a non-empty 'name'")
        name = head["name"]
        if name in names:
            raise ValueError(f"manifest head {name!r} is defined twice")
        names.add(name)
        classes = head.get("classes")
        if not isinstance(classes, list) or not classes:
            raise ValueError(
                f"head {name!r} has no classes: add at least one class (or remove the head) before training"
            )
        bad = [c for c in classes if not isinstance(c, str) or not c]
        if bad:
            raise ValueError(f"head {name!r}: class names must be non-empty strings, got {bad[:3]!r}")
        seen: dict[str, int] = {}
        for c_i, c in enumerate(classes):
            if c in seen:
                raise ValueError(f"head {name!r}: class {c!r} is listed twice")
            seen[c] = c_i
        entry = {"name": name, "classes": list(classes), "parent": head.get("parent")}
        if head.get("class_parents") is not None:
            entry["class_parents"] = head["class_parents"]
        heads.append(entry)
        class_index.append(seen)
    by_name = {h["name"]: h for h in heads}
    for head in heads:
        if head["parent"] is not None and head["parent"] not in names:
            raise ValueError(f"head {head['name']!r}: parent {head['parent']!r} is not a head of this manifest")
        cp = head.get("class_parents")
        if cp is None:
            continue
        if head["parent"] is None:
            raise ValueError(f"head {head['name']!r} has 'class_parents' but no parent head")
        if not isinstance(cp, dict):
            raise ValueError(f"head {head['name']!r}: 'class_parents' must be a dict {{class: parent class}}")
        parent_classes = set(by_name[head["parent"]]["classes"])
        bad = [f"{c!r} -> {p!r}" for c, p in cp.items() if c not in head["classes"] or p not in parent_classes]
        if bad:
            raise ValueError(
                f"head {head['name']!r}: 'class_parents' entries not among the classes of {head['name']!r} / "
                f"{head['parent']!r}: {', '.join(bad[:5])}"
            )

    items = manifest["items"]
    if not isinstance(items, list):
        raise ValueError("manifest 'items' must be a list")
    train: list[Item] = []
    val: list[Item] = []
    n_test = 0
    for i, item in enumerate(items):
        ref = _item_ref(i, item)
        if not isinstance(item, dict):
            raise ValueError(f"manifest {ref} must be a dict")
        split = item.get("split")
        if split not in SPLITS:
            raise ValueError(f"manifest {ref}: 'split' must be one of {list(SPLITS)}, got {split!r}")
        if "path" not in item or not isinstance(item["path"], str) or not item["path"]:
            raise ValueError(f"manifest {ref}: missing 'path' (the image file to read)")
        if split == "test":
            n_test += 1  # never read, never trained on
            continue
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"manifest {ref}: 'labels' must be a dict {{head: class or null}}")
        unknown_heads = sorted(set(labels) - names)
        if unknown_heads:
            raise ValueError(f"manifest {ref}: labels for unknown head(s) {unknown_heads}; heads are {sorted(names)}")
        targets = []
        for head, idx in zip(heads, class_index, strict=True):
            value = labels.get(head["name"])  # missing key == null == unknown
            if value is None:
                targets.append(IGNORE_INDEX)
            elif value not in idx:
                raise ValueError(
                    f"manifest {ref}: label {value!r} for head {head['name']!r} is not one of its classes "
                    f"({', '.join(map(repr, head['classes'][:10]))}{', ...' if len(head['classes']) > 10 else ''})"
                )
            else:
                targets.append(idx[value])
        entry = Item(id=item.get("id"), path=item["path"], targets=tuple(targets))
        (train if split == "train" else val).append(entry)
    if not train:
        raise ValueError(
            f"manifest has no items with split 'train' ({len(val)} val, {n_test} test): "
            "add labelled images to the train split before training"
        )
    if not any(t != IGNORE_INDEX for it in train for t in it.targets):
        raise ValueError("no train item has a known label for any head: label some train images first")
    return ParsedManifest(heads=heads, train=train, val=val, n_test=n_test)
