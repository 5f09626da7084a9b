"""Dataset versions: frozen snapshots of the usable images, their labels and their (sticky, group-aware,
stratified) splits; the diff between two versions; export in the seeds' formats and the training manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Max

from . import formats, storage
from .models import (
    DatasetAction,
    DatasetVersion,
    DatasetVersionItem,
    DuplicateCluster,
    GroupSplit,
    Head,
    HealthReport,
    Image,
    Label,
    LabelClass,
    Project,
    SimilarPair,
)
from .services import LabelingError
from .similarity import merge_groups
from .splits import DEFAULT_RATIOS, SPLITS, GroupInfo, assign_splits


def folder_head(heads: list[Head]) -> Head:
    """The head the classes of an ImageFolder tree come from: the first class head that is no other head's parent
    (car → model, lego → part). Also the stratification label of the splits. A project of detection heads only
    (shelf) stratifies on its first detection head (the most frequent box class of each photo)."""
    class_heads = [h for h in heads if h.kind != Head.Kind.DETECTION] or heads
    name = formats.folder_head(
        [{"name": h.name, "parent": h.parent.name if h.parent_id else None} for h in class_heads]
    )
    return next(h for h in class_heads if h.name == name)


def strat_label(value) -> str | None:
    """A row's stratification label for one head: its class, or for a detection head's boxes ([[x, y, w, h, class],
    ...]) the most frequent box class (ties: the first name), None for none."""
    if not isinstance(value, list):
        return value
    votes = Counter(b[4] for b in value)
    return min(votes, key=lambda c: (-votes[c], c)) if votes else None


def _box_labels(project: Project, heads: list[Head]) -> dict[int, dict[str, list]]:
    """{image id: {detection head name: [[x, y, w, h, class name], ...]}} of the box sets someone set (version > 0;
    an empty list: looked at, no container there — a negative photo); boxes of classes excluded from training are
    left out."""
    from .models import Box, BoxSet  # noqa: PLC0415 - only projects with detection heads get here

    det = {h.id: h.name for h in heads if h.kind == Head.Kind.DETECTION}
    out: dict[int, dict[str, list]] = defaultdict(dict)
    if not det:
        return out
    for image_id, head_id in BoxSet.objects.filter(head_id__in=det, version__gt=0).values_list("image_id", "head_id"):
        out[image_id][det[head_id]] = []
    boxes = (
        Box.objects.filter(box_set__head_id__in=det, box_set__version__gt=0, label_class__excluded_from_training=False)
        .order_by("box_set_id", "id")
        .values_list("box_set__image_id", "box_set__head_id", "x", "y", "w", "h", "label_class__name")
    )
    for image_id, head_id, x, y, w, h, name in boxes:
        out[image_id][det[head_id]].append([round(x, 2), round(y, 2), round(w, 2), round(h, 2), name])
    return out


LEFT_TOO_SMALL = "too small, or in a group with a too-small image"
LEFT_NON_REAL = "non-real photo of a group in"  # + split: LEGO val/test take real photos only


@dataclass(frozen=True)
class _Row:
    image_id: int
    sha256: str
    group: str
    source: str
    labels: dict[str, str | None]


def _usable_rows(project: Project) -> tuple[list[_Row], dict]:
    """Images that can be trained on, with their labels as training sees them, and what was left out why."""
    heads = list(project.heads.order_by("order", "id"))
    classes = {
        c["id"]: c
        for c in LabelClass.objects.filter(head__project=project).values("id", "name", "excluded_from_training")
    }
    images = list(
        Image.objects.filter(project=project, status=Image.Status.OK)
        .order_by("id")
        .values_list("id", "sha256", "group_key", "source", "width", "height")
    )
    min_side = project.min_image_side
    small_groups = {g for (_i, _s, g, _src, w, h) in images if w is None or h is None or min(w, h) < min_side}
    labels: dict[int, dict[int, int | None]] = defaultdict(dict)
    for image_id, head_id, class_id in Label.objects.filter(image__project=project).values_list(
        "image_id", "head_id", "label_class_id"
    ):
        labels[image_id][head_id] = class_id
    boxes = _box_labels(project, heads)
    left_out = Counter()
    rows = []
    for image_id, sha, group, source, _w, _h in images:
        if group in small_groups:
            left_out[LEFT_TOO_SMALL] += 1
            continue
        by_head = {}
        for h in heads:
            if h.kind == Head.Kind.DETECTION:  # boxes, or None when nobody set them
                by_head[h.name] = boxes.get(image_id, {}).get(h.name)
                continue
            cid = labels[image_id].get(h.id)
            cls = classes.get(cid) if cid is not None else None
            if cls is not None and cls["excluded_from_training"]:
                left_out[f"{h.name} label of a class excluded from training (counted as unknown)"] += 1
                cls = None
            by_head[h.name] = cls["name"] if cls else None
        if all(v is None for v in by_head.values()):
            left_out["unlabeled"] += 1
            continue
        rows.append(_Row(image_id, sha, group, source, by_head))
    return rows, {"left_out": dict(left_out), "too_small_groups": len(small_groups)}


def content_hash(rows: list[_Row]) -> str:
    """sha256 over the sorted (image sha256, labels) pairs: the same data gives the same hash."""
    digest = hashlib.sha256()
    for line in sorted(f"{r.sha256}\t{json.dumps(r.labels, sort_keys=True)}" for r in rows):
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def dataset_version_create(
    *,
    project: Project,
    user=None,
    note: str = "",
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    allow_empty_eval: bool = False,
) -> tuple[DatasetVersion, bool]:
    """Freeze the current usable data. Returns (version, created): when nothing changed since the latest
    version (same content hash), that version is returned and nothing is written. A freeze that would leave a
    head without labeled photos in val or test (a split with a ratio > 0) is refused with LabelingError, unless
    `allow_empty_eval`: its model could only be measured on photos it trained on."""
    try:
        assign_splits([], ratios=ratios)  # validates the ratios before anything else
    except ValueError as exc:
        raise LabelingError(str(exc)) from exc
    with transaction.atomic():
        Project.objects.select_for_update().get(pk=project.pk)  # one snapshot at a time per project
        rows, info = _usable_rows(project)
        if not rows:
            why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(info["left_out"].items()))
            raise LabelingError(
                f"Project {project.slug!r} has no usable labeled images (readable, short side ≥ "
                f"{project.min_image_side} px, at least one label){f'; left out: {why}' if why else ''}. Import or "
                "label images, or lower the project's minimum image size."
            )
        digest = content_hash(rows)
        latest = project.dataset_versions.order_by("-number").first()
        if latest is not None and latest.content_hash == digest and not _splits_moved_since(project, latest):
            return latest, False

        heads = list(project.heads.order_by("order", "id"))
        strat_head = folder_head(heads).name
        by_group: dict[str, list[_Row]] = defaultdict(list)
        for r in rows:
            by_group[r.group].append(r)
        previous = dict(
            GroupSplit.objects.filter(project=project, group_key__in=list(by_group)).values_list("group_key", "split")
        )
        # Groups holding photos too alike to cross splits (the latest health scan's similar pairs and near-duplicate
        # clusters) are placed as one: a component of linked groups gets one split.
        links, sim_info = _similarity_links(project, {r.image_id: r.group for r in rows})
        root_of = merge_groups(by_group, links)
        components: dict[str, list[str]] = defaultdict(list)
        for key in by_group:
            components[root_of[key]].append(key)
        real_only_eval = project.preset == "lego"
        groups = []
        comp_previous = {}
        sticky_conflicts = 0
        for root, keys in components.items():
            members = [r for k in keys for r in by_group[k]]
            votes = Counter(
                strat_label(r.labels[strat_head]) for r in members if strat_label(r.labels[strat_head]) is not None
            )
            label = min(votes, key=lambda c: (-votes[c], c)) if votes else None
            eval_ok = not real_only_eval or any(r.source == Image.Source.REAL for r in members)
            groups.append(GroupInfo(key=root, n_images=len(members), label=label, eval_ok=eval_ok))
            old = Counter()
            for k in keys:
                if k in previous:
                    old[previous[k]] += len(by_group[k])
            if old:  # new groups join the split their linked old groups have (most photos); old groups keep theirs
                comp_previous[root] = min(old, key=lambda sp: (-old[sp], SPLITS.index(sp)))
                sticky_conflicts += len(old) > 1
        try:
            comp_splits = assign_splits(groups, previous=comp_previous, ratios=ratios, seed=project.slug)
        except ValueError as exc:
            raise LabelingError(str(exc)) from exc
        splits = {k: previous.get(k, comp_splits[root_of[k]]) for k in by_group}
        sim_info.update(
            {
                "groups": len(by_group),
                "components": len(components),
                "groups_merged": len(by_group) - len(components),
                "sticky_conflicts": sticky_conflicts,
            }
        )
        GroupSplit.objects.bulk_create(
            [GroupSplit(project=project, group_key=k, split=s) for k, s in splits.items() if k not in previous],
            batch_size=5000,
        )

        number = (project.dataset_versions.aggregate(m=Max("number"))["m"] or 0) + 1
        version = DatasetVersion.objects.create(
            project=project,
            number=number,
            parent=latest,
            content_hash=digest,
            note=note[:300],
            created_by=user,
            params={
                "ratios": list(ratios),
                "min_image_side": project.min_image_side,
                "real_only_eval": real_only_eval,
                "similarity": sim_info,
            },
        )
        items = []
        per_split = Counter()
        per_class: dict[str, dict[str, Counter]] = {h.name: defaultdict(Counter) for h in heads}
        left_out = Counter(info["left_out"])
        for r in rows:
            split = splits[r.group]
            if real_only_eval and split != "train" and r.source != Image.Source.REAL:
                left_out[f"{LEFT_NON_REAL} {split}"] += 1  # LEGO: validation and test take real images only
                continue
            items.append(
                DatasetVersionItem(
                    version=version, image_id=r.image_id, split=split, group_key=r.group, labels=r.labels
                )
            )
            per_split[split] += 1
            for head, cls in r.labels.items():
                if isinstance(cls, list):  # a detection head: boxes per class (a negative photo counts none)
                    for box in cls:
                        per_class[head][box[4]][split] += 1
                elif cls is not None:
                    per_class[head][cls][split] += 1
        if not allow_empty_eval:
            _check_eval_splits(per_class, per_split, ratios, n_groups=len(components), n_rows=len(rows))
        DatasetVersionItem.objects.bulk_create(items, batch_size=5000)
        version.counts = {
            "images": len(items),
            "groups": len(by_group),
            "splits": {s: per_split[s] for s in SPLITS},
            "classes": {
                head: {cls: {s: c[s] for s in SPLITS} for cls, c in sorted(classes.items())}
                for head, classes in per_class.items()
            },
            "left_out": dict(left_out),
        }
        version.save(update_fields=["counts"])
    return version, True


def _splits_moved_since(project: Project, version: DatasetVersion) -> bool:
    """Whether sticky splits were moved (or such a move undone) after `version` was frozen: the same photos and
    labels then still make a new version, with the new splits."""
    moves = DatasetAction.objects.filter(project=project, kind=DatasetAction.Kind.SPLITS_UNLEAK)
    return (
        moves.filter(created_at__gt=version.created_at).exists()
        or moves.filter(undone_at__gt=version.created_at).exists()
    )


def splits_unleak(*, project: Project, user=None) -> DatasetAction:
    """Move frozen groups so that photos linked by the latest finished health scan (similar pairs of one class,
    near-duplicate clusters) share one split: each linked component whose groups were frozen into different splits
    goes to the split that holds most of its photos (ties: train, then val; moving a twin out of val/test never
    flatters a figure). Sticky splits are otherwise never changed, so this is how a version frozen before a scan, or
    before new links were found, stops leaking. Undoable; the next freeze makes a version with the new splits."""
    with transaction.atomic():
        Project.objects.select_for_update().get(pk=project.pk)  # not while a freeze reads the splits
        rows, _info = _usable_rows(project)
        group_of = {r.image_id: r.group for r in rows}
        links, sim = _similarity_links(project, group_of)
        if sim["report"] is None:
            raise LabelingError("No finished health scan yet: run a scan (Health page), then move linked photos.")
        photos = Counter(group_of.values())
        previous = dict(
            GroupSplit.objects.filter(project=project, group_key__in=list(photos)).values_list("group_key", "split")
        )
        root_of = merge_groups(photos, links)
        components: dict[str, list[str]] = defaultdict(list)
        for key in photos:
            components[root_of[key]].append(key)
        moves = []
        for keys in components.values():
            old = Counter()
            for k in keys:
                if k in previous:
                    old[previous[k]] += photos[k]
            if len(old) < 2:
                continue
            target = min(old, key=lambda sp: (-old[sp], SPLITS.index(sp)))
            moves += [
                {"group": k, "old": previous[k], "new": target, "photos": photos[k]}
                for k in sorted(keys)
                if k in previous and previous[k] != target
            ]
        if not moves:
            raise LabelingError(
                f"Nothing to move: no photos linked by health scan {sim['report']} sit in different frozen splits."
            )
        for target in SPLITS:
            keys = [m["group"] for m in moves if m["new"] == target]
            GroupSplit.objects.filter(project=project, group_key__in=keys).update(split=target)
        by_move = Counter(f"{m['old']}→{m['new']}" for m in moves for _ in range(m["photos"]))
        return DatasetAction.objects.create(
            project=project,
            kind=DatasetAction.Kind.SPLITS_UNLEAK,
            user=user,
            summary=(
                f"moved {sum(m['photos'] for m in moves)} photo(s) of {len(moves)} group(s) so that linked photos "
                f"share a split ({', '.join(f'{k} {n}' for k, n in sorted(by_move.items()))}); freeze a new "
                "version to use it"
            )[:500],
            params={"report": sim["report"]},
            changes={"group_splits": moves},
        )


def _similarity_links(project: Project, group_of: dict[int, str]) -> tuple[list[tuple[str, str]], dict]:
    """(links between group keys, info) from the latest finished health scan: its similar pairs
    (labeling/similarity.py) and near-duplicate clusters whose photos are in different groups. Photos added after
    that scan are not linked (info["not_scanned"] counts them: run a scan before freezing)."""
    report = (
        HealthReport.objects.filter(project=project, status=HealthReport.Status.SUCCEEDED)
        .order_by("-finished_at", "-id")
        .first()
    )
    if report is None:
        return [], {"report": None, "links": 0, "not_scanned": len(group_of)}
    pairs = list(SimilarPair.objects.filter(report=report).values_list("image_a_id", "image_b_id"))
    for ids in DuplicateCluster.objects.filter(report=report).values_list("image_ids", flat=True):
        present = [i for i in ids if i in group_of]
        pairs += [(present[0], i) for i in present[1:]]
    links = {
        (group_of[a], group_of[b]) for a, b in pairs if a in group_of and b in group_of and group_of[a] != group_of[b]
    }
    started = report.started_at or report.created_at
    # usable photos imported after the scan started (no IN clause of every photo id: a project may hold 50,000)
    later = Image.objects.filter(project=project, created_at__gt=started).values_list("id", flat=True)
    not_scanned = sum(1 for i in later.iterator() if i in group_of)
    sim = (report.findings or {}).get("similarity") or {}
    return sorted(links), {
        "report": report.id,
        "similarity": sim.get("status", "off"),
        "links": len(links),
        "not_scanned": not_scanned,
    }


def _check_eval_splits(per_class: dict, per_split: Counter, ratios, *, n_groups: int, n_rows: int) -> None:
    """Refuse (LabelingError, inside the freeze's transaction: nothing is kept) a split layout where a labeled head
    has no labeled photo in val or test."""
    wanted = [s for s, r in zip(SPLITS, ratios, strict=True) if s != "train" and r > 0]
    for head, classes in per_class.items():
        n = {s: sum(c[s] for c in classes.values()) for s in SPLITS}
        empty = [s for s in wanted if n[s] == 0]
        if not classes or not empty:
            continue
        raise LabelingError(
            f"Not frozen: head {head!r} would have no labeled photos in {' or '.join(empty)} (train {n['train']}, "
            f"val {n['val']}, test {n['test']}), so its model could only be measured on photos it trained on. "
            f"Groups never cross splits, and these {n_rows} photos form {n_groups} group(s). If file-name groups "
            "are not really one object each, re-import with one group per photo (Group by: image, "
            "--group-by image); otherwise label more groups, or freeze anyway (--allow-empty-eval, the "
            "'freeze anyway' box): its figures are then 'train (optimistic)'."
        )


def dataset_version_diff(*, old: DatasetVersion, new: DatasetVersion) -> dict:
    """Images added, removed and relabeled from `old` to `new`, and the per-class count changes per head."""
    if old.project_id != new.project_id:
        raise LabelingError("Both dataset versions must belong to the same project.")

    def load(v):
        return {i: (s, lb) for i, s, lb in v.items.values_list("image_id", "split", "labels")}

    a, b = load(old), load(new)
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    relabeled = []
    split_changed = []
    for image_id in sorted(set(a) & set(b)):
        (sa, la), (sb, lb) = a[image_id], b[image_id]
        if la != lb:
            changes = {h: [la.get(h), lb.get(h)] for h in sorted(set(la) | set(lb)) if la.get(h) != lb.get(h)}
            relabeled.append({"image_id": image_id, "changes": changes})
        if sa != sb:
            split_changed.append({"image_id": image_id, "old": sa, "new": sb})

    def class_counts(d):
        out: dict[str, Counter] = defaultdict(Counter)
        for _s, labels in d.values():
            for h, c in labels.items():
                if c is not None:
                    out[h][c] += 1
        return out

    ca, cb = class_counts(a), class_counts(b)
    per_class = {}
    for head in sorted(set(ca) | set(cb)):
        rows = []
        for cls in sorted(set(ca[head]) | set(cb[head])):
            before, after = ca[head][cls], cb[head][cls]
            if before != after:
                rows.append({"class": cls, "old": before, "new": after, "delta": after - before})
        per_class[head] = rows
    return {
        "old": old.number,
        "new": new.number,
        "added": added,
        "removed": removed,
        "relabeled": relabeled,
        "split_changed": split_changed,
        "per_class": per_class,
        "summary": {
            "added": len(added),
            "removed": len(removed),
            "relabeled": len(relabeled),
            "split_changed": len(split_changed),
        },
    }


def version_manifest(*, version: DatasetVersion, per_class_cap: int | None = None) -> dict:
    """The engine's manifest for a frozen version. `per_class_cap` keeps at most that many train images per
    class of the stratification head (chosen by a stable hash, so the same images every time)."""
    project = version.project
    # Class heads only: a detection head's boxes go to the detector (version_detection_manifest).
    heads = list(project.heads.exclude(kind=Head.Kind.DETECTION).order_by("order", "id"))
    if not heads:
        raise LabelingError(f"Project {project.slug!r} has detection heads only: its model is a detector.")
    strat = folder_head(heads).name
    rows = list(
        version.items.select_related("image")
        .order_by("id")
        .values_list("image_id", "split", "group_key", "labels", "image__file", "image__source", "image__sha256")
    )
    if per_class_cap:
        by_class: dict[str | None, list] = defaultdict(list)
        for r in rows:
            if r[1] == "train":
                by_class[r[3].get(strat)].append(r)
        dropped = set()
        for cls, members in by_class.items():
            if cls is not None and len(members) > per_class_cap:
                members.sort(key=lambda r: r[6])
                dropped.update(r[0] for r in members[per_class_cap:])
        rows = [r for r in rows if r[0] not in dropped]
    classes: dict[str, set] = {h.name: set() for h in heads}
    for r in rows:
        for h, c in r[3].items():
            if c is not None and h in classes:
                classes[h].add(c)
    paths = storage.local_paths([r[4] for r in rows])  # a remote store: fetched in parallel into the cache
    items = [
        {
            "id": image_id,
            "path": path or storage.missing_path(file),
            "file": file,  # the stored name: another machine re-resolves "path" through its own cache
            "labels": {h.name: labels.get(h.name) for h in heads},
            "group": group,
            "source": source,
            "split": split,
            "sha256": sha,  # content hash: the key of the feature cache (training/engine/features.py)
        }
        for (image_id, split, group, labels, file, source, sha), path in zip(rows, paths, strict=True)
    ]
    out_heads = []
    for h in heads:
        if not classes[h.name]:
            continue
        entry = {"name": h.name, "classes": sorted(classes[h.name]), "parent": h.parent.name if h.parent_id else None}
        if h.parent_id and classes.get(h.parent.name):
            parents = dict(
                LabelClass.objects.filter(head=h, parent__isnull=False, name__in=classes[h.name]).values_list(
                    "name", "parent__name"
                )
            )
            entry["class_parents"] = {c: p for c, p in parents.items() if p in classes[h.parent.name]}
        out_heads.append(entry)
    return {"dataset_version": version.number, "heads": out_heads, "items": items}


def version_detection_manifest(*, version: DatasetVersion) -> dict:
    """The detector's manifest (training.engine.detection) of a frozen version of a project with a detection head:
    the head's classes in their order and every photo whose boxes were set (a set with no box: a negative photo),
    boxes in pixels of the stored photo."""
    head = version.project.heads.filter(kind=Head.Kind.DETECTION).order_by("order", "id").first()
    if head is None:
        raise LabelingError(f"Project {version.project.slug!r} has no detection head.")
    rows = [
        r
        for r in version.items.order_by("id").values_list("image_id", "split", "labels", "image__file", "image__sha256")
        if isinstance(r[2].get(head.name), list)
    ]
    paths = storage.local_paths([r[3] for r in rows])
    used = {b[4] for r in rows for b in r[2][head.name]}
    classes = [c for c in head.classes.order_by("id").values_list("name", flat=True) if c in used]
    return {
        "dataset_version": version.number,
        "head": head.name,
        "classes": classes,
        "items": [
            {
                "id": image_id,
                "path": path or storage.missing_path(file),
                "file": file,
                "sha256": sha,
                "split": split,
                "boxes": labels[head.name],
            }
            for (image_id, split, labels, file, sha), path in zip(rows, paths, strict=True)
        ],
    }


def _export_name(image: Image, used: set[str]) -> str:
    """`<group>_<n>.<ext>` (the seeds' `<ID>_<seq>.jpg` naming), unique within the export."""
    ext = Path(image.file).suffix or ".jpg"
    safe_group = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in image.group_key)[:80].strip(".") or "img"
    n = 1
    while f"{safe_group}_{n:03d}{ext}" in used:
        n += 1
    name = f"{safe_group}_{n:03d}{ext}"
    used.add(name)
    return name


def dataset_version_export(*, version: DatasetVersion, out_dir: Path, link: str = "hardlink") -> dict:
    """Write the version in the seeds' formats (labels CSV, splits.json, label_maps.json, splits/*_ids.json,
    class_to_idx.json, an ImageFolder tree) into `out_dir`."""
    from .formats import ExportRecord, FormatError, export_dataset

    project = version.project
    class_heads = project.heads.exclude(kind=Head.Kind.DETECTION).order_by("order", "id")
    heads = [{"name": h.name, "parent": h.parent.name if h.parent_id else None} for h in class_heads]
    if not heads:  # boxes are exported in YOLO or COCO (manage.py export_boxes)
        raise LabelingError("A project of detection heads only is exported as YOLO or COCO (manage.py export_boxes).")
    names = {h["name"] for h in heads}
    used: set[str] = set()
    records = []
    for item in version.items.select_related("image").order_by("image__group_key", "image_id"):
        image = item.image
        records.append(
            ExportRecord(
                filename=_export_name(image, used),
                src_path=storage.local_path(image.file),
                labels={k: v for k, v in item.labels.items() if k in names},
                group=item.group_key,
                source=image.source,
                split=item.split,
            )
        )
    try:
        return export_dataset(Path(out_dir), heads=heads, records=records, link=link)
    except FormatError as exc:
        raise LabelingError(str(exc)) from exc


def export_paths(version: DatasetVersion) -> tuple[Path, Path]:
    """The export folder of a dataset version under LOUPE_EXPORT_ROOT, and its zip beside it."""
    folder = Path(settings.LOUPE_EXPORT_ROOT) / version.project.slug / f"dataset-v{version.number}"
    return folder, folder.with_suffix(".zip")


def dataset_version_archive(*, version: DatasetVersion) -> Path:
    """The version written in the seeds' formats (once: a frozen version never changes) and zipped, whole files
    only (a temp name, then os.replace). Returns the zip's path."""
    folder, archive = export_paths(version)
    if not folder.exists():
        dataset_version_export(version=version, out_dir=folder)
    if not archive.exists():
        tmp = archive.with_name(archive.stem + ".partial")
        made = shutil.make_archive(str(tmp), "zip", root_dir=folder)
        os.replace(made, archive)
    return archive
