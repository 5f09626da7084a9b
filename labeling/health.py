"""Dataset health: the scan (a Celery task or `manage.py check_dataset`) that stores a HealthReport, and the
fixing actions taken from the report page. Every action is a DatasetAction that records exactly what it
changed, writes label/status history rows, and can be undone."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable

from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from webapp import jobs

from . import boxes, health_core, similarity, storage
from .models import (
    DatasetAction,
    DatasetVersionItem,
    DuplicateCluster,
    GroupSplit,
    Head,
    HealthReport,
    Image,
    ImageEvent,
    Label,
    LabelClass,
    LabelEvent,
    Project,
    SimilarPair,
)
from .services import LabelingError

log = logging.getLogger(__name__)

CLASS_WEIGHTING_CHOICES = ("none", "inverse", "sqrt_inverse")
# How photos are framed for the model (training config `resize`, training.engine.data.RESIZE_MODES): "crop" = the
# centre square (the ends of a long photo are cut off), "fit" = the whole photo, padded to a square.
RESIZE_CHOICES = {"crop": "centre crop", "fit": "whole photo, padded"}
MAX_CLUSTERS_STORED = 5000


def _to_signed(h: int) -> int:
    return h - (1 << 64) if h >= (1 << 63) else h


def _to_unsigned(h: int) -> int:
    return h + (1 << 64) if h < 0 else h


# ------------------------------------------------------------------------------------------------- scan
def health_report_create(
    *,
    project: Project,
    user=None,
    queue: bool = True,
    min_side: int | None = None,
    max_distance: int | None = None,
    min_samples: int | None = None,
) -> HealthReport:
    params = {
        "min_side": project.min_image_side if min_side is None else min_side,
        "max_distance": project.near_duplicate_distance if max_distance is None else max_distance,
        "min_samples": project.min_samples_per_class if min_samples is None else min_samples,
    }
    for key, lo, hi in (("min_side", 1, 100_000), ("max_distance", 0, 32), ("min_samples", 1, 1_000_000)):
        value = params[key]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise LabelingError(f"{key} must be an integer between {lo} and {hi}, got {value!r}.")
    health_reports_reconcile(project=project)  # a scan lost by a worker or a restarted broker no longer blocks
    with transaction.atomic():
        if project.health_reports.filter(status__in=[HealthReport.Status.QUEUED, HealthReport.Status.RUNNING]).exists():
            raise LabelingError("A health scan is already queued or running for this project.")
        try:
            with transaction.atomic():  # a savepoint: the constraint settles a race the check above lost
                report = HealthReport.objects.create(project=project, created_by=user, params=params)
        except IntegrityError:
            raise LabelingError("A health scan is already queued or running for this project.") from None
        if queue:
            from .tasks import health_scan

            rid = report.id
            jobs.send_on_commit(
                health_scan,
                rid,
                kind="health_scan",
                pk=rid,
                what=f"health scan {rid}",
                undo=lambda: HealthReport.objects.filter(pk=rid).delete(),
            )
    return report


def health_reports_reconcile(*, project: Project | None = None) -> dict:
    """Scans lost by a killed worker start again; queued scans whose message a restarted broker lost are re-sent
    (webapp.jobs.rows_reconcile). Returns {"lost": [ids], "failed": [ids], "resent": [ids]}."""
    from .tasks import health_scan

    scans = HealthReport.objects.filter(status__in=[HealthReport.Status.QUEUED, HealthReport.Status.RUNNING])
    if project is not None:
        scans = scans.filter(project=project)
    return jobs.rows_reconcile(
        HealthReport,
        scans,
        kind="health_scan",
        task=health_scan,
        resume="the scan starts again",
        cancel=_mark_cancelled,
    )


def health_report_cancel(*, report: HealthReport, user=None) -> HealthReport:
    """Cancel a queued scan at once, or ask a running one to stop at its next progress write (about a second).
    The previous scan's findings stay on the Health page. LabelingError for a scan that already ended."""
    report, queued = jobs.cancel_request(HealthReport, report.pk, user=user, error=LabelingError, what="Health scan")
    if queued:
        _mark_cancelled(report.id)
        report.refresh_from_db()
    return report


def _mark_cancelled(report_id: int) -> None:
    report = HealthReport.objects.select_related("cancel_requested_by").get(pk=report_id)
    who = report.cancel_requested_by.get_username() if report.cancel_requested_by_id else "the command line"
    HealthReport.objects.filter(pk=report_id, status__in=jobs.ACTIVE_STATUSES).update(
        status=HealthReport.Status.CANCELLED,
        finished_at=timezone.now(),
        error=f"Cancelled by {who}{f' during {report.phase}' if report.phase else ''}.",
    )


