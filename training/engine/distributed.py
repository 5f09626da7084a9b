"""Several processes, one model: torch DistributedDataParallel (DDP) inside the training loop, one process per GPU
(NCCL), or gloo processes on a CPU (how the tests run it). launch.py starts the processes with torchrun;
ddp_rank.py is what each one runs. Pure: no Django.

How a run is split, so that N processes compute what one process computes:

- **Batches**: every process draws the one-process run's batch order (same seed, same sampler, same generator
  state) and trains on its share of each batch, batch[rank::N] (ShardedBatches): the optimizer still steps once
  per global batch of `batch_size` photos, so the schedule, the number of steps and the effective batch are the
  one-process run's. Each process's loss is weighted by its share of the batch's photos (step_plan), so DDP's
  gradient average is the gradient of the global batch's mean loss.
- **Decisions** that could differ between processes are taken together: a step is skipped by all when one
  process has no usable photo (unreadable files, or one photo with BatchNorm), the time budget is one decision
  (any_true), evaluation is sharded and its counts summed (sum_tensors), so best-epoch selection and early
  stopping see the same numbers everywhere; BatchNorm running statistics are rank 0's (DDP broadcasts them before
  every forward; broadcast_buffers before evaluation).
- **Rank 0 alone** resumes the checkpoint and runs phase 1 on cached features, then sends the whole state to the
  others (sync_run_state); it alone writes checkpoints, progress, metrics and the artifact files (the model is
  never saved wrapped: no "module." prefix, so artifacts are the one-process run's in form).

What differs from one process: BatchNorm normalises each process's share of a batch with that share's statistics
(batch_size / N photos, not batch_size); the augmentation draws differ (each process has its own random stream);
a head with unknown labels in the batch (LEGO colour 9999) averages over its known labels per process, weighted
by photos, not by known labels; sums come out in another order (the last float bits). Without BatchNorm and
augmentation the weights match one process's to float rounding (training/tests/test_ddp.py)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

log = logging.getLogger("training.engine")

# How long a process waits in a collective for the others: rank 0 runs phase 1 (the feature pass over every photo)
# while the others wait for its result. A process that dies is noticed by torchrun first, which stops the rest.
DEFAULT_COLLECTIVE_TIMEOUT_S = 7200.0


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def requested_processes(cfg: dict) -> int:
    """The processes config key `devices` asks for on this machine: an integer as given; "auto" = one per CUDA
    device when the run trains on CUDA, else 1. ValueError when the machine cannot give them (more than its GPUs,
    MPS, or one named GPU such as "cuda:1" with devices > 1)."""
    from .runtime import resolve_device  # noqa: PLC0415

    value = cfg["devices"]
    device = resolve_device(cfg["device"])
    if value == "auto":
        return max(1, cuda_device_count()) if device.type == "cuda" else 1
    n = int(value)
    if n == 1:
        return 1
    if device.type == "mps":
        raise ValueError(f"config 'devices': {n} processes on 'mps' is not supported; use devices 1")
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"config 'devices': {n} processes but 'device' names one GPU ({cfg['device']!r}); "
                'use device "cuda" or "auto" (process k trains on cuda:k)'
            )
        have = cuda_device_count()
        if n > have:
            raise ValueError(
                f"config 'devices': {n} processes (one per GPU) but this machine has {have} CUDA device(s); "
                'use devices "auto" or at most ' + str(have)
            )
    return n


def single_process_reason(cfg: dict) -> str | None:
    """Why a run that asks for several processes trains in one (None when DDP applies): the tail fine-tune is the
    CPU recipe (cached maps of the frozen blocks, a loop of its own) and the quick retrain fits heads on cached
    features in seconds; neither is a whole-network fine-tune."""
    if cfg.get("quick"):
        return "the quick retrain (heads on cached features) runs in one process"
    if cfg.get("tail_from_block") is not None:
        return "the tail fine-tune (tail_from_block, the CPU recipe) runs in one process"
    return None


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK) and the collectives the loop uses.
    Every method is a collective: all processes call it, in the same order."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device if self.backend == "nccl" else "cpu")

    def step_plan(self, n: int, usable: bool) -> tuple[bool, float]:
        """One train step: (every process has a usable share, this process's loss weight = N * n / total), so that
        DDP's average over processes is the mean loss over the global batch's photos."""
        t = self._tensor([float(n), 0.0 if usable else 1.0])
        torch.distributed.all_reduce(t)
        total, unusable = t.tolist()
        if unusable > 0 or total <= 0:
            return False, 0.0
        return True, self.world * n / total

    def any_true(self, flag: bool) -> bool:
        t = self._tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t)
        return t.item() > 0

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        t = self._tensor([float(v) for v in values])
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Element-wise sums over the processes of CPU tensors of the same shapes and dtypes on every process."""
        out = []
        for t in tensors:
            moved = t.to(self.device) if self.backend == "nccl" else t.clone()
            torch.distributed.all_reduce(moved)
            out.append(moved.cpu())
        return out

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """rank 0's obj on every process (pickled: CPU tensors only)."""
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def broadcast_buffers(self, module: nn.Module) -> None:
        """rank 0's buffers (BatchNorm running statistics) on every process."""
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)

    def average_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients over the processes (after backward passes DDP did not synchronise: a run stopped
        inside an accumulation group). A parameter keeps no gradient when no process has one."""
        has = self._tensor([0.0 if p.grad is None else 1.0 for p in params])
        torch.distributed.all_reduce(has)
        for p, n in zip(params, has.tolist(), strict=True):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(self.world)

    def gather_skipped(self, skipped: dict[str, str]) -> None:
        """Every process's unreadable files in `skipped` (each process reads its share of the photos)."""
        for other in self.gather_objects(dict(skipped)):
            for path, error in other.items():
                skipped.setdefault(path, error)


