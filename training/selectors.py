"""Reads of the training app: the presets and the config a run would resolve, what a change would do before it is
made, what a model version is (model page), which version a command means, whether its out-of-fold predictions exist."""

import json
import sys
from pathlib import Path

from django.conf import settings

from labeling.models import Head, Project

from .engine.artifact import CALIBRATION_FILE, read_artifact_json
from .errors import TrainingError
from .models import Job, ModelVersion


def head_thresholds_plan(*, version: ModelVersion, heads: list[str] | None = None) -> list[dict]:
    """The serving-threshold changes that "Use suggested thresholds" would make: per head with a calibrated
    suggestion (and in `heads`, when given) that differs from the current threshold, {"head_id", "head", "old",
    "new"} (confidences 0-1), in head order. [] when nothing would change or the version was not calibrated."""
    suggested = version.suggested_thresholds
    rows = []
    for head in Head.objects.filter(project_id=version.project_id, name__in=list(suggested)).order_by("order", "id"):
        if heads is not None and head.name not in heads:
            continue
        new = round(min(1.0, max(0.0, suggested[head.name])), 4)
        if new != head.threshold:
            rows.append({"head_id": head.id, "head": head.name, "old": head.threshold, "new": new})
    return rows


# ------------------------------------------------------------------------------------------- model page
_MEDIA = {
    ".onnx": "application/octet-stream",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".png": "image/png",
    ".tflite": "application/octet-stream",
}
# sent as attachments; model.tflite exists after a mobile export (pipeline.chain.model_version_mobile_export)
DOWNLOADS = ("model.onnx", "detector.onnx", "model.tflite", "detector.tflite", "label_maps.json", "report.md")
RECIPE_KEYS = (
    "backbone",
    "image_size",
    "resize",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "scheduler",
    "weight_decay",
    "label_smoothing",
    "freeze_backbone_epochs",
    "freeze_fraction",
    "unfreeze_lr_mult",
    "early_stopping",
    "head_type",
    "class_weighting",
    "sampler",
    "augment",
    "hflip",
    "vflip",
    "rotation_degrees",
    "color_jitter",
    "crop_scale_min",
    "quick_views",
)


def _heads(version: ModelVersion) -> list[str]:
    return list(((version.metrics or {}).get("heads") or {}).keys())


def model_version_file_names(*, version: ModelVersion) -> list[str]:
    """The artifact files the model page and API may serve (a fixed allow-list; no name from a URL ever reaches
    the filesystem unless it is one of these): the downloads, curves.png and per known head its confusion and
    reliability pictures."""
    names = [*DOWNLOADS, "curves.png"]
    for head in _heads(version):
        names += [f"confusion_{head}.png", f"reliability_{head}.png"]
    return [n for n in names if "/" not in n and "\\" not in n and not n.startswith(".")]


def model_version_file(*, version: ModelVersion, name: str) -> tuple[Path, str, bool] | None:
    """(path, content type, as attachment) of an allowed artifact file that exists, else None. A reliability
    diagram is drawn on first request from the bins that the calibration stored in calibration.json."""
    if not version.artifact_dir or name not in model_version_file_names(version=version):
        return None
    path = version.local_dir / name
    if name.startswith("reliability_") and not path.is_file():
        _reliability_plot(version, name.removeprefix("reliability_").removesuffix(".png"), path)
    if not path.is_file():
        return None
    return path, _MEDIA[path.suffix], name in DOWNLOADS


def _reliability_plot(version: ModelVersion, head: str, path: Path) -> None:
    """A derived picture of stored data, written whole (temp name + os.replace) so concurrent views are safe."""
    calibration = read_artifact_json(version.local_dir, CALIBRATION_FILE) or {}
    bins = (calibration.get("reliability") or {}).get(head)
    if bins:
        from training.engine.report import plot_reliability  # noqa: PLC0415 - matplotlib only when drawn

        plot_reliability(bins, path, title=head)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _retrieval_row(rep: dict | None) -> dict | None:
    """Recall@1/5 and mAP under template-friendly keys ("recall@1" is not a template attribute)."""
    if not rep:
        return None
    return {
        "recall1": rep.get("recall@1"),
        "recall5": rep.get("recall@5"),
        "map": rep.get("map"),
        "map_at": rep.get("map_at"),
        "n_queries": rep.get("n_queries"),
        "n_gallery": rep.get("n_gallery"),
    }


