"""Losses: per-head class weights from the train counts, per-head loss weights from the config, and the summed
per-head masked cross-entropy (ArcFace loss on the ArcFace head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .manifest import IGNORE_INDEX


def class_weights(targets: list[tuple[int, ...]], head_sizes: list[int], mode: str) -> list[torch.Tensor | None]:
    """Per-head loss weights from the train counts: "inverse" gives N / (K * n_c) (a balanced loss), "sqrt_inverse"
    the square root of that (milder); classes absent from train get weight 0. None for mode "none"."""
    if mode == "none":
        return [None] * len(head_sizes)
    out = []
    for h, k in enumerate(head_sizes):
        counts = torch.zeros(k, dtype=torch.float64)
        for t in targets:
            if t[h] != IGNORE_INDEX:
                counts[t[h]] += 1
        present = counts > 0
        w = torch.zeros(k, dtype=torch.float64)
        if present.any():
            w[present] = counts.sum() / (present.sum() * counts[present])
            if mode == "sqrt_inverse":
                w[present] = w[present].sqrt()
        out.append(w.float())
    return out


def _heads_loss(
    logits: list[torch.Tensor],
    y: torch.Tensor,
    label_smoothing: float,
    weights: list | None = None,
    head_weights: list[float] | None = None,
    *,
    model=None,
    embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over heads of the (class-weighted) mean cross-entropy over the samples whose label is known, each
    head's term multiplied by its head_weights entry (default 1). The ArcFace head of `model` (if any) uses the
    ArcFace loss on `embeddings` instead (float32, margin as currently set on the model)."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    arc = getattr(model, "arcface_head", None)
    for h, lg in enumerate(logits):
        hw = 1.0 if head_weights is None else head_weights[h]
        if hw == 0:
            continue
        yh = y[:, h]
        known = yh != IGNORE_INDEX
        if h == arc:
            if known.any():
                total = total + model.arcface(embeddings[known].float(), yh[known]) * hw
            continue
        w = weights[h] if weights else None
        if w is None:
            n = known.sum().clamp_min(1)
        else:
            w = w.to(lg.device)
            n = w[yh[known]].sum().clamp_min(1e-6)
        ce = F.cross_entropy(
            lg.float(), yh, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
        )
        total = total + ce / n * hw
    return total


def _head_loss_weights(cfg: dict, head_names: list[str]) -> list[float] | None:
    weights = cfg["head_loss_weights"]
    if weights is None:
        return None
    unknown = sorted(set(weights) - set(head_names))
    if unknown:
        raise ValueError(
            f"config 'head_loss_weights': unknown head(s) {', '.join(map(repr, unknown))}; "
            f"the heads of this manifest are {', '.join(map(repr, head_names))}"
        )
    out = [float(weights.get(name, 1.0)) for name in head_names]
    if not any(w > 0 for w in out):
        raise ValueError("config 'head_loss_weights': every head has weight 0, nothing would be trained")
    return out
