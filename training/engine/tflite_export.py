"""Mobile export (issue 18.7, the shelf seed's TFLite path): a trained classifier (artifact_dir/model.pt) to
artifact_dir/model.tflite with litert-torch, checked against onnxruntime on model.onnx (or torch eager when the
artifact has no ONNX file) with the LiteRT interpreter (ai-edge-litert). No Django.

litert-torch pins packages the serving stack cannot share (xdsl pins typing-extensions < 4.13, which downgrades
pydantic), so it lives in its own environment (`make .venv-mobile`: requirements-mobile.txt on top of the main
environment's packages) and this module runs there as a subprocess of training.engine.mobile:

    .venv-mobile/bin/python -m training.engine.tflite_export <artifact_dir>     # prints the result as JSON

Graph contract: input ``images`` float32 NCHW (1, 3, S, S), prepared exactly as for model.onnx (its
onnx_meta.json["preprocess"], repeated in model_tflite.json); outputs in model.onnx's order and names:
``logits_<head>``..., ``probs_<head>``..., ``embedding`` (read them by name through the interpreter's
signature runner "serving_default": output_0, output_1, ... in that order; model_tflite.json lists the names).
Batch 1: the mobile case (one photo per call).

Detectors (artifact_dir has detector.onnx / detector_onnx.json): torch.export, which litert-torch is built on, cannot
trace torchvision's Faster R-CNN (data-dependent proposal count and NMS), so the detector is converted as
training.engine.detector_static.StaticDetector (the same network with fixed-size intermediate results) to
detector.tflite (+ detector_tflite.json): input ``image`` float32 (1, 3, H, W) RGB in [0, 1], H x W = the config's
(min_size, max_size), the photo letterboxed into it (detector_static.letterbox: scaled to fit, top-left, black
padding; divide the boxes by the scale); outputs boxes (D, 4) xyxy, labels (D,), scores (D,) best first, rows with
score 0 are empty; filter at score_threshold. Checked with LiteRT against the torch detector on the given photos
(letterboxed) or, without photos, on random images: every torch detection at or above the threshold must have a
LiteRT one of the same class within BOX_ATOL pixels and SCORE_ATOL."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic, write_json_atomic

log = logging.getLogger("training.engine")

TFLITE_FILE = "model.tflite"
TFLITE_META_FILE = "model_tflite.json"
DETECTOR_TFLITE_FILE = "detector.tflite"
DETECTOR_TFLITE_META_FILE = "detector_tflite.json"
CHECK_PHOTOS = 4  # random inputs compared with the reference, batch 1 each
BOX_ATOL = 0.5  # detector check: pixels (as the ONNX detector's)
SCORE_ATOL = 1e-3
ATOL = 1e-3  # as the ONNX check: |tflite - reference| <= ATOL * max(1, max|reference|) + RTOL * |reference|
RTOL = 1e-3
UNAVAILABLE = (
    "The mobile exporter is not installed: run `make .venv-mobile` (requirements-mobile.txt: litert-torch and "
    "ai-edge-litert in their own environment) or set LOUPE_MOBILE_PYTHON to a Python that has them."
)


class MobileExportError(ValueError):
    """The export cannot be made or failed its check; the message says why and what to do."""


def _detector_matches(torch_out, lite: dict, threshold: float, photo: int) -> dict:
    """Every torch detection at or above `threshold` has a LiteRT detection of the same class within BOX_ATOL
    pixels and SCORE_ATOL (scores within SCORE_ATOL of the threshold may be on either side), and LiteRT finds no
    more than that. Returns {"max_box_diff", "max_score_diff", "detections"}; MobileExportError otherwise."""
    tb, tl, ts = (np.asarray(v) for v in (torch_out["boxes"], torch_out["labels"], torch_out["scores"]))
    lb, ll, ls = (np.asarray(lite[f"output_{i}"]) for i in range(3))
    sure = ls >= threshold - SCORE_ATOL
    lb, ll, ls = lb[sure], ll[sure], ls[sure]
    used = np.zeros(len(ls), dtype=bool)
    box_diff = score_diff = 0.0
    n = 0
    for b, lab, s in zip(tb, tl, ts, strict=True):
        if s < threshold - SCORE_ATOL:
            continue
        d = np.abs(lb - b).max(axis=1) if len(lb) else np.zeros(0)
        ok = np.flatnonzero((ll == lab) & (d <= BOX_ATOL) & (np.abs(ls - s) <= SCORE_ATOL) & ~used)
        if not len(ok):
            if s < threshold + SCORE_ATOL:
                continue  # at the threshold: either side
            raise MobileExportError(
                f"TFLite detector check, photo {photo}: torch's detection (class {int(lab)}, score {s:.3f}, box "
                f"{np.round(b, 1).tolist()}) has no LiteRT match: the conversion is not faithful"
            )
        j = ok[np.argmin(d[ok])]
        used[j] = True
        box_diff, score_diff, n = max(box_diff, float(d[j])), max(score_diff, float(abs(ls[j] - s))), n + 1
    extra = int((~used & (ls >= threshold + SCORE_ATOL)).sum())
    if extra:
        raise MobileExportError(f"TFLite detector check, photo {photo}: LiteRT finds {extra} detections torch does not")
    return {"max_box_diff": box_diff, "max_score_diff": score_diff, "detections": n}


def export_detector_tflite(artifact_dir, *, images: list[str] | None = None, check: bool = True) -> dict:
    """detector.tflite (+ detector_tflite.json) of a detector artifact, put in place only after the check passed
    (see the module docstring). Returns {"path", "meta_path", "reference", "max_abs_diff" (the largest box
    difference in pixels), "photos_checked", "size_bytes", "seconds"}."""
    t0 = time.monotonic()
    d = Path(artifact_dir)
    try:
        import litert_torch  # noqa: PLC0415
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
    except ImportError as exc:
        raise MobileExportError(f"{UNAVAILABLE} ({exc})") from exc
    from .detection import _load_image, load_detector, predict_detector  # noqa: PLC0415
    from .detector_static import StaticDetector, letterbox  # noqa: PLC0415

    model, ckpt = load_detector(d)
    cfg = ckpt["config"]
    height, width, threshold = int(cfg["min_size"]), int(cfg["max_size"]), float(cfg["score_threshold"])
    hflip = bool(cfg.get("tta_hflip"))
    static = StaticDetector(model, height, width, agnostic_iou=cfg.get("agnostic_nms_iou"), hflip=hflip).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = [letterbox(_load_image(str(p)), height, width)[0] for p in (images or [])[:CHECK_PHOTOS]]
    inputs = inputs or [torch.rand(1, 3, height, width, generator=gen) for _ in range(2)]
    stats: dict = {}

    def convert(tmp: Path) -> None:
        t = time.monotonic()
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            edge = litert_torch.convert(static, (inputs[0],))
            edge.export(str(tmp))
        os.chmod(tmp, 0o644)
        stats["convert_seconds"] = round(time.monotonic() - t, 2)
        if not check:
            return
        runner = Interpreter(model_path=str(tmp)).get_signature_runner()
        (input_name,) = runner.get_input_details()
        figures = []
        for n, x in enumerate(inputs):
            ref = predict_detector(model, [x[0]], agnostic_iou=cfg.get("agnostic_nms_iou"), hflip=hflip)[0]
            figures.append(_detector_matches(ref, runner(**{input_name: x.numpy()}), threshold, n))
        stats["check"] = {
            "max_box_diff": max(f["max_box_diff"] for f in figures),
            "max_score_diff": max(f["max_score_diff"] for f in figures),
            "detections": sum(f["detections"] for f in figures),
        }

    target = d / DETECTOR_TFLITE_FILE
    _write_converted(target, convert, what=f"the detector in {d}")
    check_fig = stats.get("check") or {}
    n_out = static.detections
    reference = ("torch (model.pt) on " + (f"{len(inputs)} photos" if images else "random images")) if check else None
    meta = {
        "format": "loupe-det-tflite-v1",
        "file": DETECTOR_TFLITE_FILE,
        "input": "image",
        "input_shape": [1, 3, height, width],
        "input_contract": "float32 RGB in [0, 1]; the photo scaled to fit height x width with its aspect ratio, at the "
        "top-left of a black canvas (training.engine.detector_static.letterbox); boxes / scale = photo pixels",
        "outputs": ["boxes", "labels", "scores"],
        "output_shapes": {"boxes": [n_out, 4], "labels": [n_out], "scores": [n_out]},
        "signature": "serving_default (output_0 boxes xyxy, output_1 class index, output_2 score; score 0 = empty row)",
        "classes": ckpt["classes"],
        "score_threshold": threshold,
        "tta_hflip": hflip,
        "reference": reference,
        "max_abs_diff": check_fig.get("max_box_diff"),
        "max_score_diff": check_fig.get("max_score_diff"),
        "detections_checked": check_fig.get("detections"),
        "photos_checked": len(inputs) if check else 0,
        "box_atol": BOX_ATOL,
        "score_atol": SCORE_ATOL,
        **_converter(litert_torch, stats),
    }
    return _finish(target, d / DETECTOR_TFLITE_META_FILE, meta, t0)


def _write_converted(target: Path, convert, *, what: str) -> None:
    """write_atomic(target, convert): the file is in place only when the conversion and its check passed; a
    converter's (long) error becomes one MobileExportError line."""
    try:
        write_atomic(target, convert)
    except MobileExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - converter errors are long: the first lines, in one message
        text = " | ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())[:500]
        raise MobileExportError(f"TFLite conversion of {what} failed: {type(exc).__name__}: {text}") from exc