def _class_photos(art: Path, head: str) -> dict[str, list[int]]:
    """Image ids per class of `head` in the version's manifest, validation photos first."""
    items = (_read_json(art / "manifest.json") or {}).get("items") or []
    out: dict[str, list[int]] = {}
    for it in sorted(items, key=lambda it: it.get("split") != "val"):
        cls = (it.get("labels") or {}).get(head)
        if cls is not None:
            out.setdefault(cls, []).append(it["id"])
    return out


def _detector_rows(metrics: dict) -> dict:
    """The model page's detector table: (split, figures) for val and test, and the per-class rows of the test split
    (else val). Empty for a classifier."""
    if metrics.get("task") != "detection":
        return {}
    rows = [("validation", metrics.get("val")), ("test (frozen test split)", metrics.get("test"))]
    split, per = ("test", (metrics.get("test") or {}).get("per_class")) if metrics.get("test") else ("val", None)
    if not per:
        split, per = "validation", (metrics.get("val") or {}).get("per_class")
    return {
        "detector_rows": rows,
        "detector_classes": sorted((per or {}).items()),
        "detector_classes_split": split,
    }


def model_version_evaluation(*, version: ModelVersion) -> dict:
    """Everything the model page shows, from the version's metrics and artifact folder: per head top-1/top-5 on
    val and test, per-class P/R/F1 rows, most-confused pairs with up to 4 example validation image ids (true
    class predicted as the other, from the calibration's predictions), Recall@1/5 + mAP, whether a confusion /
    reliability picture exists (or why not), the run's resolved config and the files to download."""
    metrics = version.metrics or {}
    art = version.local_dir
    calibration = (_read_json(art / "calibration.json") if art else {}) or {}
    config = (_read_json(art / "config.json") if art else {}) or (version.run.config if version.run else {})
    mistakes = calibration.get("mistakes") or {}
    test_heads = (metrics.get("test") or {}).get("heads") or {}
    retrieval = metrics.get("retrieval") or {}
    heads = []
    for name, m in (metrics.get("heads") or {}).items():
        examples: dict[tuple[str, str], list[int]] = {}
        for image_id, true, predicted, _conf in mistakes.get(name) or []:
            examples.setdefault((true, predicted), []).append(image_id)
        pairs = [
            {**p, "examples": examples.get((p["true"], p["predicted"]), [])[:4]} for p in m.get("most_confused") or []
        ]
        if pairs and name not in mistakes:  # calibrated before wrong answers were kept: photos of each class
            by_class = _class_photos(art, name) if art else {}
            for p in pairs:
                p["true_photos"] = by_class.get(p["true"], [])[:2]
                p["predicted_photos"] = by_class.get(p["predicted"], [])[:2]
        if not calibration:
            reliability_note = "No calibration: the dataset version has no validation split."
            if (metrics.get("calibration") or {}).get("error"):
                reliability_note = f"The calibration failed: {metrics['calibration']['error'][:200]}"
        elif name not in (calibration.get("reliability") or {}):
            reliability_note = (
                "No reliability diagram: this version was calibrated before reliability bins were recorded, "
                "or the head has no validation photo with a known label."
            )
        else:
            reliability_note = ""
        heads.append(
            {
                "name": name,
                "val": {"top1": m.get("top1"), "top5": m.get("top5"), "n": m.get("n_val")},
                "test": test_heads.get(name),
                "macro": m.get("macro") or {},
                "per_class": [{"name": c, **row} for c, row in (m.get("per_class") or {}).items()],
                "pairs": pairs,
                "pairs_have_examples": name in mistakes,
                "retrieval": _retrieval_row(retrieval.get(name)),
                "confusion": bool(art and (art / f"confusion_{name}.png").is_file()),
                "reliability_note": reliability_note,
                "temperature": (calibration.get("temperature") or {}).get(name),
            }
        )
    run = version.run
    return {
        "heads": heads,
        "config": config,
        "recipe": [(k, config[k]) for k in RECIPE_KEYS if k in config],
        "dataset_version": run.dataset_version.number if run and run.dataset_version_id else None,
        "curves": bool(art and (art / "curves.png").is_file()),
        "downloads": [n for n in DOWNLOADS if art and (art / n).is_file()],
        **_detector_rows(metrics),
        **_mobile(version, art),
        "metrics_on": metrics.get("metrics_on") or "val",
        "has_val": bool(metrics.get("n_val")),
    }


