"""Export a trained Loupe model (artifact_dir/model.pt) to ONNX, with an onnxruntime parity check (no Django).

Public API::

    export_onnx(artifact_dir, *, opset=17, out_name="model.onnx", check=True, atol=1e-3, rtol=1e-3,
                exporter="auto") -> dict
        -> {"path", "meta_path", "exporter", "opset", "max_abs_diff", "max_rel_diff", "top1_agreement", "atol",
            "rtol", "outputs", "seconds"}
    meta_name(out_name) -> str                     # onnx_meta.json for model.onnx, else "<stem>.meta.json"
    load_artifact(artifact_dir) -> (LoupeNet in eval mode, checkpoint dict)

Written beside model.pt (each to a temp name, then os.replace; model.onnx only after it passed the check):
model.onnx and onnx_meta.json (for another out_name: "<stem>.meta.json") with {"input", "input_shape", "mean",
"std", "outputs", "heads", "head_specs", "opset", "exporter", "torch_version", "max_abs_diff", "max_rel_diff",
"top1_agreement", "preprocess", ...}. "head_specs" (each head's classes, parent and class_parents) lets inference
serve model.onnx alone when model.pt is lost. The same
metadata is stored in the ONNX file's metadata_props under "loupe_meta" (onnxruntime:
session.get_modelmeta().custom_metadata_map["loupe_meta"]).

Graph contract
--------------
Input ``images``: float32, NCHW, shape (batch, 3, S, S), S = the model's config["image_size"] (fixed), batch
dynamic. The pixels must be prepared exactly like inference (training.engine.data.eval_transform +
normalize_batch):

1. decode to RGB (EXIF orientation applied, transparency composited onto white: training.engine.data.to_rgb);
2. resize (bicubic, antialiased, PIL) so that the SHORTER side is ceil(S * 1.14), keeping the aspect ratio
   (longer side = int(ceil(S * 1.14) * long / short));
3. centre-crop S x S (top = round((h - S) / 2), left = round((w - S) / 2));
   a model trained with config resize "fit" (onnx_meta.json["preprocess"]["resize"]) instead scales the whole
   photo so that its LONGER side is S and pads it to S x S, centred, with the grey of ``pad_fill_rgb`` (PIL's
   ImageOps.pad) — steps 2-3 become that one step;
4. to float32, divide by 255, subtract the artifact's per-channel ``mean`` and divide by its ``std``
   (RGB order, both listed in onnx_meta.json), then HWC -> CHW and stack into a batch.

Outputs (all with the dynamic batch axis first), in this order: ``logits_<head>`` (batch, K_head) for every head
in manifest order, then ``probs_<head>`` (softmax of the logits), then ``embedding`` (batch, D): the
L2-normalised pooled backbone features, i.e. exactly what inference.recognizer.Recognizer.predict returns (probs and
embeddings) and what the Faiss gallery index holds. Class names of head h: onnx_meta.json["heads"][h] (index i of
probs_h is class heads[h][i]).

Exporter choice (measured on torch 2.14 / onnxscript 0.7.2 / onnxruntime 1.32, CPU)
------------------------------------------------------------------------------------
Both the dynamo (torch.export) exporter and the legacy TorchScript exporter export timm backbones correctly
(test_resnet, mobilenetv3_small_100, resnet18, efficientnet_b0, convnext_atto, vit_tiny_patch16_224: max abs
difference to eager 1e-7 .. 2.5e-6 at batch 1/3/5, dynamic batch). But the dynamo exporter has no
implementations below opset 18: asked for 17 it exports opset 18, fails the down-conversion (ReduceMean axes)
and silently keeps 18. So ``exporter="auto"`` uses TorchScript when opset < 18 (exact opset, ~10x faster to
export) and dynamo when opset >= 18; if the first one fails (export error, invalid graph or failed parity) the
other one is tried, and the result records which one produced the file and the opset actually written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_json_atomic
from .data import EVAL_RESIZE_RATIO, PAD_FILL, draft_size, resize_mode
from .model import ARTIFACT_FORMAT, LoupeNet, build_model

log = logging.getLogger("training.engine")

MODEL_FILE = "model.pt"
META_FILE = "onnx_meta.json"
INPUT_NAME = "images"
BATCH_AXIS = "batch"
EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest implemented opset (torch 2.14)
CHECK_BATCHES = (3, 1)  # batch sizes of the parity check (2 is the export's example batch)
# Parity tolerance (np.allclose style, scaled): |onnx - torch| <= ATOL * max(1, max|torch output|) + RTOL * |torch|.
# float32 through a deep network reorders sums differently in onnxruntime and torch: real timm models differ by up
# to ~1e-3 on logits of magnitude ~10 (relative ~1e-4), which a fixed 1e-4 refused for half of them.
ATOL = 1e-3
RTOL = 1e-3


# ------------------------------------------------------------------------------------------------- loading
def load_artifact(artifact_dir: str | Path) -> tuple[LoupeNet, dict]:
    """Read artifact_dir/model.pt (weights_only) and rebuild the LoupeNet exactly like
    inference.recognizer.Recognizer.load does (build_model(config, heads, load_weights=False) + strict
    load_state_dict), on the CPU, in eval mode. Returns (model, checkpoint dict).

    Raises FileNotFoundError (missing model.pt) or ValueError (not a Loupe model / does not match its config).
    Recognizer.load inlines the same steps; it could call this instead."""
    d = Path(artifact_dir)
    path = d / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {d} ({path} does not exist): is this a finished training run?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated / foreign / pickled-with-code files
        raise ValueError(f"{path} cannot be read as a Loupe model ({_shorten(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != ARTIFACT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a Loupe model (format {got!r}, expected {ARTIFACT_FORMAT!r})")
    missing = [k for k in ("config", "heads", "label_maps", "state_dict", "mean", "std") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is an incomplete Loupe model (missing {', '.join(missing)})")
    model, _info = build_model(ckpt["config"], ckpt["heads"], load_weights=False)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: weights do not match backbone {ckpt['config'].get('backbone')!r} ({_shorten(exc)})"
        ) from exc
    return model.eval(), ckpt


# ------------------------------------------------------------------------------------------------- graph
class OnnxLoupe(nn.Module):
    """images (N, 3, S, S) normalised float32 -> (logits per head..., probs per head..., embedding)."""

    def __init__(self, model: LoupeNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, feats = self.model(images)
        logits = [lg.float() for lg in logits]
        probs = [F.softmax(lg, dim=1) for lg in logits]
        return (*logits, *probs, LoupeNet.embed(feats))


def output_names(head_names: list[str]) -> list[str]:
    return [f"logits_{h}" for h in head_names] + [f"probs_{h}" for h in head_names] + ["embedding"]


def preprocess_contract(image_size: int, mean, std, resize: str = "crop") -> dict:
    """The input contract of the exported graph, as data (also in onnx_meta.json["preprocess"])."""
    if resize == "fit":
        geometry = {
            "resize": "fit",
            "fit_longer_side_to": image_size,
            "pad_to": [image_size, image_size],
            "pad_fill_rgb": list(PAD_FILL),
        }
    else:
        geometry = {
            "resize": "crop",
            "resize_shorter_side_to": draft_size(image_size),
            "resize_ratio": EVAL_RESIZE_RATIO,
            "center_crop": [image_size, image_size],
        }
    return {
        "color": "RGB",
        **geometry,
        "interpolation": "bicubic (PIL, antialiased)",
        "scale": "divide by 255",
        "normalize": "(x / 255 - mean) / std per RGB channel",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "layout": "NCHW",
        "dtype": "float32",
    }


# ------------------------------------------------------------------------------------------------- export
def _shorten(exc: BaseException, limit: int = 600) -> str:
    """First informative lines of an (often huge) exporter error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " | ".join(lines[:4]) or "(no message)"
    text = re.sub(r"\s+", " ", f"{type(exc).__name__}: {text}")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, names: list[str]) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning and tracer warnings
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            dynamic_axes={n: {0: BATCH_AXIS} for n in [INPUT_NAME, *names]},
            do_constant_folding=True,
        )


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, names: list[str]) -> None:
    if opset < DYNAMO_MIN_OPSET:
        log.info("the dynamo ONNX exporter needs opset >= %d; exporting opset %d", DYNAMO_MIN_OPSET, DYNAMO_MIN_OPSET)
        opset = DYNAMO_MIN_OPSET
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            dynamic_shapes={INPUT_NAME: {0: batch}},
            external_data=False,
            verbose=False,
        )


