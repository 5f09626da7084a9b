"""ONNX export of trained Loupe models: onnxruntime parity with torch (checked here independently of the
exporter's own check), the input contract, dynamic batch, onnx_meta.json and error handling. CPU only."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from training.engine import onnx_export as ox  # noqa: E402
from training.engine import train_model  # noqa: E402
from training.engine.model import build_model  # noqa: E402
from training.engine.onnx_export import export_onnx  # noqa: E402
from training.engine.synthetic import TINY_TEST_CONFIG, draw_shape, make_shapes_dataset  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_tiny")
    manifest = make_shapes_dataset(root / "data", n=24)
    train_model(manifest, {**TINY_TEST_CONFIG, "epochs": 1, "num_workers": 0}, root / "run")
    return root / "run"


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torch_reference(run_dir, x):
    """What inference computes, rebuilt here from model.pt like inference.recognizer.Recognizer.load (not through
    the exporter's wrapper): {output name: array}."""
    ckpt = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model, _ = build_model(ckpt["config"], ckpt["heads"], load_weights=False)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()
    with torch.inference_mode():
        logits, feats = model(x)
    out = {}
    for h, lg in zip(ckpt["heads"], logits, strict=True):
        out[f"logits_{h['name']}"] = lg.float().numpy()
        out[f"probs_{h['name']}"] = F.softmax(lg.float(), dim=1).numpy()
    out["embedding"] = F.normalize(feats.float(), dim=1).numpy()
    return out


def assert_parity(run_dir, onnx_path, image_size, batches=(1, 5)):
    sess = session(onnx_path)
    worst = 0.0
    for b in batches:
        x = torch.randn(b, 3, image_size, image_size, generator=torch.Generator().manual_seed(100 + b))
        ref = torch_reference(run_dir, x)
        names = [o.name for o in sess.get_outputs()]
        assert sorted(names) == sorted(ref)
        got = dict(zip(names, sess.run(names, {"images": x.numpy()}), strict=True))
        for name, r in ref.items():
            assert got[name].shape == r.shape, (name, b)
            assert got[name].dtype == np.float32
            diff = float(np.abs(got[name] - r).max())
            assert diff <= ATOL, f"{name} at batch {b}: {diff}"
            worst = max(worst, diff)
    return worst


def no_temp_files(d):
    return not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ tiny model
def test_export_tiny_model_default(tiny_run):
    result = export_onnx(tiny_run)
    path = tiny_run / "model.onnx"
    assert result["path"] == str(path) and path.is_file()
    assert result["meta_path"] == str(tiny_run / "onnx_meta.json")
    assert result["exporter"] == "torchscript" and result["opset"] == 17  # auto: opset 17 -> TorchScript
    assert result["outputs"] == ["logits_shape", "logits_color", "probs_shape", "probs_color", "embedding"]
    assert 0.0 <= result["max_abs_diff"] <= ATOL
    assert result["seconds"] > 0
    assert no_temp_files(tiny_run)

    # independent parity at batch 1 and 5 (the export checked 3 and 1)
    assert assert_parity(tiny_run, path, 32) <= ATOL

    # dynamic batch axis on the input and every output; fixed H = W = image_size
    sess = session(path)
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(float)"
    assert inp.shape[0] == "batch" and inp.shape[1:] == [3, 32, 32]
    shapes = {o.name: o.shape for o in sess.get_outputs()}
    assert all(s[0] == "batch" for s in shapes.values())
    assert shapes["logits_shape"][1] == 2 and shapes["probs_color"][1] == 2 and shapes["embedding"][1] == 96
    big = sess.run(None, {"images": np.zeros((7, 3, 32, 32), np.float32)})
    assert [a.shape[0] for a in big] == [7] * 5
    probs = sess.run(["probs_shape"], {"images": np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype("f4")})
    np.testing.assert_allclose(probs[0].sum(axis=1), 1.0, atol=1e-5)

    meta = json.loads((tiny_run / "onnx_meta.json").read_text())
    ckpt = torch.load(tiny_run / "model.pt", map_location="cpu", weights_only=True)
    assert meta["input"] == "images" and meta["input_shape"] == [None, 3, 32, 32]
    assert meta["mean"] == pytest.approx(ckpt["mean"]) and meta["std"] == pytest.approx(ckpt["std"])
    assert meta["outputs"] == result["outputs"]
    assert meta["heads"] == {"shape": ckpt["label_maps"]["shape"], "color": ckpt["label_maps"]["color"]}
    assert meta["opset"] == 17 and meta["exporter"] == "torchscript"
    assert meta["torch_version"] == str(torch.__version__)
    assert meta["max_abs_diff"] == result["max_abs_diff"]
    assert meta["embedding_dim"] == 96 and meta["output_shapes"]["embedding"] == [None, 96]
    assert meta["preprocess"]["resize_shorter_side_to"] == math.ceil(32 * 1.14)
    assert meta["preprocess"]["center_crop"] == [32, 32]
    # the same metadata travels inside the ONNX file
    embedded = json.loads(sess.get_modelmeta().custom_metadata_map["loupe_meta"])
    assert embedded["heads"] == meta["heads"] and embedded["mean"] == meta["mean"] and embedded["opset"] == 17


def _preprocess_per_contract(img, meta):
    """The documented input contract with PIL + numpy only (what a torch-free server would do)."""
    p = meta["preprocess"]
    s = meta["input_shape"][2]
    short = p["resize_shorter_side_to"]
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    w, h = img.size
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
    return x.transpose(2, 0, 1)


def test_input_contract_matches_recognizer(tiny_run):
    from inference.recognizer import Recognizer  # noqa: PLC0415

    if not (tiny_run / "model.onnx").is_file():
        export_onnx(tiny_run)
    meta = json.loads((tiny_run / "onnx_meta.json").read_text())
    images = [draw_shape("circle", "red", 48), draw_shape("square", "blue", 61), draw_shape("circle", "blue", 40)]
    images[1] = images[1].resize((61, 45))  # landscape
    images[2] = images[2].resize((37, 70))  # portrait
    rec = Recognizer.load(tiny_run, num_threads=0)
    probs, emb = rec.predict(images)
    x = np.stack([_preprocess_per_contract(im, meta) for im in images])
    got = dict(zip(meta["outputs"], session(tiny_run / "model.onnx").run(meta["outputs"], {"images": x}), strict=True))
    for head in rec.heads:
        np.testing.assert_allclose(got[f"probs_{head}"], probs[head], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got["embedding"], emb, atol=ATOL, rtol=0)


def test_dynamo_exporter(tiny_run):
    result = export_onnx(tiny_run, exporter="dynamo", opset=17, out_name="model_dynamo.onnx")
    path = tiny_run / "model_dynamo.onnx"
    assert result["exporter"] == "dynamo" and result["path"] == str(path)
    assert result["opset"] == 18  # the dynamo exporter has nothing below opset 18
    assert result["max_abs_diff"] <= ATOL
    assert assert_parity(tiny_run, path, 32) <= ATOL
    assert result["meta_path"] == str(tiny_run / "model_dynamo.meta.json")
    meta = json.loads((tiny_run / "model_dynamo.meta.json").read_text())
    assert meta["file"] == "model_dynamo.onnx"
    assert meta["exporter"] == "dynamo" and meta["opset"] == 18 and meta["opset_requested"] == 17
    assert session(path).get_inputs()[0].shape == ["batch", 3, 32, 32]


# ----------------------------------------------------------------------------------------- real timm backbone
def test_real_timm_backbone_mobilenetv3(tmp_path):
    manifest = make_shapes_dataset(tmp_path / "data", n=8, size=72)
    cfg = {**TINY_TEST_CONFIG, "backbone": "mobilenetv3_small_100", "image_size": 64, "epochs": 1, "batch_size": 4}
    train_model(manifest, {**cfg, "pretrained": False, "num_workers": 0}, tmp_path / "run")
    result = export_onnx(tmp_path / "run")
    assert result["max_abs_diff"] <= ATOL
    assert assert_parity(tmp_path / "run", result["path"], 64) <= ATOL
    meta = json.loads((tmp_path / "run" / "onnx_meta.json").read_text())
    assert meta["backbone"] == "mobilenetv3_small_100" and meta["input_shape"] == [None, 3, 64, 64]
    assert meta["embedding_dim"] == 1024


def test_the_presets_pretrained_backbone_exports_with_parity(tmp_path):
    """tf_efficientnet_lite0 (every preset's default, TF "same" padding) from its bundled ImageNet weights,
    through the presets' two phases, exports and matches torch."""
    manifest = make_shapes_dataset(tmp_path / "data", n=8, size=72)
    cfg = {
        **TINY_TEST_CONFIG,
        "backbone": "tf_efficientnet_lite0",
        "pretrained": True,
        "image_size": 64,
        "epochs": 2,
        "freeze_backbone_epochs": 1,
        "unfreeze_lr_mult": 0.1,
        "batch_size": 4,
        "num_workers": 0,
    }
    metrics = train_model(manifest, cfg, tmp_path / "run")
    assert metrics["pretrained_source"] == "bundled"
    result = export_onnx(tmp_path / "run")
    assert result["top1_agreement"] == 1.0
    assert assert_parity(tmp_path / "run", result["path"], 64) <= ATOL


# ----------------------------------------------------------------------------------------------------- errors
def test_missing_or_foreign_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model.pt")):
        export_onnx(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is not a Loupe model"):
        export_onnx(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be read"):
        export_onnx(tmp_path)
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "onnx_meta.json").exists()


def test_bad_arguments(tiny_run):
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(tiny_run, exporter="tensorrt")
    with pytest.raises(ValueError, match="out_name"):
        export_onnx(tiny_run, out_name="../x.onnx")
    with pytest.raises(ValueError, match="atol"):
        export_onnx(tiny_run, atol=float("nan"))


def test_export_error_is_shortened_value_error(tiny_run, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator aten::frobnicate\n" + "stack frame\n" * 5000)

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(ValueError) as info:
        export_onnx(tiny_run, out_name="broken.onnx")
    msg = str(info.value)
    assert "aten::frobnicate" in msg and "torchscript:" in msg and "dynamo:" in msg  # both exporters tried
    assert len(msg) < 2000
    assert not (tiny_run / "broken.onnx").exists() and no_temp_files(tiny_run)


def test_parity_failure_names_output_and_keeps_old_file(tiny_run, monkeypatch):
    export_onnx(tiny_run, out_name="keep.onnx", check=False)
    before = (tiny_run / "keep.onnx").read_bytes()
    real = ox._reference

    def off(wrapper, x):
        out = real(wrapper, x)
        out[-1] = out[-1] + 0.01
        return out

    monkeypatch.setattr(ox, "_reference", off)
    with pytest.raises(ValueError, match=r"'embedding' differs from torch by 0\.01"):
        export_onnx(tiny_run, out_name="keep.onnx", exporter="torchscript")
    assert (tiny_run / "keep.onnx").read_bytes() == before and no_temp_files(tiny_run)


# ------------------------------------------------------------------------------- tolerance fit for float32 (#14)
def test_float32_sized_differences_pass_and_parity_figures_are_reported(tiny_run, monkeypatch):
    """Real timm models differ from torch by 5e-4 .. 1e-3 on logits (float32 sums in another order); a fixed
    1e-4 refused half of them. The check is relative + absolute and the figures are kept."""
    real = ox._reference

    def float32_noise(wrapper, x):
        out = real(wrapper, x)
        for i in range(2):  # logits_shape, logits_color: off by ~1e-3 of their magnitude, like the probe's models
            out[i] = out[i] * np.float32(1 + 5e-4) + np.float32(6e-4)
        return out

    monkeypatch.setattr(ox, "_reference", float32_noise)
    result = export_onnx(tiny_run, out_name="noisy.onnx", exporter="torchscript")
    assert 5e-4 < result["max_abs_diff"] < 1e-2  # refused by the former fixed atol of 1e-4
    assert 0 < result["max_rel_diff"] <= result["max_abs_diff"]
    assert result["top1_agreement"] == 1.0 and result["atol"] == ox.ATOL and result["rtol"] == ox.RTOL
    meta = json.loads((tiny_run / "noisy.meta.json").read_text())
    assert meta["max_rel_diff"] == result["max_rel_diff"] and meta["top1_agreement"] == 1.0
    assert set(meta["rel_diff"]) == set(result["outputs"])
    assert [h["name"] for h in meta["head_specs"]] == ["shape", "color"]  # for serving without model.pt


def test_a_different_predicted_class_is_refused(tiny_run, monkeypatch):
    real = ox._reference

    def swapped(wrapper, x):
        out = real(wrapper, x)
        probs = out[2]  # probs_shape: torch "predicts" another class than the graph, with a clear margin
        out[2] = np.eye(probs.shape[1], dtype=np.float32)[(probs.argmax(axis=1) + 1) % probs.shape[1]]
        return out

    monkeypatch.setattr(ox, "_reference", swapped)
    with pytest.raises(ValueError, match=r"predicts a different class than torch for head 'shape'"):
        export_onnx(tiny_run, out_name="flipped.onnx", exporter="torchscript")
    assert not (tiny_run / "flipped.onnx").exists()


def test_rtol_is_validated(tiny_run):
    with pytest.raises(ValueError, match="rtol"):
        export_onnx(tiny_run, rtol=-1.0)