def _mobile(version: ModelVersion, art: Path | None) -> dict:
    """The model page's mobile export card: the export's check (model_tflite.json), its latest job, and whether
    this machine has the converter (training.engine.mobile)."""
    from training.engine.mobile import mobile_python  # noqa: PLC0415

    detector = (version.metrics or {}).get("task") == "detection"
    name, meta_name = ("detector.tflite", "detector_tflite.json") if detector else ("model.tflite", "model_tflite.json")
    job = Job.objects.filter(version=version, kind=Job.Kind.MOBILE_EXPORT).order_by("-created_at", "-id").first()
    meta = (_read_json(art / meta_name) if art else None) or None
    exported = bool(meta and art and (art / name).is_file())
    return {"mobile": {"meta": meta if exported else None, "job": job, "available": mobile_python() is not None}}


def training_recipe(*, project: Project) -> dict:
    """What the next Retrain (with an empty form) would run: the resolved config's main keys and where
    `pretrained: true` would find weights on this machine ({"error": ...} when the config does not resolve)."""
    try:
        config = run_config(project, {})  # the same resolution a run uses
    except TrainingError as exc:
        return {"error": str(exc)}
    from django.conf import settings  # noqa: PLC0415

    overridden = {**settings.LOUPE_TRAIN_OVERRIDES, **(project.training_options or {})}
    try:  # a preset's `cuda:` mapping (larger settings for a GPU worker), when the preset has one
        on_cuda = preset_config(project.preset, cuda=True)
        plain = preset_config(project.preset, cuda=False)
    except TypeError:  # presets without CUDA settings
        on_cuda = plain = {}
    cuda = [(k, v) for k, v in on_cuda.items() if plain.get(k, object()) != v and k not in overridden]
    return {
        "rows": [(k, config[k]) for k in RECIPE_KEYS if k in config],
        "pretrained": pretrained_plan(config),
        "cuda": cuda,
    }


def pretrained_plan(config: dict) -> str:
    """Where the backbone's starting weights would come from, read from disk only (no network probe)."""
    if config.get("pretrained_path"):
        return f"file ({config['pretrained_path']})"
    if not config.get("pretrained"):
        return "none — random init (pretrained: false)"
    from training.engine import pretrained  # noqa: PLC0415 - torch/timm only when asked

    name = config["backbone"]
    try:
        cached = pretrained.hub_cached_file(name)
    except Exception:  # noqa: BLE001 - an unknown backbone name is reported by the run itself
        cached = None
    if cached:
        return f"hub, from the local cache ({cached[1]})"
    bundled = pretrained.bundled_for(name)
    fallback = (
        f"else bundled ({bundled.distribution})"
        if bundled and pretrained.bundled_file(name)
        else "else none — random init"
    )
    if pretrained.hub_offline():
        return f"not in the hub cache and HF_HUB_OFFLINE is set: {fallback.removeprefix('else ')}"
    return f"timm's hub if it answers, {fallback}"


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_config(preset: str, *, cuda: bool | None = None) -> dict:
    """The YAML training preset of a project preset (training/presets/<preset>.yaml); {} when there is none. Its
    `cuda:` mapping (a larger backbone for a GPU worker) applies when `cuda` (default: this process has torch
    loaded and a CUDA device, as a training worker does; a web process that never loaded torch says no)."""
    import yaml

    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TrainingError(f"{path} must hold a mapping of engine config keys, got {type(data).__name__}")
    on_cuda = data.pop("cuda", None) or {}
    if not isinstance(on_cuda, dict):
        raise TrainingError(f"{path}: 'cuda' must be a mapping of engine config keys for CUDA workers")
    if cuda is None:
        torch = sys.modules.get("torch")
        cuda = bool(torch is not None and torch.cuda.is_available())
    return {**data, **on_cuda} if cuda else data