_EXPORT_FUNCS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _finish_onnx(path: Path, names: list[str], meta: dict) -> int:
    """Validate the written graph (checker, names) and embed `meta`; returns the opset actually written."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ins = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outs = [o.name for o in model.graph.output]
    if ins != [INPUT_NAME] or outs != names:
        raise ValueError(f"exported graph has inputs {ins} and outputs {outs}, expected [{INPUT_NAME!r}] and {names}")
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "loupe_meta", json.dumps({**meta, "opset": opset})
    onnx.save(model, str(path))
    return opset


def _reference(wrapper: nn.Module, x: torch.Tensor) -> list:
    with torch.no_grad():
        return [t.float().numpy() for t in wrapper(x)]


def _parity(
    path: Path, wrapper: nn.Module, names: list[str], image_size: int, atol: float, rtol: float
) -> dict[str, dict[str, float]]:
    """Compare onnxruntime (CPU) with torch eager over random batches of CHECK_BATCHES sizes.

    Every output must satisfy |onnx - torch| <= atol * scale + rtol * |torch| elementwise, scale = max(1, max
    |torch output|) (float32 error grows with the magnitude of the values), and for every head the predicted
    class (arg-max of probs_<head>) must be the same on every row, except on rows where torch's top two classes
    are within atol of each other (a tie either runtime may break). ValueError naming the first output or head
    that fails. Returns {"abs": {output: max abs diff}, "rel": {output: max abs diff / scale}, "top1":
    {"agree": rows with the same predicted class, "rows": rows compared}}."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    abs_diffs = dict.fromkeys(names, 0.0)
    rel_diffs = dict.fromkeys(names, 0.0)
    agree = rows = 0
    for b in CHECK_BATCHES:
        x = torch.randn(b, 3, image_size, image_size, generator=gen)
        ref = _reference(wrapper, x)
        got = sess.run(names, {INPUT_NAME: x.numpy()})
        for name, r, g in zip(names, ref, got, strict=True):
            if g.shape != r.shape:
                raise ValueError(f"ONNX output {name!r} has shape {list(g.shape)} at batch {b}, torch {list(r.shape)}")
            if not name.startswith("probs_") or not r.size:
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            top_r, top_g = r64.argmax(axis=1), g64.argmax(axis=1)
            ordered = np.sort(r64, axis=1)
            gap = ordered[:, -1] - ordered[:, -2] if r.shape[1] > 1 else np.full(len(r), np.inf)
            same = top_r == top_g
            agree, rows = agree + int(same.sum()), rows + len(same)
            flipped = np.flatnonzero(~same & (gap > atol))
            if len(flipped):
                i = int(flipped[0])
                raise ValueError(
                    f"ONNX predicts a different class than torch for head {name[6:]!r} (row {i} of batch {b}: class "
                    f"{int(top_g[i])} vs {int(top_r[i])}, torch's margin {gap[i]:.3g}): the export is not faithful"
                )
        for name, r, g in zip(names, ref, got, strict=True):
            if not r.size:
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            diff = np.abs(g64 - r64)
            scale = max(1.0, float(np.max(np.abs(r64))))
            d = float(diff.max())
            bound = atol * scale + rtol * np.abs(r64)
            if not np.isfinite(d) or (diff > bound).any():
                raise ValueError(
                    f"ONNX output {name!r} differs from torch by {d:.3g} (max abs, batch {b}; values up to "
                    f"{scale:.3g}), more than the tolerance atol={atol:g} x {scale:.3g} + rtol={rtol:g} x |torch|"
                )
            abs_diffs[name] = max(abs_diffs[name], d)
            rel_diffs[name] = max(rel_diffs[name], d / scale)
    return {"abs": abs_diffs, "rel": rel_diffs, "top1": {"agree": agree, "rows": rows}}


