"""Where and how a training run computes: CPU, loader-worker and thread counts, the device, seeding, and the
per-device torch settings (intra-op threads, TF32/cuDNN flags, mixed precision)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_num_workers(value, cpus: int | None = None) -> int:
    """ "auto": min(4, cpus - 1), and 0 on machines with <= 2 CPUs (measured: on 2 cores a worker process
    only competes with the training threads)."""
    if value != "auto":
        return int(value)
    cpus = cpu_count() if cpus is None else cpus
    return 0 if cpus <= 2 else min(4, cpus - 1)


def resolve_torch_threads(value, num_workers: int, cpus: int | None = None) -> int:
    """ "auto": leave one core for the data-loading main thread/OS/web server and one per loader worker.
    Measured on 2 cores (mobilenetv3_small_100, batch 32, 128 px): 2 threads 145 ms/step on an idle machine
    but 2-3 s/step while another process was busy (OpenMP threads spin-waiting); 1 thread 143 ms/step busy."""
    if value != "auto":
        return int(value)
    cpus = cpu_count() if cpus is None else cpus
    return max(1, cpus - num_workers - 1)


def resolve_device(value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(value)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config 'device': {value!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("config 'device': 'mps' requested but MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def worker_init(_worker_id: int) -> None:
    """DataLoader worker_init_fn: Python's and NumPy's RNGs seeded from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@contextmanager
def torch_settings(device: torch.device, torch_threads, num_workers: int, cpus: int | None = None) -> Iterator[None]:
    """Inside: on CPU, resolve_torch_threads(torch_threads) intra-op threads (of `cpus`, default all: a process of a
    distributed run has its share); on CUDA, TF32 matmuls/convolutions and cuDNN autotuning (free speed on
    Ampere+). The previous settings are restored on the way out."""
    prev_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(resolve_torch_threads(torch_threads, num_workers, cpus))
    prev_cuda_flags = None
    if device.type == "cuda":
        prev_cuda_flags = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        if prev_cuda_flags is not None:
            (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark,
            ) = prev_cuda_flags


def to_device(model: torch.nn.Module, device: torch.device) -> None:
    """Move the model to the device (channels-last memory on CUDA)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Amp:
    """Mixed precision on a device: CUDA autocasts to bfloat16, or to float16 with a GradScaler where bfloat16 is
    not supported; other devices compute in float32. scaler is None unless it is in use."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    @property
    def name(self) -> str:
        if self.dtype is None:
            return "off"
        return "bf16" if self.dtype == torch.bfloat16 else "fp16 + GradScaler"


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bfloat16 in hardware (compute capability 8.0+: Ampere, Hopper, ...). torch's
    is_bf16_supported() also says yes for older GPUs that only emulate it, where bfloat16 is slower than float32."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def amp_for(device: torch.device, mode: str = "auto") -> Amp:
    """The mixed precision of a run (config key `amp`): on CUDA "auto" is bfloat16 where native_bf16, else float16
    with a GradScaler; "bf16" / "fp16" force one; "off" is float32. Other devices: float32. ValueError for "bf16"
    on a GPU without native bfloat16."""
    if device.type != "cuda" or mode == "off":
        return Amp()
    if mode == "bf16" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"amp=bf16, but {name} has no native bfloat16 (it would be emulated, slower than float32): "
            'use amp "fp16" or "auto"'
        )
    if mode == "auto":
        mode = "bf16" if native_bf16(device) else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return Amp(dtype, scaler if scaler.is_enabled() else None)