class _Progress:
    """Write scan progress to the row at most every `every` seconds (and always at the end of a phase)."""

    def __init__(self, report_id: int, every: float = 1.0):
        self.report_id, self.every, self.last = report_id, every, 0.0

    def __call__(self, phase: str, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            if not HealthReport.objects.filter(pk=self.report_id, cancel_requested_at__isnull=True).update(
                phase=phase, done=done, total=total, heartbeat_at=timezone.now()
            ):
                raise jobs.JobCancelled(self.report_id)


def health_report_execute(*, report_id: int, workers: int | None = None) -> HealthReport:
    """Run one scan. Idempotent: a finished report is left alone; one left running by a killed worker starts
    again from the beginning (the scan only reads files and rewrites its own findings)."""
    report = HealthReport.objects.select_related("project").get(pk=report_id)
    # Claim it (queued, or running with a stale heartbeat): a duplicate delivery of a claimed or finished scan
    # does nothing.
    stale = timezone.now() - dt.timedelta(seconds=jobs.lost_after_seconds())
    claimable = Q(status=HealthReport.Status.QUEUED) | Q(
        Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True), status=HealthReport.Status.RUNNING
    )
    if not HealthReport.objects.filter(claimable, pk=report.id).update(
        status=HealthReport.Status.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now()
    ):
        report.refresh_from_db()
        return report
    with jobs.heartbeat(HealthReport, report.id):
        return _health_report_run(report, workers=workers)


def _health_report_run(report: HealthReport, *, workers: int | None) -> HealthReport:
    try:
        summary, findings = _scan(report, _Progress(report.id), workers=workers)
    except jobs.JobCancelled:
        _mark_cancelled(report.id)
        report.refresh_from_db()
        return report
    except Exception as exc:  # noqa: BLE001 - the row must say why
        log.exception("health scan %s failed", report.id)
        HealthReport.objects.filter(pk=report.id).update(
            status=HealthReport.Status.FAILED,
            finished_at=timezone.now(),
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"[:5000],
        )
        report.refresh_from_db()
        return report
    HealthReport.objects.filter(pk=report.id, status=HealthReport.Status.RUNNING).update(
        status=HealthReport.Status.SUCCEEDED,
        finished_at=timezone.now(),
        summary=summary,
        findings=findings,
        phase="done",
    )
    report.refresh_from_db()
    return report


