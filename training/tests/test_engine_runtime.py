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