def dist_from_env(device_value: str, *, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL with
    cuda:LOCAL_RANK when the config's device resolves to CUDA, gloo on the CPU."""
    from .runtime import resolve_device  # noqa: PLC0415

    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except KeyError as exc:
        raise RuntimeError(f"{exc.args[0]} is not set: run this under torchrun (training.engine.launch)") from None
    device = resolve_device(device_value)
    timeout = dt.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout, device_id=device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        backend = "gloo"
    return Dist(rank=rank, world=world, local_rank=local, device=device, backend=backend)


def barrier() -> None:
    """Wait for every process of the group (a no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ShardedBatches(Sampler[list[int]]):
    """This process's share, batch[rank::world], of every batch of `batches` (the one-process run's batch
    sampler: every process draws the same batches). Same length; set_epoch is passed on."""

    def __init__(self, batches, rank: int, world: int):
        self.batches = batches
        self.rank = rank
        self.world = world

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield list(batch)[self.rank :: self.world]


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of n items (evaluation: each item on exactly one process, no padding)."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))


def min_share(batch_size: int, n_train: int, drop_last: bool, world: int) -> int:
    """The fewest photos a process gets from one batch: batch_size // world, or n_train // world when the epoch's
    only batch is the whole (smaller) train split."""
    smallest = batch_size if drop_last or n_train >= batch_size else n_train
    return smallest // world


class LossModule(nn.Module):
    """The model and its loss in one forward, so DDP sees every parameter the loss uses (the ArcFace head's weights
    live in the loss, not in the model's forward). compute(model, x, y) -> the scalar loss."""

    def __init__(self, model: nn.Module, compute: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self._compute = compute

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._compute(self.model, x, y)


def wrap(module: LossModule, dist: Dist, *, find_unused: bool) -> nn.Module:
    """DDP over the module's parameters that require a gradient now (wrap again when that set changes: backbone
    freezing). find_unused: some parameter may get no gradient in a step (an ArcFace head without a known label in
    the batch, a head of loss weight 0)."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)


def seed_process(seed: int, epoch: int, rank: int) -> None:
    """Python's, NumPy's and torch's global RNGs (the augmentation draws of a process without loader workers) as a
    function of (seed, epoch, rank): the processes draw different augmentations, and a resumed epoch the same."""
    s = np.random.SeedSequence([int(seed) & (2**63 - 1), int(epoch), int(rank), 0x0DD9]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


class RankWorkerInit:
    """A DataLoader worker_init_fn: the worker's torch seed (from the loader's generator, the same on every process)
    moved by the rank, then Python's and NumPy's seeded from it, so processes do not draw the same augmentations."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, _worker_id: int) -> None:
        seed = (torch.initial_seed() + self.rank * 1_000_003) % 2**63
        torch.manual_seed(seed)
        random.seed(seed % 2**32)
        np.random.seed(seed % 2**32)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def sync_run_state(dist: Dist, state, *, model, optimizer, scheduler, scaler) -> None:
    """rank 0's run (model weights and buffers, optimizer, scheduler and scaler states, the TrainState) on every
    process: after rank 0 resumed a checkpoint, and after it ran phase 1 alone."""
    payload = None
    if dist.is_main:
        payload = {
            "model": _to_cpu(model.state_dict()),
            "optimizer": _to_cpu(optimizer.state_dict()),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": {f.name: _to_cpu(getattr(state, f.name)) for f in fields(state)},
        }
    payload = dist.broadcast_object(payload)
    if dist.is_main:
        return
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    for name, value in payload["state"].items():
        setattr(state, name, value)
