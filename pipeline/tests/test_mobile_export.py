"""Mobile export (issue 18.7): a classifier version to model.tflite with litert-torch in its own environment
(.venv-mobile, `make .venv-mobile`), checked by the exporter with the LiteRT interpreter against onnxruntime, and
here again independently (the .tflite run by LiteRT in a separate process on photos this test draws, against
onnxruntime on model.onnx); refusals (no converter, a broken or missing artifact); the job on a real worker, the
REST endpoint and the download; the model page's card. The detector's export: training/tests/test_detection.py."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.workers import wait
from training.engine import train_model
from training.engine.mobile import mobile_export, mobile_python
from training.engine.onnx_export import export_onnx
from training.engine.synthetic import TINY_TEST_CONFIG, make_shapes_dataset
from training.engine.tflite_export import MobileExportError

ort = pytest.importorskip("onnxruntime")

# `make test` builds .venv-mobile first; CI must not skip these.
needs_mobile = pytest.mark.skipif(
    mobile_python() is None and not os.environ.get("CI"),
    reason="no mobile exporter environment: run `make .venv-mobile` (make test does)",
)

LITERT_RUN = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
runner = Interpreter(model_path=sys.argv[1]).get_signature_runner()
(name,) = runner.get_input_details()
x = np.load(sys.argv[2])
outs = [runner(**{name: x[i : i + 1]}) for i in range(len(x))]
np.savez(sys.argv[3], **{k: np.concatenate([o[k] for o in outs]) for k in outs[0]})
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tflite_tiny")
    manifest = make_shapes_dataset(root / "data", n=24)
    train_model(manifest, {**TINY_TEST_CONFIG, "epochs": 1, "num_workers": 0}, root / "run")
    export_onnx(root / "run")
    return root / "run"


@needs_mobile
def test_tflite_equals_onnx_on_new_inputs(tiny_run, tmp_path):
    result = mobile_export(tiny_run)
    assert result["reference"] == "onnxruntime (model.onnx)" and result["photos_checked"] == 4
    assert 0 <= result["max_abs_diff"] <= 1e-3 and result["size_bytes"] > 10_000
    meta = json.loads((tiny_run / "model_tflite.json").read_text())
    onnx_meta = json.loads((tiny_run / "onnx_meta.json").read_text())
    assert meta["input_shape"] == [1, 3, 32, 32] and meta["preprocess"] == onnx_meta["preprocess"]
    assert meta["outputs"] == onnx_meta["outputs"] and meta["heads"] == onnx_meta["heads"]
    assert not [p for p in tiny_run.iterdir() if p.name.endswith(".tmp")]
    # independently: LiteRT in its own process on inputs drawn here, against onnxruntime on model.onnx
    x = np.random.default_rng(7).normal(size=(5, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [
            mobile_python(),
            "-c",
            LITERT_RUN,
            str(tiny_run / "model.tflite"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    got = np.load(tmp_path / "y.npz")
    sess = ort.InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(meta["outputs"], {"images": x})
    for i, (name, r) in enumerate(zip(meta["outputs"], ref, strict=True)):
        g = got[f"output_{i}"]
        assert g.shape == r.shape, name
        assert float(np.abs(g - r).max()) <= 1e-3 * max(1.0, float(np.abs(r).max())), name
        if name.startswith("probs_"):
            assert (g.argmax(1) == r.argmax(1)).all(), name


@needs_mobile
def test_refusals_say_why(tiny_run, tmp_path, monkeypatch):
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "metrics.json").write_text('{"task": "detection"}')
    with pytest.raises(MobileExportError, match="model.pt"):  # taken for a detector, which needs its model.pt
        mobile_export(detector)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"truncated")
    with pytest.raises(MobileExportError, match="cannot be read as a Loupe model"):
        mobile_export(broken)
    with pytest.raises(MobileExportError, match="no model.pt"):
        mobile_export(tmp_path / "missing")
    monkeypatch.setenv("LOUPE_MOBILE_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(MobileExportError, match="make .venv-mobile"):
        mobile_export(tiny_run)
    assert mobile_python() is None


@needs_mobile
@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_the_export_job_on_a_worker_then_rest_download_and_page(
    worker, shapes_project, trained_version, admin_user, reviewer, token_client, client
):
    from training.models import Job
    from training.tests.factories import ModelVersionFactory

    project = shapes_project(4)
    version = trained_version(project)
    admin = token_client(admin_user)
    base = f"/api/v1/projects/{project.slug}/models/{version.number}"
    assert token_client(reviewer).post(f"{base}/mobile-export/").status_code == 403
    assert admin.get(f"{base}/files/model.tflite").status_code == 404  # not exported yet
    r = admin.post(f"{base}/mobile-export/")
    assert r.status_code == 202 and r.json()["what"] == "mobile export (TFLite)", r.content
    job = wait(
        lambda: Job.objects.filter(pk=r.json()["id"], status__in=["succeeded", "failed"]).first(),
        timeout=240,
        what="the export",
    )
    assert job.status == "succeeded", job.error
    assert job.result["reference"] == "onnxruntime (model.onnx)" and job.result["max_abs_diff"] <= 1e-3
    art = Path(version.artifact_dir)
    got = admin.get(f"{base}/files/model.tflite")
    assert got.status_code == 200 and b"".join(got.streaming_content) == (art / "model.tflite").read_bytes()
    client.force_login(admin_user)
    page = client.get(f"/p/{project.slug}/models/{version.number}/").content.decode()
    assert 'id="mobile-check"' in page and "onnxruntime (model.onnx)" in page and "model.tflite" in page
    # a version without artifacts is refused with the reason (no job)
    bare = ModelVersionFactory(project=project, artifact_dir="")
    refused = admin.post(f"/api/v1/projects/{project.slug}/models/{bare.number}/mobile-export/")
    assert refused.status_code == 409 and "no artifact folder" in refused.json()["error"]["message"]
    assert Job.objects.filter(kind="mobile_export").count() == 1
