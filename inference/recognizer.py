"""The Recognizer (pure Python, no Django): a trained model version loaded for inference (model.pt with torch, or
model.onnx with ONNX Runtime, plus its Faiss gallery index and calibration), its batched forward pass, gallery
search and the multi-view recognition with its per-head decisions (inference.decision.rejection_reason).

Public API::

    class ModelUnavailable(ValueError): code ("model_file_missing" | "model_file_corrupt"), problems
    class Recognizer:
        load(artifact_dir, *, device="cpu", num_threads=None) -> Recognizer   (classmethod; threads default 1;
            model.onnx alone serves when model.pt is missing or corrupt)
        heads: list[str]; label_maps: dict[str, list[str]]; version_dir: Path
        embedding_dim: int; image_size: int; index (faiss index or None); gallery_ids (np.ndarray or None)
        predict(images) -> (probs {head: (N, K) float32}, embeddings (N, D) float32, L2-normalised)
        search(embedding, k=5) -> [{"image_id", "score"}]
        recognize(images, *, thresholds=None, default_threshold=0.6, top_k=5, neighbours=5) -> dict
        recognize_each(images, *, thresholds=None, ..., mode="softmax") -> [dict]   (one object per photo)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from inference.calibration import K_NEIGHBOURS, apply_temperature, read_calibration, read_gallery_labels
from inference.decision import RetrievalEvidence, combine_views, fuse, rejection_reason, retrieval_evidence
from training.engine.artifact import IDS_FILE, INDEX_FILE
from training.engine.data import eval_transform, normalize_batch, resize_mode
from training.engine.hierarchy import decide
from training.engine.model import ARTIFACT_FORMAT, build_model

log = logging.getLogger(__name__)

RECOGNITION_MODES = ("softmax", "retrieval", "fusion")
VOTE_MIN_VIEWS = 3  # below this, combine="vote" falls back to "mean"
MODEL_FILE = "model.pt"
ONNX_FILE = "model.onnx"
PIXEL_INPUT = "pixels"


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def onnx_providers(device: torch.device, available: list[str]) -> list[str]:
    """ONNX Runtime's providers for a device: CUDA first on a CUDA device when this onnxruntime has it (the
    onnxruntime-gpu wheel), the CPU always as the fallback."""
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class ModelUnavailable(ValueError):
    """No file of a model version can be served. `code` names the problem for the API ("model_file_missing":
    neither model.pt nor model.onnx exists; "model_file_corrupt": what exists cannot be read), `problems` says
    what is wrong with each file ({file name: text})."""

    def __init__(self, message: str, *, code: str = "model_unavailable", problems: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.problems = problems or {}

    @classmethod
    def from_problems(cls, d: Path, problems: dict[str, _FileProblem]) -> ModelUnavailable:
        kinds = {p.kind for p in problems.values()}
        code = "model_file_missing" if kinds == {"missing"} else "model_file_corrupt"
        text = "; ".join(f"{name} {p}" for name, p in problems.items())
        return cls(f"{text} (in {d})", code=code, problems={name: str(p) for name, p in problems.items()})


class _FileProblem(Exception):
    """What is wrong with one artifact file: kind "missing" or "corrupt", and the words saying so."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_torch_model(path: Path):
    """(checkpoint dict, LoupeNet with its weights) from model.pt; _FileProblem when missing or unusable."""
    if not path.is_file():
        raise _FileProblem("missing", "is missing")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or pickled-with-code files
        raise _FileProblem("corrupt", f"cannot be read ({_short(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != ARTIFACT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _FileProblem("corrupt", f"is not a Loupe model (format {got!r}, expected {ARTIFACT_FORMAT!r})")
    try:
        model, _info = build_model(ckpt["config"], ckpt["heads"], load_weights=False)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        for key in ("label_maps", "mean", "std", "embedding_dim"):
            ckpt[key]  # noqa: B018 - KeyError for an incomplete checkpoint
    except Exception as exc:  # noqa: BLE001 - incomplete checkpoint, weights that do not fit the backbone
        raise _FileProblem("corrupt", f"is unusable ({_short(exc)})") from None
    return ckpt, model


class Recognizer:
    """A trained Loupe model version loaded for inference. Thread-safe for concurrent predict/recognize."""

    def __init__(
        self,
        model,
        *,
        config: dict,
        heads_meta: list[dict],
        label_maps: dict[str, list[str]],
        mean: Sequence[float],
        std: Sequence[float],
        embedding_dim: int,
        version_dir: Path,
        device: torch.device,
        index=None,
        gallery_ids: np.ndarray | None = None,
    ):
        self.model = model  # None when serving model.onnx without model.pt
        self.config = config
        self.heads_meta = heads_meta
        self.heads: list[str] = [h["name"] for h in heads_meta]
        self.label_maps = label_maps
        self.mean = list(mean)
        self.std = list(std)
        self.embedding_dim = int(embedding_dim)
        self.image_size = int(config["image_size"])
        self.version_dir = Path(version_dir)
        self.device = device
        self.index = index
        self.gallery_ids = gallery_ids
        self._transform = eval_transform(self.image_size, resize_mode(config))
        self.calibration: dict = {}  # calibration.json: temperatures, thresholds, retrieval rejection
        self.gallery_labels: dict[int, dict[str, str | None]] | None = None  # gallery id -> labels per head
        self._parent_index: dict[str, np.ndarray] = {}  # child head -> index of each class's parent class
        self.session = None  # an onnxruntime.InferenceSession when serving model.onnx
        self._onnx_outputs: list[str] = []
        self.backend = "torch"
        self.provider: str | None = None  # ONNX Runtime's execution provider when backend == "onnx"

    # -- loading
    @property
    def runtime(self) -> str:
        """What runs the model: "onnxruntime/CUDAExecutionProvider", "onnxruntime/CPUExecutionProvider" or
        "torch/cpu", "torch/cuda:0" (reported by the recognition endpoint and `manage.py recognize`)."""
        if self.backend == "onnx":
            return f"onnxruntime/{self.provider}"
        return f"torch/{self.device}"

    @classmethod
    def load(
        cls,
        artifact_dir,
        *,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        backend: str | None = None,
    ) -> Recognizer:
        """Read artifact_dir/model.pt (and index.faiss + gallery_ids.npy when present).

        When model.pt is missing or unusable but model.onnx is valid (backend "auto" or "onnx"), the version is
        served from model.onnx alone (logged as an error). When no file can be served, ModelUnavailable says
        what is wrong with each one.

        Torch's intra-op threads (process-wide) are set to num_threads, else $LOUPE_TORCH_THREADS, else 1:
        requests are small batches, and on a small shared CPU (a training worker next to the web server) one
        thread measured 6.5 ms per image against 100-230 ms with two (OpenMP spin-waiting on busy cores).
        Scale with more server processes/threads instead; pass num_threads=0 to keep torch's setting.

        backend ("auto" by default, or $LOUPE_INFERENCE_BACKEND): "auto" runs model.onnx with ONNX Runtime when
        the version has one (CUDA provider on a CUDA device when available) and falls back to torch otherwise
        (logged); "onnx" requires it; "torch" always runs the PyTorch model."""
        d = Path(artifact_dir)
        backend = backend or os.environ.get("LOUPE_INFERENCE_BACKEND") or "auto"
        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be 'auto', 'onnx' or 'torch', got {backend!r}")
        threads = num_threads if num_threads is not None else int(os.environ.get("LOUPE_TORCH_THREADS") or 1)
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        dev = _resolve_device(device)
        try:
            ckpt, model = _read_torch_model(d / MODEL_FILE)
        except _FileProblem as pt_problem:
            if backend == "torch":
                raise ModelUnavailable.from_problems(d, {MODEL_FILE: pt_problem}) from None
            try:  # model.pt is missing or unusable: serve model.onnx alone when it is valid
                rec = cls._load_onnx_only(d, device=dev, threads=threads)
            except _FileProblem as onnx_problem:
                raise ModelUnavailable.from_problems(d, {MODEL_FILE: pt_problem, ONNX_FILE: onnx_problem}) from None
            log.error("%s: %s %s; serving %s with ONNX Runtime", d, MODEL_FILE, pt_problem, ONNX_FILE)
            rec._load_index()
            return rec
        model.eval().to(dev)
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last)
        rec = cls(
            model,
            config=ckpt["config"],
            heads_meta=ckpt["heads"],
            label_maps=ckpt["label_maps"],
            mean=ckpt["mean"],
            std=ckpt["std"],
            embedding_dim=ckpt["embedding_dim"],
            version_dir=d,
            device=dev,
        )
        if backend != "torch":
            try:
                rec._load_onnx(threads=threads)
            except Exception as exc:  # noqa: BLE001 - torch serves when ONNX cannot
                if backend == "onnx":
                    raise
                log.warning("serving %s with torch: %s", d, exc)
        rec._load_index()
        return rec

    @classmethod
    def _load_onnx_only(cls, d: Path, *, device: torch.device, threads: int) -> Recognizer:
        """A Recognizer running d/model.onnx without model.pt: everything it needs (mean, std, image size, heads
        with their hierarchy, embedding size) is in the metadata the exporter embeds in the ONNX file. Raises
        _FileProblem saying what is wrong with model.onnx."""
        path = d / ONNX_FILE
        if not path.is_file():
            raise _FileProblem("missing", "is missing")
        try:
            import onnx  # noqa: PLC0415

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            meta = json.loads(props["loupe_meta"])
            classes = {h: list(c) for h, c in meta["heads"].items()}
            flat = [{"name": h, "classes": c, "parent": None} for h, c in classes.items()]
            heads_meta = meta.get("head_specs") or flat
            config = {"image_size": int(meta["image_size"]), "backbone": meta.get("backbone")}
            rec = cls(
                None,
                config=config,
                heads_meta=heads_meta,
                label_maps=classes,
                mean=meta["mean"],
                std=meta["std"],
                embedding_dim=int(meta["embedding_dim"]),
                version_dir=d,
                device=device,
            )
            rec._load_onnx(threads=threads)
        except Exception as exc:  # noqa: BLE001 - a truncated/foreign file, old metadata, a graph ORT refuses
            raise _FileProblem("corrupt", f"is unusable ({_short(exc)})") from None
        if "head_specs" not in meta:
            log.warning("%s predates head_specs in its metadata: child heads are decided without their parent", path)
        return rec

    def _load_onnx(self, *, threads: int) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        path = self.version_dir / ONNX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {ONNX_FILE} in {self.version_dir}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = onnx_providers(self.device, ort.get_available_providers())
        session = ort.InferenceSession(_with_pixel_input(path, self.mean, self.std), options, providers=providers)
        outputs = [o.name for o in session.get_outputs()]
        wanted = [f"probs_{h}" for h in self.heads] + ["embedding"]
        missing = [w for w in wanted if w not in outputs]
        if missing:
            raise ValueError(f"{path} lacks output(s) {missing}: re-export it (training.engine.onnx_export)")
        self.session, self._onnx_outputs, self.backend = session, wanted, "onnx"
        self.provider = session.get_providers()[0]
        if self.device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            log.warning(
                "serving %s on the CPU although the device is %s: this onnxruntime has no CUDA provider "
                "(install requirements-gpu.txt, or use the Dockerfile's gpu target)",
                self.version_dir,
                self.device,
            )

    def _load_index(self) -> None:
        self.calibration = read_calibration(self.version_dir) or {}
        self.gallery_labels = read_gallery_labels(self.version_dir)
        index_path = self.version_dir / INDEX_FILE
        if not index_path.is_file():
            self.index, self.gallery_ids = None, None
            return
        try:  # memory-mapped: several server processes share one copy of a large gallery through the page cache
            index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:  # index types without mmap support are read into memory
            index = faiss.read_index(str(index_path))
        if index.d != self.embedding_dim:
            raise ValueError(
                f"{index_path} has dimension {index.d} but the model's embeddings have {self.embedding_dim}: "
                "rebuild the index for this model version"
            )
        ids_path = self.version_dir / IDS_FILE
        ids = np.load(ids_path) if ids_path.is_file() else None
        if ids is not None and len(ids) != index.ntotal:
            log.warning("%s has %d ids but the index holds %d vectors", ids_path, len(ids), index.ntotal)
        self.index, self.gallery_ids = index, ids

    def reload_index(self) -> None:
        """Re-read index.faiss / gallery_ids.npy (after build_index on a loaded version)."""
        self._load_index()

    # -- inference
    def _batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        tensors = []
        for img in images:
            if not isinstance(img, Image.Image):
                raise TypeError(f"expected PIL images, got {type(img).__name__}")
            if img.mode != "RGB":
                img = img.convert("RGB")
            tensors.append(self._transform(img))
        return torch.stack(tensors)

    @torch.inference_mode()
    def _forward(self, x_uint8: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if self.session is not None:
            # uint8 NHWC straight in: the graph's prefix casts, transposes and normalises (see _with_pixel_input)
            *probs, emb = self.session.run(self._onnx_outputs, {PIXEL_INPUT: x_uint8.numpy()})
            return dict(zip(self.heads, probs, strict=True)), emb
        x = normalize_batch(x_uint8.to(self.device), self.mean, self.std)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        logits, feats = self.model(x)
        probs = {
            name: F.softmax(lg.float(), dim=1).cpu().numpy().astype(np.float32, copy=False)
            for name, lg in zip(self.heads, logits, strict=True)
        }
        emb = F.normalize(feats.float(), dim=1).cpu().numpy().astype(np.float32, copy=False)
        return probs, emb

    def predict(self, images: Sequence[Image.Image]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One batched forward pass (validation transform). Returns ({head: (N, K) float32 probabilities},
        (N, D) float32 L2-normalised embeddings)."""
        if len(images) == 0:
            raise ValueError("predict() needs at least one image")
        return self._forward(self._batch(images))

    def search(self, embedding: np.ndarray, k: int = 5) -> list[dict]:
        """Nearest gallery images of one (D,) embedding (renormalised): [{"image_id", "score"}], best first."""
        if self.index is None or self.index.ntotal == 0 or k <= 0:
            return []
        q = np.asarray(embedding, dtype=np.float32).reshape(1, -1).copy()
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0.0:
            return []
        q /= norm
        scores, ids = self.index.search(q, min(int(k), self.index.ntotal))
        return [{"image_id": int(i), "score": float(s)} for s, i in zip(scores[0], ids[0], strict=True) if i != -1]

    def recognize(
        self,
        images: Sequence[Image.Image],
        *,
        thresholds: dict[str, float] | None = None,
        default_threshold: float = 0.6,
        top_k: int = 5,
        neighbours: int = 5,
        combine: str = "mean",
        mode: str = "softmax",
        fusion_weight: float = 0.5,
    ) -> dict:
        """Recognise one object from N >= 1 views.

        Per head the views' probabilities (temperature-scaled when the version is calibrated) are combined by
        `combine` ("mean" = probability averaging, "vote" = majority vote of the views, "geometric"; "vote" with
        fewer than VOTE_MIN_VIEWS (3) photos is "mean": the answer's "combine" says which was used). `mode`:
        "softmax" (the classifier), "retrieval" (inverse-distance vote of the 20 nearest gallery photos of the
        mean embedding) or "fusion" (a convex combination, `fusion_weight` on the classifier). In retrieval and
        fusion modes a head is rejected when the nearest labelled gallery photo is farther than its calibrated
        max_distance ("too_far") or the vote margin between the first two classes is below min_margin
        ("ambiguous"). Child heads (model under make) are decided top-down, so they never contradict the parent.

        Returns {"heads": {head: {"label": str | None, "confidence", "threshold", "reason": None | "low_confidence"
        | "too_far" | "ambiguous" | "no_neighbours", "top_k": [...]}}, "neighbours": [{"image_id", "score"}],
        "unclassifiable": bool, "reason": "reshoot" | None, "mode": mode, "combine": the combine mode used}.
        "unclassifiable" is true when no head gives a label: the photos should be retaken."""
        if mode not in RECOGNITION_MODES:
            raise ValueError(f"mode must be one of {RECOGNITION_MODES}, got {mode!r}")
        if combine == "vote" and len(images) < VOTE_MIN_VIEWS:
            combine = "mean"  # one or two votes give a share of 1 (or 0.5): a confidence no threshold can use
        probs, emb = self.predict(images)
        return self._decide(
            probs,
            emb,
            thresholds=thresholds,
            default_threshold=default_threshold,
            top_k=top_k,
            neighbours=neighbours,
            combine=combine,
            mode=mode,
            fusion_weight=fusion_weight,
        )

    def recognize_each(
        self,
        images: Sequence[Image.Image],
        *,
        thresholds: dict[str, float] | None = None,
        default_threshold: float = 0.6,
        top_k: int = 5,
        mode: str = "softmax",
        fusion_weight: float = 0.5,
        batch_size: int = 64,
    ) -> list[dict]:
        """Recognise N separate objects, one photo each (the boxes of a shelf photo): batched forward passes of at
        most batch_size photos, then recognize's decision for each photo alone. Returns one recognize() answer per
        image (no neighbours)."""
        if mode not in RECOGNITION_MODES:
            raise ValueError(f"mode must be one of {RECOGNITION_MODES}, got {mode!r}")
        out: list[dict] = []
        for start in range(0, len(images), max(1, int(batch_size))):
            probs, emb = self.predict(images[start : start + batch_size])
            for i in range(len(emb)):
                out.append(
                    self._decide(
                        {h: p[i : i + 1] for h, p in probs.items()},
                        emb[i : i + 1],
                        thresholds=thresholds,
                        default_threshold=default_threshold,
                        top_k=top_k,
                        neighbours=0,
                        combine="mean",
                        mode=mode,
                        fusion_weight=fusion_weight,
                    )
                )
        return out

    def _decide(
        self,
        probs: dict[str, np.ndarray],
        emb: np.ndarray,
        *,
        thresholds: dict[str, float] | None,
        default_threshold: float,
        top_k: int,
        neighbours: int,
        combine: str,
        mode: str,
        fusion_weight: float,
    ) -> dict:
        """recognize's answer from the views' probabilities {head: (V, K)} and embeddings (V, D)."""
        thresholds = thresholds or {}
        temps = self.calibration.get("temperature", {})
        mean_probs = {
            name: combine_views(apply_temperature(probs[name], float(temps.get(name, 1.0))), mode=combine)
            for name in self.heads
        }
        k = neighbours if mode == "softmax" else max(neighbours, K_NEIGHBOURS)  # the classifier needs no search
        found = self.search(emb.mean(axis=0), k) if k > 0 else []
        evidence: dict[str, RetrievalEvidence] = {}  # retrieval and fusion modes: what the rejection rule reads
        if mode != "softmax":
            if self.gallery_labels is None:
                raise ValueError("this model version has no labelled gallery (index + gallery_labels.json)")
            for name in self.heads:
                nb = [n for n in found if n["image_id"] in self.gallery_labels][:K_NEIGHBOURS]
                ev = retrieval_evidence(
                    [self.gallery_labels[n["image_id"]].get(name) for n in nb], [n["score"] for n in nb]
                )
                classes = self.label_maps[name]
                r = np.array([ev.scores.get(c, 0.0) for c in classes], dtype=np.float64)
                if mode == "retrieval":
                    mean_probs[name] = r / r.sum() if r.sum() > 0 else np.full(len(classes), 1.0 / len(classes))
                else:
                    fused = fuse(
                        dict(zip(classes, map(float, mean_probs[name]), strict=True)), ev.scores, weight=fusion_weight
                    )
                    mean_probs[name] = np.array([fused.get(c, 0.0) for c in classes])
                evidence[name] = ev
        # child heads (model under make): consistent, top-down decisions; the training metrics use the same decide()
        q, pred = decide([mean_probs[n][None] for n in self.heads], self.heads_meta, self._parent_index)
        mean_probs = {n: q[i][0] for i, n in enumerate(self.heads)}
        choice = {n: int(pred[i][0]) for i, n in enumerate(self.heads)}
        parent_of_head = {
            m["name"]: m["parent"] for m in self.heads_meta if m.get("parent") in choice and m.get("class_parents")
        }
        heads_out = {}
        for name in self.heads:
            classes = self.label_maps[name]
            p = mean_probs[name]
            order = np.argsort(-p, kind="stable")[: max(1, min(int(top_k), len(classes)))]
            best = choice[name]
            conf = float(p[best]) if best >= 0 else 0.0
            thr = float(thresholds.get(name, default_threshold))
            cal = self.calibration.get("retrieval", {}).get(name) or {}
            reason = rejection_reason(
                evidence.get(name),
                confidence=conf if best >= 0 else -1.0,
                threshold=thr,
                max_distance=cal.get("max_distance"),
                min_margin=cal.get("min_margin"),
            )
            parent = parent_of_head.get(name)
            if reason is None and parent and heads_out.get(parent, {}).get("label") is None:
                reason = heads_out[parent]["reason"]  # a model is never given without its make
            heads_out[name] = {
                "label": classes[best] if reason is None else None,
                "confidence": conf,
                "threshold": thr,
                "reason": reason,
                "top_k": [{"label": classes[int(i)], "confidence": float(p[i])} for i in order],
            }
        unclassifiable = all(h["label"] is None for h in heads_out.values())
        return {
            "heads": heads_out,
            "neighbours": found[:neighbours],
            "unclassifiable": unclassifiable,
            "reason": "reshoot" if unclassifiable else None,
            "mode": mode,
            "combine": combine,
        }


def _with_pixel_input(path: Path, mean: Sequence[float], std: Sequence[float]) -> bytes:
    """model.onnx (float32 NCHW normalised `images` in, the exported contract) with a prefix that takes the
    decoded, resized photos as they are — uint8 NHWC `pixels` — and does normalize_batch's arithmetic inside the
    runtime: Cast -> Transpose -> (x - mean*255) * 1/(std*255). Serialized, for InferenceSession.

    Done per request in torch this costs ~0.3 ms of Python-level tensor ops on one 224 px photo (a tenth of the
    endpoint's overhead, bench/serving.py); in the graph it is one fused pass. The numbers are the same as
    training's (float32, same constants and order). The file on disk is not changed."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, compose, helper, numpy_helper  # noqa: PLC0415

    model = onnx.load(str(path))
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if inputs != ["images"]:
        raise ValueError(f"{path} has inputs {inputs}, expected ['images']: re-export it")
    mean255 = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
    inv_std255 = np.float32(1.0) / (np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0))
    size = None
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].HasField("dim_value"):
        size = int(dims[2].dim_value)
    pre = helper.make_graph(
        [
            helper.make_node("Cast", ["pixels"], ["pre_f"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["pre_f"], ["pre_t"], perm=[0, 3, 1, 2]),
            helper.make_node("Sub", ["pre_t", "pre_mean255"], ["pre_c"]),
            helper.make_node("Mul", ["pre_c", "pre_inv_std255"], ["pre_images"]),
        ],
        "loupe_pixels",
        [helper.make_tensor_value_info(PIXEL_INPUT, TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("pre_images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [numpy_helper.from_array(mean255, "pre_mean255"), numpy_helper.from_array(inv_std255, "pre_inv_std255")],
    )
    pre_model = helper.make_model(pre, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    merged = compose.merge_models(pre_model, model, io_map=[("pre_images", "images")])
    return merged.SerializeToString()