def _tmp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the artifacts are read by other processes (web, workers)
    return Path(tmp)


def _write_json_atomic(path: Path, data) -> None:
    write_json_atomic(path, data, indent=2)


def meta_name(out_name: str) -> str:
    """onnx_meta.json for the default model.onnx, else "<stem>.meta.json" (model_fp16.onnx -> model_fp16.meta.json)."""
    return META_FILE if out_name == "model.onnx" else f"{Path(out_name).stem}.meta.json"


def export_onnx(
    artifact_dir: str | Path,
    *,
    opset: int = 17,
    out_name: str = "model.onnx",
    check: bool = True,
    atol: float = ATOL,
    rtol: float = RTOL,
    exporter: str = "auto",
) -> dict:
    """Export artifact_dir/model.pt to artifact_dir/<out_name> (+ onnx_meta.json); see the module docstring for
    the graph's input contract and outputs.

    exporter: "auto" (TorchScript for opset < 18, dynamo otherwise, the other one as fallback), "dynamo" (always
    opset >= 18) or "torchscript". With `check`, onnxruntime (CPU) is compared with torch eager (eval, float32)
    on random batches of 3 and 1: every output must be within atol * max(1, its magnitude) + rtol * |torch| and
    every head must predict the same class (see _parity), or ValueError is raised naming the output; the file is
    only put in place after the check passed.

    The metadata goes to onnx_meta.json (for another out_name: meta_name(out_name), so it never describes
    another file). Returns {"path", "meta_path", "exporter", "opset", "max_abs_diff", "max_rel_diff" (max abs
    difference / the output's magnitude), "top1_agreement" (share of check rows whose predicted class is the
    same; all three None without check), "atol", "rtol", "outputs", "seconds"}. Raises FileNotFoundError for a
    missing model.pt, ValueError for a bad artifact, a failed export (the exporter's message, shortened) or a
    failed parity check."""
    t0 = time.monotonic()
    _check_export_args(exporter, opset, out_name, atol, rtol)
    d = Path(artifact_dir)
    model, ckpt = load_artifact(d)
    size = int(ckpt["config"]["image_size"])
    head_names = [h["name"] for h in ckpt["heads"]]
    names = output_names(head_names)
    if len(set(names)) != len(names):
        raise ValueError(f"head names {head_names} give duplicate ONNX output names")
    wrapper = OnnxLoupe(model).eval()
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    meta = _export_meta(ckpt, wrapper, example, names, out_name, opset)
    if exporter == "auto":
        order = ["dynamo", "torchscript"] if opset >= DYNAMO_MIN_OPSET else ["torchscript", "dynamo"]
    else:
        order = [exporter]

    target = d / out_name
    errors: list[str] = []
    for name in order:
        try:
            written_opset, parity, export_seconds = _export_checked(
                name, wrapper, example, names, d, out_name, {**meta, "exporter": name}, opset, atol, rtol, check
            )
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
            log.warning("ONNX export of %s with the %s exporter failed: %s", d, name, exc)
            continue
        figures = _parity_figures(parity)
        max_diff = figures["max_abs_diff"]
        meta.update(
            exporter=name,
            opset=written_opset,
            **figures,
            abs_diff=parity["abs"] if parity else None,
            rel_diff=parity["rel"] if parity else None,
            atol=atol if check else None,
            rtol=rtol if check else None,
            checked_batches=list(CHECK_BATCHES) if check else [],
            export_seconds=round(export_seconds, 3),
        )
        _write_json_atomic(d / meta_name(out_name), meta)
        seconds = round(time.monotonic() - t0, 3)
        log.info(
            "exported %s (%s exporter, opset %d, max abs diff %s) in %.1fs",
            target,
            name,
            written_opset,
            max_diff,
            seconds,
        )
        return {
            "path": str(target),
            "meta_path": str(d / meta_name(out_name)),
            "exporter": name,
            "opset": written_opset,
            **figures,
            "atol": atol if check else None,
            "rtol": rtol if check else None,
            "outputs": names,
            "seconds": seconds,
        }
    raise ValueError(f"ONNX export of {d / MODEL_FILE} failed: " + "; ".join(errors))


