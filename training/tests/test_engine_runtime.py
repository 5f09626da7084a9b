"""Tests of the runtime setup: worker / thread counts, torch settings, mixed precision on the CPU."""

import pytest
import torch

from training.engine.runtime import amp_for, resolve_device, resolve_num_workers, torch_settings


def test_num_workers_auto():
    assert resolve_num_workers("auto", cpus=2) == 0
    assert resolve_num_workers("auto", cpus=4) == 3
    assert resolve_num_workers("auto", cpus=32) == 4
    assert resolve_num_workers(2, cpus=2) == 2


def test_torch_settings_set_and_restore_cpu_threads():
    before = torch.get_num_threads()
    with torch_settings(torch.device("cpu"), 1, 0):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_settings(torch.device("cpu"), 1, 0):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_amp_is_off_on_the_cpu():
    amp = amp_for(torch.device("cpu"))
    assert amp.dtype is None and amp.scaler is None and amp.name == "off"
    with amp.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("native", "mode", "expected"),
    [
        (True, "auto", torch.bfloat16),  # Ampere and newer
        (False, "auto", torch.float16),  # Volta/Turing: is_bf16_supported() says yes only by emulation
        (False, "fp16", torch.float16),
        (True, "fp16", torch.float16),
        (True, "bf16", torch.bfloat16),
        (True, "off", None),
    ],
)
def test_amp_uses_bf16_only_where_the_gpu_has_it_natively(monkeypatch, native, mode, expected):
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native or including_emulation  # torch's answer: emulation counts unless told otherwise

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    amp = amp_for(torch.device("cuda"), mode)
    assert amp.dtype == expected
    assert all(flag is False for flag in asked)  # never asks the emulation-inclusive question
    if expected is None:
        assert amp.name == "off"
    elif expected == torch.bfloat16:
        assert amp.name == "bf16" and amp.scaler is None  # bf16 needs no loss scaling
    else:
        assert amp.name == "fp16 + GradScaler"
        assert amp.scaler is not None or not torch.cuda.is_available()  # no GPU here: torch disables the scaler


def test_amp_bf16_is_refused_on_a_gpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ValueError, match="Tesla V100 has no native bfloat16"):
        amp_for(torch.device("cuda"), "bf16")
    assert amp_for(torch.device("cpu"), "bf16").dtype is None  # other devices compute in float32


def test_the_amp_key_is_validated():
    from training.engine import resolve_config

    assert resolve_config({"amp": "fp16"})["amp"] == "fp16"
    with pytest.raises(ValueError, match="amp"):
        resolve_config({"amp": "float8"})