def _scan(report: HealthReport, progress: _Progress, *, workers: int | None) -> tuple[dict, dict]:
    project = report.project
    params = report.params
    images = list(
        Image.objects.filter(project=project)
        .exclude(status=Image.Status.EXCLUDED)
        .order_by("id")
        .only("id", "file", "status", "status_reason", "width", "height", "phash", "group_key")
    )
    total = len(images)
    progress("files", 0, total, force=True)
    # A remote store: fetched in parallel into this worker's cache; a photo the store lacks is reported missing.
    fetched = storage.local_paths([im.file for im in images])
    paths = [p or storage.missing_path(im.file) for p, im in zip(fetched, images, strict=True)]
    checks = health_core.check_files(paths, workers=workers, progress=lambda d, t: progress("files", d, t))
    progress("files", total, total, force=True)

    # 1. Files: unreadable, truncated, missing, zero-byte. The image's status follows the file.
    file_issues = []
    status_events = []
    to_update = []
    for im, chk in zip(images, checks, strict=True):
        if chk.status != "ok":
            file_issues.append({"image_id": im.id, "problem": chk.status, "reason": chk.reason})
            if im.status != Image.Status.UNREADABLE:
                status_events.append(
                    ImageEvent(
                        image_id=im.id,
                        old_status=im.status,
                        new_status=Image.Status.UNREADABLE,
                        reason=f"health scan {report.id}: {chk.status}",
                    )
                )
            im.status, im.status_reason = Image.Status.UNREADABLE, f"{chk.status}: {chk.reason}"[:300]
            im.phash = None
        else:
            if im.status == Image.Status.UNREADABLE:
                status_events.append(
                    ImageEvent(
                        image_id=im.id,
                        old_status=im.status,
                        new_status=Image.Status.OK,
                        reason=f"health scan {report.id}: the file reads now",
                    )
                )
                im.status, im.status_reason = Image.Status.OK, ""
            im.width, im.height, im.phash = chk.width, chk.height, _to_signed(chk.phash)
        to_update.append(im)
    with transaction.atomic():
        Image.objects.bulk_update(to_update, ["status", "status_reason", "width", "height", "phash"], batch_size=2000)
        ImageEvent.objects.bulk_create(status_events, batch_size=2000)

    ok_pairs = [(im, chk) for im, chk in zip(images, checks, strict=True) if chk.status == "ok"]
    ok = [im for im, _chk in ok_pairs]
    labels_of = _labels_by_image(project)

    # 2. Too small: the image, and its whole group (groups must stay consistent across splits).
    min_side = params["min_side"]
    small = [im for im in ok if min(im.width or 0, im.height or 0) < min_side]
    small_groups = sorted({im.group_key for im in small})
    group_sizes = Counter(im.group_key for im in ok)
    small_findings = {
        "images": [{"image_id": im.id, "width": im.width, "height": im.height, "group": im.group_key} for im in small],
        "groups": [{"group": g, "images": group_sizes[g]} for g in small_groups],
        "excluded_images": sum(group_sizes[g] for g in small_groups),
    }

    # 3. Duplicates: byte-identical files share a sha256 and are merged at import (content addressing); the scan
    # finds photos that look the same: perceptual hash (whole image and centre crop) within the Hamming
    # threshold, confirmed by the correlation of 32x32 thumbnails (health_core.find_near_duplicates), clustered.
    progress("duplicates", 0, len(ok), force=True)
    pairs = health_core.find_near_duplicates([chk for _im, chk in ok_pairs], max_distance=params["max_distance"])
    clusters = health_core.clusters_from_pairs(len(ok), pairs)
    max_d: dict[int, int] = defaultdict(int)
    root = {}
    for c_i, members in enumerate(clusters):
        for m in members:
            root[m] = c_i
    for i, _j, d in pairs.tolist() if len(pairs) else []:
        c_i = root[int(i)]
        max_d[c_i] = max(max_d[c_i], int(d))
    rows = []
    for c_i, members in enumerate(clusters):
        ids = [ok[m].id for m in members]
        rows.append(
            DuplicateCluster(
                report=report,
                kind="exact" if max_d[c_i] == 0 else "near",
                image_ids=ids,
                conflicting=_conflicting([labels_of.get(i, {}) for i in ids]),
                max_distance=max_d[c_i],
            )
        )
    rows.sort(key=lambda r: (not r.conflicting, -len(r.image_ids)))
    DuplicateCluster.objects.filter(report=report).delete()
    DuplicateCluster.objects.bulk_create(rows[:MAX_CLUSTERS_STORED], batch_size=2000)
    progress("duplicates", len(ok), len(ok), force=True)

    # 3b. Similar photos of one class (labeling/similarity.py): pairs the next freeze keeps in one split; pairs and
    # near-duplicates that cross the splits of the latest version ("leaky splits").
    try:
        sim_findings = _similar_pairs(report, project, ok, labels_of, progress)
    except jobs.JobCancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - the rest of the report stands; the page says why this part is missing
        log.exception("health scan %s: similarity pass failed", report.id)
        SimilarPair.objects.filter(report=report).delete()
        sim_findings = {"status": "failed", "reason": f"the similarity pass failed: {type(exc).__name__}: {exc}"[:500]}
    leaky = _leaky_splits(report, project, rows)

    # 4. Classes: distribution per head, rare, dominant, imbalance, unknown-like and near-identical names.
    progress("classes", 0, 1, force=True)
    class_findings = _class_findings(project, params["min_samples"])

    # 5. With an active model: its per-class accuracy on the validation split.
    accuracy = _per_class_accuracy(project)

    summary = {
        "images": total,
        "file_issues": len(file_issues),
        "too_small_images": len(small),
        "too_small_groups": len(small_groups),
        "excluded_by_size_rule": small_findings["excluded_images"],
        "duplicate_clusters": len(rows),
        "conflicting_clusters": sum(r.conflicting for r in rows),
        "images_in_clusters": sum(len(r.image_ids) for r in rows),
        "rare_classes": sum(len(h["rare"]) for h in class_findings.values()),
        "similar_names": sum(len(h["similar_names"]) for h in class_findings.values()),
        "unknown_like": sum(len(h["unknown_like"]) for h in class_findings.values()),
        "similar_pairs": sim_findings.get("pairs", 0),
        "leaky_pairs": leaky["pairs"] if leaky else None,
    }
    findings = {
        "files": file_issues,
        "small": small_findings,
        "classes": class_findings,
        "accuracy": accuracy,
        "clusters_truncated": max(0, len(rows) - MAX_CLUSTERS_STORED),
        "similarity": sim_findings,
        "leaky_splits": leaky,
    }
    return summary, findings