def _check_export_args(exporter: str, opset, out_name: str, atol, rtol) -> None:
    """ValueError for an unknown exporter, an opset below 9, an out_name that is not a plain *.onnx file name or a
    negative tolerance."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 9:
        raise ValueError(f"opset must be an integer >= 9, got {opset!r}")
    if not out_name or Path(out_name).name != out_name or not out_name.endswith(".onnx") or out_name == ".onnx":
        raise ValueError(f"out_name must be a plain file name ending in .onnx, got {out_name!r}")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")


def _export_meta(ckpt: dict, wrapper, example, names: list[str], out_name: str, opset: int) -> dict:
    """onnx_meta.json's contents known before the export (input contract, outputs and their shapes, heads)."""
    cfg = ckpt["config"]
    size = int(cfg["image_size"])
    head_names = [h["name"] for h in ckpt["heads"]]
    label_maps = ckpt["label_maps"]
    with torch.no_grad():
        out_shapes = {n: [None, *list(t.shape[1:])] for n, t in zip(names, wrapper(example), strict=True)}
    meta = {
        "format": "loupe-onnx-v1",
        "source": MODEL_FILE,
        "file": out_name,
        "backbone": cfg.get("backbone"),
        "image_size": size,
        "input": INPUT_NAME,
        "input_shape": [None, 3, size, size],
        "input_dtype": "float32",
        "dynamic_axes": {INPUT_NAME: {"0": BATCH_AXIS}, **{n: {"0": BATCH_AXIS} for n in names}},
        "mean": [float(v) for v in ckpt["mean"]],
        "std": [float(v) for v in ckpt["std"]],
        "preprocess": preprocess_contract(size, ckpt["mean"], ckpt["std"], resize_mode(ckpt["config"])),
        "outputs": names,
        "output_shapes": out_shapes,
        "heads": {h: list(label_maps.get(h) or ckpt["heads"][i]["classes"]) for i, h in enumerate(head_names)},
        "head_specs": [
            {k: h[k] for k in ("name", "classes", "parent", "class_parents") if k in h} for h in ckpt["heads"]
        ],
        "embedding_dim": int(ckpt.get("embedding_dim") or out_shapes["embedding"][1]),
        "embedding": "L2-normalised pooled backbone features (cosine similarity = dot product)",
        "opset_requested": opset,
        "torch_version": str(torch.__version__),
    }
    return meta


