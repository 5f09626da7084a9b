"""Shared helpers for benchmarks: the machine description and the results file format (DESIGN.md)."""

import datetime as dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, GPU {gpu}, {platform.machine()}"


def metric(value, unit, baseline, baseline_value, target=None, met=None) -> dict:
    ratio = None if not baseline_value else round(value / baseline_value, 3)
    return {
        "value": round(value, 3),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": round(baseline_value, 3),
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def write(name: str, metrics: dict, notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {
        "bench": name,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "metrics": metrics,
        "notes": notes,
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def table(metrics: dict) -> str:
    lines = [f"{'metric':38} {'value':>10} {'baseline':>10} {'ratio':>7}  baseline"]
    for name, m in metrics.items():
        lines.append(f"{name:38} {m['value']:>10} {m['baseline_value']:>10} {m['ratio']!s:>7}  {m['baseline']}")
    return "\n".join(lines)