def _similar_pairs(report: HealthReport, project: Project, ok: list[Image], labels_of, progress) -> dict:
    """Embed the readable photos with the pretrained similarity backbone (through the feature cache), find the
    leak pairs by the label of the project's folder head, and store them as SimilarPair rows of this report."""
    from django.conf import settings  # noqa: PLC0415
    from django.utils.module_loading import import_string  # noqa: PLC0415

    from .versions import folder_head  # noqa: PLC0415 - versions reads these rows at freeze time

    if not settings.LOUPE_SCAN_SIMILARITY:
        return {"status": "off", "reason": "LOUPE_SCAN_SIMILARITY is off: freezes merge near-duplicates only"}
    heads = list(project.heads.order_by("order", "id"))
    if not heads or len(ok) < 2:
        return {"status": "skipped", "reason": "fewer than two readable photos"}
    t0 = time.monotonic()
    # The features come from the engine, a layer above: reached through the setting (pipeline.similarity.embed).
    embed = import_string(settings.LOUPE_SIMILARITY_EMBEDDER)
    fetched = storage.local_paths([im.file for im in ok])
    items = [
        {"path": p or storage.missing_path(im.file), "sha256": im.sha256} for p, im in zip(fetched, ok, strict=True)
    ]
    progress("similarity", 0, len(items), force=True)
    emb = embed(items, lambda done, total: progress("similarity", done, total))
    base = emb["base"]
    if emb["X"] is None:
        return {**base, "status": "skipped", "reason": emb["reason"]}
    strat = folder_head(heads)
    rows = [i for i in range(len(ok)) if emb["ok"][i]]
    found = similarity.leak_pairs(emb["X"][rows], [labels_of.get(ok[i].id, {}).get(strat.id) for i in rows])
    SimilarPair.objects.filter(report=report).delete()
    SimilarPair.objects.bulk_create(
        [
            SimilarPair(report=report, image_a_id=ok[rows[a]].id, image_b_id=ok[rows[b]].id, similarity=float(s))
            for (a, b), s in zip(found.pairs.tolist(), found.similarity.tolist(), strict=True)
        ],
        batch_size=5000,
    )
    progress("similarity", len(items), len(items), force=True)
    return {
        **base,
        **found.stats,
        "status": "done",
        "head": strat.name,
        "cache": emb["cache"],
        "seconds": round(time.monotonic() - t0, 1),
    }


LEAKY_EXAMPLES = 12


def _leaky_splits(report: HealthReport, project: Project, clusters: list[DuplicateCluster]) -> dict | None:
    """Pairs of this scan (similar photos of one class; near-duplicate clusters) whose photos sit in different
    splits of the project's latest dataset version: counts per pair of splits, the val/test photos affected and the
    most similar examples (what FiftyOne calls leaky splits). None without a dataset version."""
    version = project.dataset_versions.order_by("-number").first()
    if version is None:
        return None
    split_of = dict(DatasetVersionItem.objects.filter(version=version).values_list("image_id", "split"))
    crossing = [
        (a, b, sim, "similar")
        for a, b, sim in SimilarPair.objects.filter(report=report).values_list("image_a_id", "image_b_id", "similarity")
        if a in split_of and b in split_of and split_of[a] != split_of[b]
    ]
    for c in clusters:
        by_split: dict[str, int] = {}
        for i in c.image_ids:
            if i in split_of:
                by_split.setdefault(split_of[i], i)
        firsts = sorted(by_split.values())
        crossing += [(a, b, None, f"{c.kind} duplicate") for k, a in enumerate(firsts) for b in firsts[k + 1 :]]
    order = {"train": 0, "val": 1, "test": 2}
    by_splits: Counter = Counter()
    affected: dict[str, set] = {"val": set(), "test": set()}
    examples = []
    for a, b, sim, kind in crossing:
        sa, sb = sorted((split_of[a], split_of[b]), key=order.get)
        by_splits[f"{sa}/{sb}"] += 1
        for i in (a, b):
            if split_of[i] in affected:
                affected[split_of[i]].add(i)
        examples.append(
            {"a": a, "b": b, "split_a": split_of[a], "split_b": split_of[b], "similarity": sim, "kind": kind}
        )
    # Duplicates first, then the most similar pairs; pairs touching test before val.
    examples.sort(
        key=lambda e: (e["similarity"] is not None, -(e["similarity"] or 0), "test" not in (e["split_a"], e["split_b"]))
    )
    eval_n = {s: sum(1 for v in split_of.values() if v == s) for s in ("val", "test")}
    return {
        "version": version.number,
        "pairs": len(crossing),
        "by_splits": dict(sorted(by_splits.items())),
        "affected": {s: len(ids) for s, ids in affected.items()},
        "eval_photos": eval_n,
        "examples": examples[:LEAKY_EXAMPLES],
    }


def _labels_by_image(project: Project) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = defaultdict(dict)
    for image_id, head_id, class_id in Label.objects.filter(
        image__project=project, label_class__isnull=False
    ).values_list("image_id", "head_id", "label_class_id"):
        out[image_id][head_id] = class_id
    return out


def _conflicting(label_dicts: list[dict[int, int]]) -> bool:
    """Members disagree when two of them carry different (known) classes for the same head."""
    seen: dict[int, int] = {}
    for labels in label_dicts:
        for head_id, class_id in labels.items():
            if seen.setdefault(head_id, class_id) != class_id:
                return True
    return False