def oof_mode_for(version: ModelVersion) -> str:
    """ "quick" (heads on cached frozen features: seconds) when the version's backbone started from pretrained
    weights that resolved, else "cheap" (K short full trainings: random-init features are no use to heads)."""
    source = (version.metrics or {}).get("pretrained_source")
    return "quick" if source in ("file", "hub", "bundled") else "cheap"


def model_version_has_oof(*, version: ModelVersion, k: int = 5) -> bool:
    """Whether the version's out-of-fold predictions (K folds) are on disk: they never change (the version's
    dataset is frozen), so a rollback or a second refresh reuses them."""
    summary = (version.metrics or {}).get("oof") or {}
    art = version.local_dir / "oof"
    return summary.get("k") == k and (art / "oof_meta.json").is_file() and (art / "oof_predictions.npz").is_file()


def model_version_for(project: Project, number: int | None) -> ModelVersion:
    """Version `number` of the project, or the active one when number is None (for the command line)."""
    versions = project.model_versions
    version = versions.filter(number=number).first() if number else versions.filter(is_active=True).first()
    if version is None:
        raise TrainingError("No such model version (train and promote one first, or pass --model-version N).")
    return version


def is_detection_project(project: Project) -> bool:
    """A project whose model is a detector: it has a detection head (the shelf preset)."""
    return project.heads.filter(kind="detection").exists()


def run_config(project: Project, overrides: dict) -> dict:
    """The full engine config of a run: engine defaults < the project preset's YAML < LOUPE_TRAIN_OVERRIDES <
    the project's training options (health page) < the run's own overrides (Retrain form, manage.py train).
    A detection project gets the detector's config (training.engine.detection), with "task": "detection"."""
    if is_detection_project(project):
        return detector_run_config(project, overrides)
    from training.engine import resolve_config

    merged = {
        **preset_config(project.preset),
        **settings.LOUPE_TRAIN_OVERRIDES,
        **_with_project_options(project, overrides or {}),
    }
    try:
        return resolve_config(merged)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc


def detector_run_config(project: Project, overrides: dict) -> dict:
    """The detector's config: its defaults < the preset's YAML < the keys of LOUPE_TRAIN_OVERRIDES that the detector
    has (device, epochs, pretrained …; the classifier's others do not apply) < the run's own overrides (refused
    with the key named when the detector has no such key)."""
    from training.engine.detection import DEFAULT_DETECTOR_CONFIG, resolve_detector_config

    worker = {k: v for k, v in settings.LOUPE_TRAIN_OVERRIDES.items() if k in DEFAULT_DETECTOR_CONFIG}
    own = {k: v for k, v in (overrides or {}).items() if k != "quick" or v}  # the Retrain form's unticked box
    if own.get("quick"):
        raise TrainingError("A detector has no quick retrain (heads on cached features): run a full training.")
    try:
        resolved = resolve_detector_config({**preset_config(project.preset), **worker, **own})
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    return {**resolved, "task": "detection", "quick": False}


# Engine keys a project's training options may set for its runs (beside class weighting): quick_views, e.g. [] for a
# project of tight crops where the sku preset's shifted views cost accuracy, resize, "fit" for tall or wide crops,
# and tail_views, fewer augmented views' maps for a project of many small photos whose eight views' maps would not
# fit the CPU budget (the shelf demo's SKU project: labeling.shelf_data.SKU_PROJECT_OPTIONS).
PROJECT_ENGINE_OPTIONS = ("quick_views", "resize", "tail_views")


def _with_project_options(project: Project, config: dict) -> dict:
    """The project's training options (health page: class weighting; PROJECT_ENGINE_OPTIONS) under the run's own
    overrides."""
    options = project.training_options or {}
    extra = {k: options[k] for k in PROJECT_ENGINE_OPTIONS if k in options and k not in config}
    weighting = options.get("class_weighting")
    if weighting and weighting != "none" and "class_weighting" not in config:
        extra["class_weighting"] = weighting
    return {**config, **extra}
