"""The Detector (pure Python, no Django): a trained shelf detector (training.engine.detection) loaded for serving,
detector.onnx with ONNX Runtime when the version has one, else model.pt with torch; boxes of one photo out.

Public API::

    class Detection: x, y, w, h (pixels of the given image, top-left origin), label (container class), score
    class Detector:
        load(artifact_dir, *, device="cpu", num_threads=None, backend=None) -> Detector   (classmethod)
        classes: list[str]; score_threshold: float; runtime: str; version_dir: Path
        detect(image: PIL.Image.Image) -> [Detection], best score first, score >= score_threshold

Errors while loading are inference.recognizer.ModelUnavailable (code model_file_missing / model_file_corrupt), as for
a classifier, so the serving cache and the API report both the same way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.engine.detection import MODEL_FILE, ONNX_FILE, ONNX_META_FILE

from .recognizer import ModelUnavailable, _FileProblem, _resolve_device, _short, onnx_providers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    x: float
    y: float
    w: float
    h: float
    label: str
    score: float


def _pixels(image: Image.Image) -> np.ndarray:
    """The detector's input: float32 (3, H, W) RGB in [0, 1] (resized and normalised inside the model)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1) / 255.0)


class Detector:
    """A trained detector version loaded for inference. Thread-safe for concurrent detect calls."""

    def __init__(self, *, classes: list[str], score_threshold: float, version_dir: Path, device: torch.device):
        self.classes = list(classes)
        self.score_threshold = float(score_threshold)
        self.version_dir = version_dir
        self.device = device
        self.backend = "torch"
        self.provider: str | None = None
        self.session = None
        self.model = None
        self.agnostic_iou: float | None = None
        self.hflip = False  # the config's tta_hflip (torch backend)

    @property
    def runtime(self) -> str:
        if self.backend == "onnx":
            return f"onnxruntime/{self.provider}"
        return f"torch/{self.device}"

    @classmethod
    def load(
        cls, artifact_dir, *, device: str | torch.device = "cpu", num_threads: int | None = None, backend=None
    ) -> Detector:
        """Read artifact_dir/detector.onnx (+ detector_onnx.json) or model.pt. backend ("auto" by default, or
        $LOUPE_INFERENCE_BACKEND): "auto" prefers the ONNX file and falls back to torch (logged); "onnx" needs the
        ONNX file; "torch" always runs model.pt. Threads as Recognizer.load (default 1, $LOUPE_TORCH_THREADS).
        ModelUnavailable says what is wrong with each file when none can be served."""
        d = Path(artifact_dir)
        backend = backend or os.environ.get("LOUPE_INFERENCE_BACKEND") or "auto"
        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be 'auto', 'onnx' or 'torch', got {backend!r}")
        threads = num_threads if num_threads is not None else int(os.environ.get("LOUPE_TORCH_THREADS") or 1)
        dev = _resolve_device(device)
        problems: dict[str, _FileProblem] = {}
        if backend != "torch":
            try:
                return cls._load_onnx(d, device=dev, threads=threads)
            except _FileProblem as problem:
                problems[ONNX_FILE] = problem
                if backend == "onnx":
                    raise ModelUnavailable.from_problems(d, problems) from None
        try:
            det = cls._load_torch(d, device=dev, threads=threads)
        except _FileProblem as problem:
            problems[MODEL_FILE] = problem
            raise ModelUnavailable.from_problems(d, problems) from None
        if ONNX_FILE in problems:
            level = logging.WARNING if problems[ONNX_FILE].kind == "missing" else logging.ERROR
            log.log(level, "%s: %s %s; serving %s with torch", d, ONNX_FILE, problems[ONNX_FILE], MODEL_FILE)
        return det

    @classmethod
    def _load_onnx(cls, d: Path, *, device: torch.device, threads: int) -> Detector:
        path, meta_path = d / ONNX_FILE, d / ONNX_META_FILE
        if not path.is_file():
            raise _FileProblem("missing", "is missing")
        try:
            import onnxruntime as ort  # noqa: PLC0415

            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            det = cls(classes=meta["classes"], score_threshold=meta["score_threshold"], version_dir=d, device=device)
            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            providers = onnx_providers(device, ort.get_available_providers())
            det.session = ort.InferenceSession(str(path), options, providers=providers)
            det.provider = det.session.get_providers()[0]
            det.backend = "onnx"
        except Exception as exc:  # noqa: BLE001 - a truncated/foreign file, missing metadata, a graph ORT refuses
            raise _FileProblem("corrupt", f"is unusable ({_short(exc)})") from None
        return det

    @classmethod
    def _load_torch(cls, d: Path, *, device: torch.device, threads: int) -> Detector:
        from training.engine.detection import load_detector  # noqa: PLC0415

        if not (d / MODEL_FILE).is_file():
            raise _FileProblem("missing", "is missing")
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            model, ckpt = load_detector(d)
        except Exception as exc:  # noqa: BLE001 - not a detector, truncated, weights that do not fit
            raise _FileProblem("corrupt", f"is unusable ({_short(exc)})") from None
        det = cls(
            classes=ckpt["classes"], score_threshold=ckpt["config"]["score_threshold"], version_dir=d, device=device
        )
        det.model = model.to(device)
        det.agnostic_iou = ckpt["config"].get("agnostic_nms_iou")
        det.hflip = bool(ckpt["config"].get("tta_hflip"))  # the ONNX graph has it inside
        return det

    def detect(self, image: Image.Image) -> list[Detection]:
        """The containers in one photo: boxes in pixels of `image`, best score first, score >= score_threshold."""
        x = _pixels(image)
        if self.backend == "onnx":
            boxes, labels, scores = self.session.run(None, {"image": x})
        else:
            from training.engine.detection import predict_detector  # noqa: PLC0415

            out = predict_detector(
                self.model, [torch.from_numpy(x)], device=self.device, agnostic_iou=self.agnostic_iou, hflip=self.hflip
            )[0]
            boxes, labels, scores = out["boxes"].numpy(), out["labels"].numpy(), out["scores"].numpy()
        w, h = image.size
        found = []
        for (x0, y0, x1, y1), c, s in zip(boxes.tolist(), labels.tolist(), scores.tolist(), strict=True):
            if s < self.score_threshold:
                continue
            x0, y0 = max(0.0, x0), max(0.0, y0)
            x1, y1 = min(float(w), x1), min(float(h), y1)
            if x1 - x0 < 1 or y1 - y0 < 1 or not 0 <= c < len(self.classes):
                continue
            found.append(Detection(x0, y0, x1 - x0, y1 - y0, self.classes[int(c)], float(s)))
        found.sort(key=lambda d: -d.score)
        return found
