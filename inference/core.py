"""Loupe inference core (pure Python, no Django): safe image decoding, the Recognizer (classification heads +
embedding), gallery embedding and the Faiss index.

Public API::

    class ImageError(ValueError)
    decode_image(data: bytes, *, max_pixels=40_000_000, max_side_hint=None) -> PIL.Image.Image
    decoded_size(data: bytes, *, max_pixels=40_000_000, max_side_hint=None) -> (width, height)  (header only)
    class ModelUnavailable(ValueError): code ("model_file_missing" | "model_file_corrupt"), problems
    class Recognizer:
        load(artifact_dir, *, device="cpu", num_threads=None) -> Recognizer   (classmethod; threads default 1;
            model.onnx alone serves when model.pt is missing or corrupt)
        heads: list[str]; label_maps: dict[str, list[str]]; version_dir: Path
        embedding_dim: int; image_size: int; index (faiss index or None); gallery_ids (np.ndarray or None)
        predict(images) -> (probs {head: (N, K) float32}, embeddings (N, D) float32, L2-normalised)
        recognize(images, *, thresholds=None, default_threshold=0.6, top_k=5, neighbours=5) -> dict
    embed_paths(recognizer, paths, batch_size=64) -> (embeddings (N, D) float32, ok (N,) bool)
    build_index(artifact_dir, embeddings, ids) -> Path   (index.faiss + gallery_ids.npy, atomically)
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from inference.calibration import K_NEIGHBOURS, apply_temperature, read_calibration, read_gallery_labels
from inference.decision import RetrievalEvidence, combine_views, fuse, rejection_reason, retrieval_evidence
from training.engine.artifact import IDS_FILE, INDEX_FILE, INDEX_META_FILE, read_artifact_json
from training.engine.atomic import write_atomic, write_json_atomic
from training.engine.data import draft_size, eval_transform, load_image_file, normalize_batch, to_rgb
from training.engine.hierarchy import consistent, decode, parent_index
from training.engine.model import ARTIFACT_FORMAT, build_model

log = logging.getLogger("inference.core")

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
RECOGNITION_MODES = ("softmax", "retrieval", "fusion")
VOTE_MIN_VIEWS = 3  # below this, combine="vote" falls back to "mean"
MODEL_FILE = "model.pt"
ONNX_FILE = "model.onnx"


class ImageError(ValueError):
    """The uploaded bytes are not a usable image; the message says why in words a person can act on."""


# ------------------------------------------------------------------------------------------ decoding
def _sniff(data: bytes) -> str:
    head = bytes(data[:32])
    if head.startswith(b"GIF8"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
            return "HEIC/HEIF (e.g. an iPhone photo: export or share it as JPEG)"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return f"an ISO media file ({brand.decode('latin-1')!r})"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"\xff\xd8"):
        return "a damaged JPEG"
    if head.startswith(b"\x89PNG"):
        return "a damaged PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a damaged WebP"
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{", b"["):
        return "text (HTML/XML/SVG/JSON), not a picture"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"text starting with {head[:16].decode('ascii')!r}"
    return f"unrecognised data starting with 0x{head[:8].hex()}"


def sniff_media_type(data: bytes) -> str | None:
    """image/jpeg, image/png or image/webp from the file's magic bytes; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _sniff_ext(data: bytes) -> str:
    """The file extension for stored photo bytes (.jpg, .png, .webp; .bin when unknown)."""
    return {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}.get(sniff_media_type(data), ".bin")


def _open_image(data: bytes, *, max_pixels: int, max_side_hint: int | None) -> Image.Image:
    """Open (header only) and check the bytes; JPEGs get their reduced decoding scale (draft) set, so img.size is
    the size that load() will decode. The caller closes the image."""
    if data is None or len(data) == 0:
        raise ImageError("image is empty (0 bytes)")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise ImageError(f"image is not a JPEG/PNG/WebP (got {_sniff(data)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels to process safely ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any parser error is a bad upload
        raise ImageError(
            f"image is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc}); upload the complete file"
        ) from None
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"image has an invalid size {w}x{h}")
        if w * h > max_pixels:
            raise ImageError(
                f"image is too large: {w}x{h} = {w * h / 1e6:.1f} megapixels, the limit is "
                f"{max_pixels / 1e6:g} megapixels; resize it and try again"
            )
        if max_side_hint and img.format == "JPEG":
            img.draft("RGB", (int(max_side_hint), int(max_side_hint)))
    except BaseException:
        img.close()
        raise
    return img