def _converter(litert_torch, stats: dict) -> dict:
    return {
        "converter": f"litert-torch {getattr(litert_torch, '__version__', '?')}",
        "torch_version": str(torch.__version__),
        "convert_seconds": stats.get("convert_seconds"),
    }


def _finish(target: Path, meta_path: Path, meta: dict, t0: float) -> dict:
    """Write the metadata beside the file; the export's result."""
    write_json_atomic(meta_path, meta, indent=2)
    return {
        "path": str(target),
        "meta_path": str(meta_path),
        "reference": meta["reference"],
        "max_abs_diff": meta["max_abs_diff"],
        "photos_checked": meta["photos_checked"],
        "size_bytes": target.stat().st_size,
        "seconds": round(time.monotonic() - t0, 2),
    }


def _is_detector(d: Path) -> bool:
    """A detection artifact: its metrics say so (training.engine.detection), or it has the detector's ONNX files."""
    if (d / "detector.onnx").is_file() or (d / "detector_onnx.json").is_file():
        return True
    try:
        return json.loads((d / "metrics.json").read_text()).get("task") == "detection"
    except (OSError, ValueError, AttributeError):
        return False


def _reference_session(d: Path):
    """onnxruntime on model.onnx (what the server serves) or None when the artifact has none."""
    if not (d / "model.onnx").is_file():
        return None
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(d / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def _compare(names: list[str], ref: list[np.ndarray], got: dict, photo: int) -> dict[str, float]:
    """Per output max abs difference; MobileExportError when one is beyond tolerance or a head's class differs
    (unless the reference's top two are within ATOL: a tie either runtime may break)."""
    diffs = {}
    for i, (name, r) in enumerate(zip(names, ref, strict=True)):
        g = np.asarray(got[f"output_{i}"], dtype=np.float64)
        r64 = np.asarray(r, dtype=np.float64)
        if g.shape != r64.shape:
            raise MobileExportError(
                f"TFLite output {name!r} has shape {list(g.shape)}, the reference {list(r64.shape)}"
            )
        scale = max(1.0, float(np.abs(r64).max())) if r64.size else 1.0
        diff = np.abs(g - r64)
        d = float(diff.max()) if diff.size else 0.0
        if not np.isfinite(d) or (diff > ATOL * scale + RTOL * np.abs(r64)).any():
            raise MobileExportError(
                f"TFLite output {name!r} differs from the reference by {d:.3g} on check photo {photo} (values up "
                f"to {scale:.3g}): the conversion is not faithful"
            )
        if name.startswith("probs_") and r64.shape[1] > 1:
            top = np.sort(r64[0])
            if top[-1] - top[-2] > ATOL and int(g[0].argmax()) != int(r64[0].argmax()):
                raise MobileExportError(f"TFLite predicts another class than the reference for head {name[6:]!r}")
        diffs[name] = d
    return diffs


def export_tflite(artifact_dir, *, check: bool = True, images: list[str] | None = None) -> dict:
    """Convert artifact_dir/model.pt to model.tflite (+ model_tflite.json), put in place only after the check
    passed: CHECK_PHOTOS random inputs through the LiteRT interpreter and the reference (onnxruntime on
    model.onnx, else torch eager) agree on every output within tolerance and on every head's class. Returns
    {"path", "meta_path", "reference", "max_abs_diff", "photos_checked", "size_bytes", "seconds"}.
    MobileExportError for a detector, a missing converter or a failed check; FileNotFoundError / ValueError for
    a bad artifact (onnx_export.load_artifact)."""
    t0 = time.monotonic()
    d = Path(artifact_dir)
    if _is_detector(d):
        return export_detector_tflite(d, images=images, check=check)
    try:
        import litert_torch  # noqa: PLC0415
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
    except ImportError as exc:
        raise MobileExportError(f"{UNAVAILABLE} ({exc})") from exc

    from .data import resize_mode  # noqa: PLC0415
    from .onnx_export import OnnxLoupe, load_artifact, output_names, preprocess_contract  # noqa: PLC0415

    model, ckpt = load_artifact(d)
    size = int(ckpt["config"]["image_size"])
    heads = [h["name"] for h in ckpt["heads"]]
    names = output_names(heads)
    wrapper = OnnxLoupe(model).eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, size, size, generator=gen)
    reference = _reference_session(d)
    stats: dict = {}

    def convert(tmp: Path) -> None:
        t = time.monotonic()
        # the converter prints its progress on stdout, which carries this module's JSON answer: to stderr
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            edge = litert_torch.convert(wrapper, (example,))
            edge.export(str(tmp))
        os.chmod(tmp, 0o644)  # read by other processes (web) than the worker that wrote it
        stats["convert_seconds"] = round(time.monotonic() - t, 2)
        if not check:
            return
        runner = Interpreter(model_path=str(tmp)).get_signature_runner()
        (input_name,) = runner.get_input_details()
        worst: dict[str, float] = dict.fromkeys(names, 0.0)
        for n in range(CHECK_PHOTOS):
            x = example if n == 0 else torch.randn(1, 3, size, size, generator=gen)
            if reference is not None:
                ref = reference.run(names, {"images": x.numpy()})
            else:
                with torch.no_grad():
                    ref = [t.float().numpy() for t in wrapper(x)]
            got = runner(**{input_name: x.numpy()})
            for k, v in _compare(names, ref, got, n).items():
                worst[k] = max(worst[k], v)
        stats["abs_diff"] = worst

    target = d / TFLITE_FILE
    _write_converted(target, convert, what=str(d / "model.pt"))
    ref_name = "onnxruntime (model.onnx)" if reference is not None else "torch eager (model.pt)"
    max_diff = max(stats.get("abs_diff", {}).values(), default=None) if check else None
    meta = {
        "format": "loupe-tflite-v1",
        "file": TFLITE_FILE,
        "input": "images",
        "input_shape": [1, 3, size, size],
        "preprocess": preprocess_contract(size, ckpt["mean"], ckpt["std"], resize_mode(ckpt["config"])),
        "outputs": names,
        "signature": "serving_default (outputs output_0 .. output_N in the order of `outputs`)",
        "heads": ckpt["label_maps"],
        "reference": ref_name if check else None,
        "max_abs_diff": max_diff,
        "abs_diff": stats.get("abs_diff"),
        "photos_checked": CHECK_PHOTOS if check else 0,
        "atol": ATOL,
        "rtol": RTOL,
        **_converter(litert_torch, stats),
    }
    return _finish(target, d / TFLITE_META_FILE, meta, t0)


def main(argv: list[str]) -> int:
    """`python -m training.engine.tflite_export <artifact_dir> [--no-check] [--image=PATH ...]` (--image: photos
    a detector is checked on): the result as one JSON line on stdout; exit 2 with {"error": ...} when the export is
    refused or fails."""
    args = [a for a in argv if not a.startswith("--")]
    images = [a.removeprefix("--image=") for a in argv if a.startswith("--image=")]
    if len(args) != 1:
        print(json.dumps({"error": "usage: python -m training.engine.tflite_export <artifact_dir> [--no-check]"}))
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        result = export_tflite(args[0], check="--no-check" not in argv, images=images or None)
    except (MobileExportError, FileNotFoundError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