def _class_findings(project: Project, min_samples: int) -> dict:
    out = {}
    for head in project.heads.order_by("order", "id"):
        classes = list(
            LabelClass.objects.filter(head=head, merged_into__isnull=True)
            .annotate(
                n=Count("label", filter=Q(label__image__status=Image.Status.OK)),
            )
            .order_by("name")
        )
        counts = {c.name: c.n for c in classes if c.n}
        dist = health_core.class_distribution(counts, min_samples=min_samples)
        ids = {c.name: c.id for c in classes}
        excluded = {c.name for c in classes if c.excluded_from_training}
        dist["ids"] = ids
        dist["excluded"] = sorted(excluded)
        dist["rare"] = [{"name": n, "id": ids[n], "count": counts[n], "excluded": n in excluded} for n in dist["rare"]]
        dist["similar_names"] = [
            {
                "a": a,
                "b": b,
                "a_id": ids[a],
                "b_id": ids[b],
                "a_count": counts.get(a, 0),
                "b_count": counts.get(b, 0),
                "score": round(score, 1),
            }
            for a, b, score in health_core.similar_names([c.name for c in classes])
        ]
        dist["unknown_like"] = [
            {"name": c.name, "id": c.id, "count": c.n} for c in classes if health_core.is_unknown_like(c.name)
        ]
        unlabeled = Label.objects.filter(head=head, label_class__isnull=True, image__status=Image.Status.OK).count()
        dist["unlabeled"] = unlabeled
        out[head.name] = dist
    return out