def _export_checked(
    name: str, wrapper, example, names: list[str], d: Path, out_name: str, meta: dict, opset: int, atol, rtol, check
) -> tuple[int, dict | None, float]:
    """One exporter's attempt: export to a temp file, finish it (_finish_onnx: names, metadata), check parity
    (with `check`), then put it in place as d/out_name. Returns (the opset written, _parity's figures or None,
    the export's seconds); ValueError when a step fails. The temp file never stays behind."""
    tmp = _tmp_path(d, out_name)
    try:
        t_exp = time.monotonic()
        try:
            _EXPORT_FUNCS[name](wrapper, example, tmp, opset, names)
        except Exception as exc:  # noqa: BLE001 - unsupported ops, tracing/export errors
            raise ValueError(f"export failed: {_shorten(exc)}") from exc
        export_seconds = time.monotonic() - t_exp
        try:
            written_opset = _finish_onnx(tmp, names, meta)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnx checker / protobuf (e.g. > 2 GB) errors
            raise ValueError(f"invalid ONNX graph: {_shorten(exc)}") from exc
        parity = _parity(tmp, wrapper, names, meta["image_size"], atol, rtol) if check else None
        os.replace(tmp, d / out_name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return written_opset, parity, export_seconds


def _parity_figures(parity: dict | None) -> dict:
    """{"max_abs_diff", "max_rel_diff", "top1_agreement"} of _parity's figures (all None without a check)."""
    if parity is None:
        return {"max_abs_diff": None, "max_rel_diff": None, "top1_agreement": None}
    top1 = parity["top1"]
    return {
        "max_abs_diff": max(parity["abs"].values()),
        "max_rel_diff": max(parity["rel"].values()),
        "top1_agreement": top1["agree"] / top1["rows"] if top1["rows"] else None,
    }