def decoded_size(data: bytes, *, max_pixels: int = 40_000_000, max_side_hint: int | None = None) -> tuple[int, int]:
    """(width, height) that decode_image(data, same arguments) decodes, read from the header without decoding:
    the full size for PNG and WebP (their decoders cannot scale), the draft scale for JPEG. Raises ImageError
    like decode_image for data that is not a usable image. For a request-wide pixel budget."""
    img = _open_image(data, max_pixels=max_pixels, max_side_hint=max_side_hint)
    try:
        return img.size
    finally:
        img.close()


def _reduce_factor(size: tuple[int, int], min_side: int) -> int:
    """The largest integer factor that keeps both sides >= min_side (1: no reduction)."""
    return max(1, min(size) // max(1, int(min_side)))


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, max_side_hint: int | None = None) -> Image.Image:
    """Validate and decode uploaded bytes into an RGB PIL image (EXIF orientation applied, transparency
    composited onto white).

    Raises ImageError for: empty data, data that is not a JPEG/PNG/WebP, more than `max_pixels` pixels (checked
    from the header, before decoding), and truncated/corrupt files (the image is fully loaded; truncated
    images are never accepted). With `max_side_hint`, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8)
    that keeps both sides >= max_side_hint: pass the model's input size for fast, low-memory decoding. PNG and
    WebP cannot be decoded at a reduced scale; they are box-reduced by the largest integer factor that keeps
    both sides >= max_side_hint right after decoding, so only one full-size copy exists, briefly."""
    img = _open_image(data, max_pixels=max_pixels, max_side_hint=max_side_hint)
    try:
        w, h = img.size
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - truncated data, broken chunks, decoder errors
            raise ImageError(
                f"image is truncated or corrupt: the {img.format} {w}x{h} data cannot be fully decoded "
                f"({type(exc).__name__}: {exc}); upload the complete file"
            ) from None
        factor = _reduce_factor(img.size, max_side_hint) if max_side_hint else 1
        if factor > 1 and img.format != "JPEG":
            if img.mode not in ("RGB", "RGBA", "L", "LA"):  # P, 1, I;16...: Pillow cannot box-reduce these
                return to_rgb(img).reduce(factor)
            small = img.reduce(factor)
            small.info = dict(img.info)  # the EXIF orientation, for to_rgb
            return to_rgb(small)
        return to_rgb(img)
    finally:
        img.close()


# ---------------------------------------------------------------------------------------- recognizer
def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
        self._transform = eval_transform(self.image_size)
        self.calibration: dict = {}  # calibration.json: temperatures, thresholds, retrieval rejection
        self.gallery_labels: dict[int, dict[str, str | None]] | None = None  # gallery id -> labels per head
        self._parent_index: dict[str, np.ndarray] = {}  # child head -> index of each class's parent class
        self.session = None  # an onnxruntime.InferenceSession when serving model.onnx
        self._onnx_outputs: list[str] = []
        self.backend = "torch"

    # -- loading
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
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(_with_pixel_input(path, self.mean, self.std), options, providers=providers)
        outputs = [o.name for o in session.get_outputs()]
        wanted = [f"probs_{h}" for h in self.heads] + ["embedding"]
        missing = [w for w in wanted if w not in outputs]
        if missing:
            raise ValueError(f"{path} lacks output(s) {missing}: re-export it (training.engine.onnx_export)")
        self.session, self._onnx_outputs, self.backend = session, wanted, "onnx"

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
        choice = {name: int(np.argmax(p)) for name, p in mean_probs.items()}
        parent_of_head: dict[str, str] = {}
        for meta in self.heads_meta:  # child heads (model under make): consistent, top-down decisions
            parent = meta.get("parent")
            if parent and meta.get("class_parents") and parent in mean_probs:
                cp = self._parent_index.get(meta["name"])
                if cp is None:  # fixed per version: built once (a Python loop over the classes)
                    cp = parent_index(meta["classes"], self.label_maps[parent], meta["class_parents"])
                    self._parent_index[meta["name"]] = cp
                q_parent, q_child = consistent(mean_probs[parent], mean_probs[meta["name"]], cp)
                mean_probs[parent], mean_probs[meta["name"]] = q_parent, q_child
                choice[parent], choice[meta["name"]] = decode(q_parent, q_child, cp)
                parent_of_head[meta["name"]] = parent
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


PIXEL_INPUT = "pixels"


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


# ------------------------------------------------------------------------------------ gallery / index