def _per_class_accuracy(project: Project) -> dict | None:
    """The active model's per-class accuracy on its validation split (from its metrics.json), worst first."""
    import json

    version = project.model_versions.filter(is_active=True).first()
    if version is None:
        return None
    try:
        metrics = json.loads((storage.artifact_local(version.artifact_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {"model_version": version.number, "heads": {}, "note": "the model's metrics.json cannot be read"}
    heads = {}
    for head, m in (metrics.get("heads") or {}).items():
        per_class = m.get("per_class") or {}
        rows = [
            {"class": cls, "n": v.get("n", 0), "correct": v.get("correct", 0), "accuracy": v.get("accuracy")}
            for cls, v in per_class.items()
        ]
        rows.sort(key=lambda r: (r["accuracy"] if r["accuracy"] is not None else 2.0, r["class"]))
        heads[head] = rows
    note = "" if any(heads.values()) else "this model has no per-class metrics; retrain to see them"
    return {"model_version": version.number, "heads": heads, "note": note}


# ---------------------------------------------------------------------------------------------- actions
def plan_token(plan) -> str:
    """The confirmation token of a planned bulk change (any JSON-able description of exactly what it would
    change): the confirm step posts it back, and the change is refused unless the plan is still the same, so a
    form replayed after the change (or after the data moved on) cannot apply anything silently."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _set_status(images, new_status: str, reason: str, user, action: DatasetAction) -> list[dict]:
    changes = []
    events = []
    for im in images:
        if im.status == new_status:
            continue
        changes.append({"image_id": im.id, "old": im.status, "new": new_status, "old_reason": im.status_reason})
        events.append(
            ImageEvent(
                image_id=im.id, old_status=im.status, new_status=new_status, user=user, reason=reason, action=action
            )
        )
        Image.objects.filter(pk=im.id).update(status=new_status, status_reason=reason[:300])
    ImageEvent.objects.bulk_create(events)
    return changes


def _relabel(labels, new_class_id: int | None, reason: str, user, action: DatasetAction) -> list[dict]:
    """Set every given Label row to `new_class_id` (bumping its version) and log each change."""
    changes = []
    events = []
    for lb in labels:
        if lb.label_class_id == new_class_id:
            continue
        changes.append(
            {
                "label_id": lb.id,
                "image_id": lb.image_id,
                "head_id": lb.head_id,
                "old": lb.label_class_id,
                "new": new_class_id,
            }
        )
        events.append(
            LabelEvent(
                image_id=lb.image_id,
                head_id=lb.head_id,
                old_class_id=lb.label_class_id,
                new_class_id=new_class_id,
                user=user,
                reason=reason[:200],
                action=action,
            )
        )
    if changes:
        Label.objects.filter(pk__in=[c["label_id"] for c in changes]).update(
            label_class_id=new_class_id, version=F("version") + 1, updated_by=user
        )
        LabelEvent.objects.bulk_create(events, batch_size=2000)
    return changes


def cluster_resolve(
    *,
    cluster: DuplicateCluster,
    mode: str,
    user=None,
    keep_image_id: int | None = None,
    labels: dict[int, int | None] | None = None,
) -> DatasetAction:
    """Resolve a duplicate cluster: `keep_one` (keep `keep_image_id`, exclude the rest), `label_all` (apply
    `labels` {head id: class id} to every member) or `exclude_all`."""
    project = cluster.report.project
    ids = list(cluster.image_ids)
    with transaction.atomic():
        images = list(Image.objects.select_for_update().filter(pk__in=ids, project=project).order_by("id"))
        if not images:
            raise LabelingError("The images of this cluster no longer exist.")
        if mode == "keep_one":
            if keep_image_id not in ids:
                raise LabelingError("Choose which photo of the cluster to keep.")
            action = DatasetAction.objects.create(
                project=project,
                kind=DatasetAction.Kind.CLUSTER_KEEP_ONE,
                user=user,
                summary=f"kept image {keep_image_id}, excluded {len(ids) - 1} duplicate(s)",
                params={"cluster": cluster.id, "keep": keep_image_id},
            )
            changes = {
                "status": _set_status(
                    [im for im in images if im.id != keep_image_id],
                    Image.Status.EXCLUDED,
                    f"duplicate of image {keep_image_id}",
                    user,
                    action,
                )
            }
        elif mode == "exclude_all":
            action = DatasetAction.objects.create(
                project=project,
                kind=DatasetAction.Kind.CLUSTER_EXCLUDE_ALL,
                user=user,
                summary=f"excluded all {len(ids)} photos of a duplicate cluster",
                params={"cluster": cluster.id},
            )
            changes = {"status": _set_status(images, Image.Status.EXCLUDED, "duplicate cluster excluded", user, action)}
        elif mode == "label_all":
            try:
                labels = {int(k): (int(v) if v not in (None, "") else None) for k, v in (labels or {}).items()}
            except (TypeError, ValueError):
                raise LabelingError("Head and class must be given by their numeric ids.") from None
            if not labels:
                raise LabelingError("Choose the label to apply to every photo of the cluster.")
            heads = {h.id: h for h in project.heads.all()}
            for head_id, class_id in labels.items():
                if head_id not in heads:
                    raise LabelingError(f"Head {head_id} is not a head of this project.")
                if class_id is not None and not LabelClass.objects.filter(pk=class_id, head_id=head_id).exists():
                    raise LabelingError(f"Class {class_id} does not belong to head {heads[head_id].name!r}.")
            names = ", ".join(
                f"{heads[h].name}={LabelClass.objects.get(pk=c).name if c else 'unknown'}" for h, c in labels.items()
            )
            action = DatasetAction.objects.create(
                project=project,
                kind=DatasetAction.Kind.CLUSTER_LABEL_ALL,
                user=user,
                summary=f"labeled {len(ids)} duplicate photos {names}",
                params={"cluster": cluster.id, "labels": labels},
            )
            label_changes = []
            for head_id, class_id in labels.items():
                rows = Label.objects.select_for_update().filter(image_id__in=ids, head_id=head_id).order_by("id")
                label_changes += _relabel(
                    list(rows), class_id, f"duplicate cluster {cluster.id}: one label for all", user, action
                )
            changes = {"labels": label_changes}
        else:
            raise LabelingError(f"Unknown resolution {mode!r}; use keep_one, label_all or exclude_all.")
        action.changes = changes
        action.save(update_fields=["changes"])
        cluster.action = action
        cluster.save(update_fields=["action"])
    return action


def classes_merge(*, source: LabelClass, target: LabelClass, user=None) -> DatasetAction:
    """Merge `source` into `target` (same head): its labels move to `target`, its child classes (e.g. the
    models of a make) move under `target`, its name becomes an alias of `target`. Undoable."""
    if source.pk == target.pk:
        raise LabelingError("Choose two different classes to merge.")
    if source.head_id != target.head_id:
        raise LabelingError(
            f"{source.name!r} and {target.name!r} belong to different heads; only classes of one head merge."
        )
    with transaction.atomic():
        source = LabelClass.objects.select_for_update().get(pk=source.pk)
        target = LabelClass.objects.select_for_update().get(pk=target.pk)
        if source.merged_into_id or target.merged_into_id:
            raise LabelingError("One of these classes was already merged into another; reload the page.")
        if source.parent_id != target.parent_id and source.parent_id and target.parent_id:
            raise LabelingError(
                f"{source.name!r} belongs to {source.parent.name!r} and {target.name!r} to {target.parent.name!r}: "
                "merge their parent classes first."
            )
        project = source.head.project
        action = DatasetAction.objects.create(
            project=project,
            kind=DatasetAction.Kind.MERGE_CLASSES,
            user=user,
            summary=f"merged {source.head.name} {source.name!r} into {target.name!r}",
            params={"source": source.id, "target": target.id},
        )
        labels = list(Label.objects.select_for_update().filter(label_class=source).order_by("id"))
        label_changes = _relabel(labels, target.id, f"merge {source.name!r} into {target.name!r}", user, action)
        children = list(source.children.values_list("id", flat=True))
        LabelClass.objects.filter(pk__in=children).update(parent=target)
        new_aliases = [a for a in [source.name, *source.aliases] if a != target.name and a not in target.aliases]
        target.aliases = [*target.aliases, *new_aliases]
        target.save(update_fields=["aliases"])
        source.merged_into = target
        source.save(update_fields=["merged_into"])
        action.changes = {"labels": label_changes, "reparented": children, "aliases_added": new_aliases}
        action.save(update_fields=["changes"])
    return action


def classes_set_excluded(*, project: Project, class_ids: list[int], excluded: bool, user=None) -> DatasetAction:
    """Exclude classes from training (their labels count as unknown in new dataset versions) or include them
    again. The images and labels stay."""
    classes = list(LabelClass.objects.filter(pk__in=class_ids, head__project=project).select_related("head"))
    if not classes or len(classes) != len(set(class_ids)):
        raise LabelingError("Choose one or more classes of this project.")
    with transaction.atomic():
        changed = [c for c in classes if c.excluded_from_training != excluded]
        LabelClass.objects.filter(pk__in=[c.id for c in changed]).update(excluded_from_training=excluded)
        names = ", ".join(f"{c.head.name} {c.name!r}" for c in classes[:10]) + (" …" if len(classes) > 10 else "")
        action = DatasetAction.objects.create(
            project=project,
            kind=DatasetAction.Kind.EXCLUDE_CLASSES if excluded else DatasetAction.Kind.INCLUDE_CLASSES,
            user=user,
            summary=(
                f"{'excluded' if excluded else 'included'} {len(classes)} class(es) "
                f"{'from' if excluded else 'in'} training: {names}"
            ),
            params={"class_ids": sorted(class_ids), "excluded": excluded},
            changes={"classes": [{"id": c.id, "old": c.excluded_from_training, "new": excluded} for c in changed]},
        )
    return action


def training_options_set(
    *,
    project: Project,
    class_weighting: str = "none",
    per_class_cap: int | None = None,
    resize: str | None = None,
    user=None,
) -> DatasetAction:
    """Set the project's training options (undoable); resize None keeps the project's framing."""
    if class_weighting not in CLASS_WEIGHTING_CHOICES:
        raise LabelingError(f"class weighting must be one of {', '.join(CLASS_WEIGHTING_CHOICES)}.")
    if per_class_cap is not None and (not isinstance(per_class_cap, int) or per_class_cap < 1):
        raise LabelingError("The per-class cap must be a whole number of images ≥ 1 (or empty for no cap).")
    if resize is not None and resize not in RESIZE_CHOICES:
        raise LabelingError(f"Photo framing must be one of {', '.join(RESIZE_CHOICES)}, not {resize!r}.")
    with transaction.atomic():
        project = Project.objects.select_for_update().get(pk=project.pk)
        old = dict(project.training_options or {})
        new = {**old, "class_weighting": class_weighting, "per_class_cap": per_class_cap}
        if resize is not None:
            new["resize"] = resize
        project.training_options = new
        project.save(update_fields=["training_options"])
        cap = f"at most {per_class_cap} train images per class" if per_class_cap else "no per-class cap"
        framing = f", framing: {RESIZE_CHOICES[new['resize']]}" if new.get("resize") in RESIZE_CHOICES else ""
        return DatasetAction.objects.create(
            project=project,
            kind=DatasetAction.Kind.TRAINING_OPTIONS,
            user=user,
            summary=f"class weighting {class_weighting}, {cap}{framing}",
            params=new,
            changes={"old": old, "new": new},
        )


def labels_bulk_set(*, head: Head, class_id: int | None, expected: dict[int, int], user=None) -> dict:
    """Set `head`'s label of many images (image id -> the label version the user saw) to `class_id` as one
    undoable DatasetAction. Labels changed since they were shown are left alone and reported ("stale"), like a
    single edit's conflict. Returns {"action": DatasetAction | None, "changed": n, "stale": [image ids]}."""
    if class_id is not None and not LabelClass.objects.filter(pk=class_id, head=head).exists():
        raise LabelingError(f"Class {class_id} does not belong to head {head.name!r}.")
    if not expected:
        raise LabelingError("Select at least one image.")
    with transaction.atomic():
        labels = list(Label.objects.select_for_update().filter(head=head, image_id__in=list(expected)))
        fresh = [lb for lb in labels if lb.version == expected.get(lb.image_id)]
        stale = sorted(lb.image_id for lb in labels if lb.version != expected.get(lb.image_id))
        target = LabelClass.objects.filter(pk=class_id).first() if class_id else None
        action = DatasetAction.objects.create(
            project=head.project,
            kind=DatasetAction.Kind.BULK_RELABEL,
            summary=f"{head.name}: {len(fresh)} image(s) -> {target.name if target else 'unlabeled'}",
            params={"head": head.id, "class": class_id, "images": sorted(expected)},
            user=user,
        )
        changes = _relabel(fresh, class_id, "bulk relabel", user, action)
        if not changes:
            action.delete()
            return {"action": None, "changed": 0, "stale": stale}
        action.changes = {"labels": changes}
        action.save(update_fields=["changes"])
    return {"action": action, "changed": len(changes), "stale": stale}


# kind -> fn(action): what an app above labeling undoes of an action of that kind (review: the review queue items a
# bulk rule resolved open again), registered in that app's AppConfig.ready; labeling never imports it.
UNDO_HOOKS: dict[str, Callable[[DatasetAction], None]] = {}


def _undo_settings(action: DatasetAction, ch: dict) -> int:
    """Put back a project-settings action's fields and heads' optional flags (thresholds: above); a value changed
    again since is left as it is. Returns how many were skipped."""
    skipped = 0
    project = Project.objects.select_for_update().get(pk=action.project_id)
    put_back = []
    for c in reversed(ch.get("project_fields", [])):
        if getattr(project, c["field"]) != c["new"]:
            skipped += 1
            continue
        setattr(project, c["field"], c["old"])
        put_back.append(c["field"])
    if put_back:
        project.save(update_fields=put_back)
    for c in reversed(ch.get("heads_optional", [])):
        if not Head.objects.filter(pk=c["head_id"], optional=c["new"]).update(optional=c["old"]):
            skipped += 1
    if ch.get("head_created"):  # a new head goes again while nobody labeled anything for it
        head = Head.objects.filter(pk=ch["head_created"]).first()
        if (
            head is None
            or head.children.exists()
            or head.labels.filter(label_class__isnull=False).exists()
            or head.box_sets.filter(version__gt=0).exists()
        ):
            skipped += 1
        else:
            head.delete()
    return skipped


def action_undo(*, action: DatasetAction, user=None) -> dict:
    """Revert what `action` changed. A label or status someone changed since is left as it is now (reported
    as skipped): undo never overwrites a later edit."""
    skipped = 0
    with transaction.atomic():
        action = DatasetAction.objects.select_for_update().get(pk=action.pk)
        if action.undone_at is not None:
            raise LabelingError("This action was already undone.")
        if action.kind == DatasetAction.Kind.UNDO:
            raise LabelingError("An undo cannot be undone; redo the action instead.")
        ch = action.changes or {}
        reason = f"undo: {action.summary}"[:200]
        for c in reversed(ch.get("labels", [])):
            lb = Label.objects.select_for_update().filter(pk=c["label_id"]).first()
            if lb is None or lb.label_class_id != c["new"]:
                skipped += 1
                continue
            _relabel([lb], c["old"], reason, user, action)
        for c in reversed(ch.get("status", [])):
            im = Image.objects.select_for_update().filter(pk=c["image_id"]).first()
            if im is None or im.status != c["new"]:
                skipped += 1
                continue
            ImageEvent.objects.create(
                image=im, old_status=im.status, new_status=c["old"], user=user, reason=reason, action=action
            )
            Image.objects.filter(pk=im.pk).update(status=c["old"], status_reason=c.get("old_reason", ""))
        for c in reversed(ch.get("group_splits", [])):  # sticky splits moved by versions.splits_unleak
            moved = GroupSplit.objects.filter(project_id=action.project_id, group_key=c["group"], split=c["new"])
            if not moved.update(split=c["old"]):
                skipped += 1
        for c in ch.get("classes", []):
            LabelClass.objects.filter(pk=c["id"]).update(excluded_from_training=c["old"])
        if action.kind == DatasetAction.Kind.MERGE_CLASSES:
            source = LabelClass.objects.get(pk=action.params["source"])
            target = LabelClass.objects.get(pk=action.params["target"])
            LabelClass.objects.filter(pk__in=ch.get("reparented", []), parent=target).update(parent=source)
            target.aliases = [a for a in target.aliases if a not in set(ch.get("aliases_added", []))]
            target.save(update_fields=["aliases"])
            source.merged_into = None
            source.save(update_fields=["merged_into"])
        if action.kind == DatasetAction.Kind.TRAINING_OPTIONS:
            Project.objects.filter(pk=action.project_id).update(training_options=ch.get("old", {}))
        for c in ch.get("thresholds", []):  # serving thresholds set from a model's calibration
            head = Head.objects.select_for_update().filter(pk=c["head_id"], project_id=action.project_id).first()
            if head is None or head.threshold != c["new"]:
                skipped += 1
                continue
            head.threshold = c["old"]
            head.save(update_fields=["threshold"])  # post_save drops the cached serving settings
        skipped += _undo_settings(action, ch)
        skipped += boxes.box_sets_revert(action=action, user=user)  # a detection head's boxes (labeling.boxes)
        hook = UNDO_HOOKS.get(action.kind)  # the part of an action that an app above labeling owns
        if hook is not None:
            hook(action)
        action.undone_at = timezone.now()
        action.undone_by = user
        action.save(update_fields=["undone_at", "undone_by"])
    return {"skipped": skipped}
