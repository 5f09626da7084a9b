"""Run the mobile (TFLite) export in its own environment (training.engine.tflite_export explains why): the
interpreter is LOUPE_MOBILE_PYTHON, else <repo>/.venv-mobile/bin/python when it exists. No Django.

    mobile_python() -> str | None
    mobile_export(artifact_dir, *, timeout=1800) -> dict    # tflite_export.export_tflite's result
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .tflite_export import UNAVAILABLE, MobileExportError

REPO = Path(__file__).resolve().parents[2]


def mobile_python() -> str | None:
    """The Python that has litert-torch: LOUPE_MOBILE_PYTHON, else .venv-mobile's; None when neither exists."""
    configured = os.environ.get("LOUPE_MOBILE_PYTHON", "").strip()
    if configured:
        return configured if Path(configured).is_file() else None
    local = REPO / ".venv-mobile" / "bin" / "python"
    return str(local) if local.is_file() else None


def mobile_export(artifact_dir, *, timeout: float = 1800, check: bool = True, images: list | None = None) -> dict:
    """Export artifact_dir's classifier (model.tflite) or detector (detector.tflite; checked on `images`, photo
    paths, when given) in the mobile environment (a subprocess; the converter's memory goes with it).
    MobileExportError with the exporter's own message when it refuses or fails, or with what to install when there
    is no mobile environment."""
    python = mobile_python()
    if python is None:
        configured = os.environ.get("LOUPE_MOBILE_PYTHON", "").strip()
        raise MobileExportError(
            f"LOUPE_MOBILE_PYTHON={configured!r} does not exist. {UNAVAILABLE}" if configured else UNAVAILABLE
        )
    cmd = [python, "-m", "training.engine.tflite_export", str(artifact_dir), *([] if check else ["--no-check"])]
    cmd += [f"--image={p}" for p in images or []]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise MobileExportError(f"The TFLite export took longer than {timeout:.0f} s and was stopped.") from None
    answer = None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                answer = json.loads(line)
                break
            except ValueError:
                continue
    if answer is None:
        tail = " | ".join(ln.strip() for ln in done.stderr.splitlines()[-5:] if ln.strip())[-600:]
        raise MobileExportError(f"The TFLite exporter stopped (exit {done.returncode}) without an answer: {tail}")
    if "error" in answer:
        raise MobileExportError(answer["error"])
    return answer
