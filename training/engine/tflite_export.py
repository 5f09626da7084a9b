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

Detectors (torchvision Faster R-CNN) are refused with the reason: torch.export, which litert-torch is built on,
cannot trace their data-dependent proposal count and NMS (`batched_nms`: "Could not guard on data-dependent
expression"); their mobile path is detector.onnx on ONNX Runtime Mobile."""

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
CHECK_PHOTOS = 4  # random inputs compared with the reference, batch 1 each
ATOL = 1e-3  # as the ONNX check: |tflite - reference| <= ATOL * max(1, max|reference|) + RTOL * |reference|
RTOL = 1e-3
UNAVAILABLE = (
    "The mobile exporter is not installed: run `make .venv-mobile` (requirements-mobile.txt: litert-torch and "
    "ai-edge-litert in their own environment) or set LOUPE_MOBILE_PYTHON to a Python that has them."
)


class MobileExportError(ValueError):
    """The export cannot be made or failed its check; the message says why and what to do."""


def _is_detector(d: Path) -> bool:
    return (d / "detector.onnx").is_file() or (d / "detector_onnx.json").is_file()


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


def export_tflite(artifact_dir, *, check: bool = True) -> dict:
    """Convert artifact_dir/model.pt to model.tflite (+ model_tflite.json), put in place only after the check
    passed: CHECK_PHOTOS random inputs through the LiteRT interpreter and the reference (onnxruntime on
    model.onnx, else torch eager) agree on every output within tolerance and on every head's class. Returns
    {"path", "meta_path", "reference", "max_abs_diff", "photos_checked", "size_bytes", "seconds"}.
    MobileExportError for a detector, a missing converter or a failed check; FileNotFoundError / ValueError for
    a bad artifact (onnx_export.load_artifact)."""
    t0 = time.monotonic()
    d = Path(artifact_dir)
    if _is_detector(d):
        raise MobileExportError(
            "This is a detector (torchvision Faster R-CNN): litert-torch's torch.export cannot trace its "
            "data-dependent proposals and NMS. Its mobile path is detector.onnx on ONNX Runtime Mobile; the "
            "shelf's SKU classifier exports to TFLite from its own model page."
        )
    try:
        import litert_torch  # noqa: PLC0415
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415
    except ImportError as exc:
        raise MobileExportError(f"{UNAVAILABLE} ({exc})") from exc

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
    try:
        write_atomic(target, convert)
    except MobileExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - converter errors are long: the first lines, in one message
        text = " | ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())[:500]
        raise MobileExportError(f"TFLite conversion of {d / 'model.pt'} failed: {type(exc).__name__}: {text}") from exc
    ref_name = "onnxruntime (model.onnx)" if reference is not None else "torch eager (model.pt)"
    max_diff = max(stats.get("abs_diff", {}).values(), default=None) if check else None
    import litert_torch  # noqa: PLC0415

    meta = {
        "format": "loupe-tflite-v1",
        "file": TFLITE_FILE,
        "input": "images",
        "input_shape": [1, 3, size, size],
        "preprocess": preprocess_contract(size, ckpt["mean"], ckpt["std"]),
        "outputs": names,
        "signature": "serving_default (outputs output_0 .. output_N in the order of `outputs`)",
        "heads": ckpt["label_maps"],
        "reference": ref_name if check else None,
        "max_abs_diff": max_diff,
        "abs_diff": stats.get("abs_diff"),
        "photos_checked": CHECK_PHOTOS if check else 0,
        "atol": ATOL,
        "rtol": RTOL,
        "converter": f"litert-torch {getattr(litert_torch, '__version__', '?')}",
        "torch_version": str(torch.__version__),
        "convert_seconds": stats.get("convert_seconds"),
    }
    write_json_atomic(d / TFLITE_META_FILE, meta, indent=2)
    return {
        "path": str(target),
        "meta_path": str(d / TFLITE_META_FILE),
        "reference": meta["reference"],
        "max_abs_diff": max_diff,
        "photos_checked": meta["photos_checked"],
        "size_bytes": target.stat().st_size,
        "seconds": round(time.monotonic() - t0, 2),
    }


def main(argv: list[str]) -> int:
    """`python -m training.engine.tflite_export <artifact_dir> [--no-check]`: the result as one JSON line on
    stdout; exit 2 with {"error": ...} when the export is refused or fails."""
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1:
        print(json.dumps({"error": "usage: python -m training.engine.tflite_export <artifact_dir> [--no-check]"}))
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        result = export_tflite(args[0], check="--no-check" not in argv)
    except (MobileExportError, FileNotFoundError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