def predict_paths(
    recognizer: Recognizer, paths: Sequence[str], batch_size: int = 64
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Run image files through the model (reduced-size JPEG decode, validation transform).

    Returns ({head: (N, K) float32 probabilities}, embeddings (N, D) float32, ok (N,) bool). A file that cannot
    be read does not raise: its rows are all zeros, ok[i] is False and a warning naming the file is logged."""
    n = len(paths)
    out = np.zeros((n, recognizer.embedding_dim), dtype=np.float32)
    probs = {h: np.zeros((n, len(recognizer.label_maps[h])), dtype=np.float32) for h in recognizer.heads}
    ok = np.zeros(n, dtype=bool)
    if n == 0:
        return probs, out, ok
    tf = recognizer._transform
    min_side = draft_size(recognizer.image_size)

    def load(path: str):
        try:
            return tf(load_image_file(path, min_side))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            log.warning("cannot read %s: %s: %s", path, type(exc).__name__, exc)
            return None

    workers = max(1, min(4, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes/resizes without holding the GIL
        for start in range(0, n, batch_size):
            chunk = list(pool.map(load, paths[start : start + batch_size]))
            good = [i for i, t in enumerate(chunk) if t is not None]
            if not good:
                continue
            p, emb = recognizer._forward(torch.stack([chunk[i] for i in good]))
            rows = np.asarray(good) + start
            out[rows] = emb
            for h in recognizer.heads:
                probs[h][rows] = p[h]
            ok[rows] = True
    return probs, out, ok


def predict_items_cached(
    recognizer: Recognizer, items: Sequence[dict], cache_dir
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """predict_paths for items ({"path"[, "sha256"]}) through the feature cache (training.engine.features) keyed by
    this model's own backbone weights: only photos not seen by this backbone go through it; the heads run on the
    cached features. Same outputs as predict_paths with the torch backend; falls back to predict_paths when the
    version is served from model.onnx alone."""
    from training.engine.features import cached_features  # noqa: PLC0415

    if recognizer.model is None:
        return predict_paths(recognizer, [it["path"] for it in items])
    n = len(items)
    probs = {h: np.zeros((n, len(recognizer.label_maps[h])), dtype=np.float32) for h in recognizer.heads}
    out = np.zeros((n, recognizer.embedding_dim), dtype=np.float32)
    if n == 0:
        return probs, out, np.zeros(0, dtype=bool)
    model = recognizer.model
    config = {**recognizer.config, "device": str(recognizer.device)}
    feats = cached_features(items, config, cache_dir, backbone=model.backbone, mean=recognizer.mean, std=recognizer.std)
    rows = np.flatnonzero(feats.ok)
    with torch.inference_mode():
        for start in range(0, len(rows), 4096):
            chunk = rows[start : start + 4096]
            logits, emb = model.heads_forward(torch.from_numpy(feats.X[chunk]).to(recognizer.device))
            for h, lg in zip(recognizer.heads, logits, strict=True):
                probs[h][chunk] = F.softmax(lg.float(), dim=1).cpu().numpy()
            out[chunk] = F.normalize(emb.float(), dim=1).cpu().numpy()
    return probs, out, feats.ok


def embed_paths(recognizer: Recognizer, paths: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Embed image files: (embeddings (N, D) float32, ok (N,) bool); see predict_paths."""
    _probs, emb, ok = predict_paths(recognizer, paths, batch_size)
    return emb, ok


def split_accuracy(recognizer: Recognizer, items: Sequence[dict], predicted=None) -> dict:
    """Top-1/top-5 per head of the model on manifest items ({"path", "labels": {head: class or None}}) as
    {"heads": {head: {"top1", "top5", "n"}}, "n", "unreadable"}; unknown labels, or classes the model does not
    know, are not counted. `predicted`: predict_paths' answer for these items when the caller already has it."""
    probs, _emb, ok = predicted if predicted is not None else predict_paths(recognizer, [it["path"] for it in items])
    out: dict[str, dict] = {}
    for h in recognizer.heads:
        index = {c: i for i, c in enumerate(recognizer.label_maps[h])}
        rows = [(r, index[it["labels"].get(h)]) for r, it in enumerate(items) if ok[r] and it["labels"].get(h) in index]
        if not rows:
            out[h] = {"top1": None, "top5": None, "n": 0}
            continue
        r_idx = np.array([r for r, _ in rows])
        y = np.array([c for _, c in rows])
        p = probs[h][r_idx]
        k = min(5, p.shape[1])
        topk = np.argsort(-p, axis=1)[:, :k]
        out[h] = {
            "top1": float((topk[:, 0] == y).mean()),
            "top5": float((topk == y[:, None]).any(axis=1).mean()),
            "n": len(rows),
        }
    return {"heads": out, "n": len(items), "unreadable": int((~ok).sum())}


FLAT_MAX = 50_000  # exact search below this gallery size; approximate (IVF, tuned nprobe) above
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
RECALL_TARGET = 0.95  # approximate indexes are tuned to find >= 95 % of the exact 20 nearest neighbours


def choose_index_kind(n: int, kind: str = "auto", *, flat_max: int = FLAT_MAX) -> str:
    """ "flat" (exact) for galleries below flat_max vectors, "ivf" above: inverted lists whose nprobe is tuned
    at build time to the recall target; it builds 1M x 512-d in about a minute on 2 cores where HNSW takes
    ~10x longer (bench/faiss_index.py). An explicit kind is kept ("hnsw": no training, on request)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    return "flat" if n < flat_max else "ivf"


def _make_index(emb: np.ndarray, kind: str):
    d = emb.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 200
        inner.hnsw.efSearch = 128
        return inner
    nlist = max(1, min(int(4 * np.sqrt(len(emb))), len(emb) // 39 or 1))  # faiss wants >= 39 points per list
    quantizer = faiss.IndexFlatIP(d)
    inner = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = emb[rng.choice(len(emb), size=min(len(emb), nlist * 64), replace=False)]
    inner.train(sample)
    inner.nprobe = min(nlist, 8)
    return inner


def tune_nprobe(
    index,
    emb: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    k: int = 20,
    target: float = RECALL_TARGET,
    n_queries: int = 256,
    seed: int = 0,
) -> tuple[int, float]:
    """Set the smallest nprobe (1, 2, 4, ... nlist) of an IVF index (or an IndexIDMap2 over one) whose recall@k
    on gallery vectors used as queries, each query's own vector left out, reaches `target` against exact
    search. `emb` are the indexed vectors and `ids` their ids in the index (default 0..n-1). Returns
    (nprobe, recall at that nprobe)."""
    ivf = faiss.extract_index_ivf(index)
    n = len(emb)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    qi = rng.choice(n, size=min(n, n_queries), replace=False)
    q = np.ascontiguousarray(emb[qi])
    kk = min(k + 1, n)
    _, exact = faiss.knn(q, emb, kk, metric=faiss.METRIC_INNER_PRODUCT)
    own = ids[qi]
    truth = []  # per query: its k exact nearest neighbours besides its own vector
    for row, o in zip(exact, own, strict=True):
        ranked = [int(j) for j in ids[row[row >= 0]] if j != o]
        truth.append(set(ranked[:k]))
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(q, kk)
        hits = [len(t & set(row.tolist())) / len(t) for t, row in zip(truth, found, strict=True) if t]
        recall = float(np.mean(hits)) if hits else 1.0
        if recall >= target or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(ivf.nlist, nprobe * 2)


def build_index(
    artifact_dir, embeddings: np.ndarray, ids: np.ndarray, *, kind: str = "auto", flat_max: int = FLAT_MAX
) -> Path:
    """Write artifact_dir/index.faiss (an IndexIDMap2 — vector ids are database ids — over an inner-product
    index on L2-normalised vectors, i.e. cosine similarity; vectors are renormalised here) and gallery_ids.npy,
    each via a temp file + os.replace, so a loaded index is never half-written. The inner index is exact (flat)
    below `flat_max` vectors and HNSW above (`kind` overrides: "flat", "hnsw", "ivf"). Returns the index path.
    An empty gallery gives an empty (valid) index."""
    d = Path(artifact_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"artifact folder {d} does not exist")
    emb = np.asarray(embeddings, dtype=np.float32)
    ids = np.asarray(ids)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D), got shape {emb.shape}")
    if ids.ndim != 1 or len(ids) != emb.shape[0]:
        raise ValueError(f"ids must be a 1-D array with one id per embedding ({emb.shape[0]}), got {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values")
    emb = np.ascontiguousarray(emb.copy())
    ids = np.ascontiguousarray(ids.astype(np.int64))
    if len(emb):
        faiss.normalize_L2(emb)
    chosen = choose_index_kind(len(emb), kind, flat_max=flat_max) if len(emb) else "flat"
    started = time.perf_counter()
    index = faiss.IndexIDMap2(_make_index(emb, chosen))
    meta: dict = {"kind": chosen, "size": len(emb), "dim": int(emb.shape[1])}
    if len(emb):
        index.add_with_ids(emb, ids)
    if chosen == "ivf" and len(emb):
        nprobe, recall = tune_nprobe(index, emb, ids)
        meta |= {"nlist": int(faiss.extract_index_ivf(index).nlist), "nprobe": nprobe, "recall_at_20": recall}
    meta["build_seconds"] = round(time.perf_counter() - started, 2)
    index_path = d / INDEX_FILE

    def write_ids(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, ids)

    write_atomic(d / IDS_FILE, write_ids)
    write_atomic(index_path, lambda tmp: faiss.write_index(index, str(tmp)))
    write_json_atomic(d / INDEX_META_FILE, meta, indent=2)
    return index_path


def read_index_meta(artifact_dir) -> dict | None:
    """index.json written by build_index: kind, size, dim, build_seconds (+ nlist, nprobe, recall_at_20 for IVF)."""
    return read_artifact_json(artifact_dir, INDEX_META_FILE)
