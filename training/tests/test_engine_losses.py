"""Tests of the engine's losses: class weighting and masking of unknown labels."""

import pytest
import torch

from training.engine import resolve_config


def test_class_weights_balance_the_loss():
    import torch

    from training.engine.losses import _heads_loss, class_weights
    from training.engine.manifest import IGNORE_INDEX

    targets = [(0,)] * 8 + [(1,)] * 2 + [(IGNORE_INDEX,)]
    assert class_weights(targets, [3], "none") == [None]
    (w,) = class_weights(targets, [3], "inverse")
    assert torch.allclose(w, torch.tensor([10 / (2 * 8), 10 / (2 * 2), 0.0]))
    (ws,) = class_weights(targets, [3], "sqrt_inverse")
    assert torch.allclose(ws, w.sqrt())
    # With inverse weights each class contributes equally, whatever its count.
    logits = [torch.zeros(10, 3)]
    y = torch.tensor([[0]] * 8 + [[1]] * 2)
    assert torch.isclose(_heads_loss(logits, y, 0.0, [w]), _heads_loss(logits, y, 0.0))
    with pytest.raises(ValueError, match="class_weighting"):
        resolve_config({"class_weighting": "heavy"})


def test_unknown_labels_contribute_no_loss():
    """An unknown colour (IGNORE_INDEX, the LEGO 9999 convention) changes neither the loss nor its gradient."""
    from training.engine.losses import _heads_loss
    from training.engine.manifest import IGNORE_INDEX

    torch.manual_seed(0)
    part = torch.randn(4, 3, requires_grad=True)
    color = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([[0, 1], [1, IGNORE_INDEX], [2, 3], [0, IGNORE_INDEX]])
    loss = _heads_loss([part, color], y, 0.1)
    loss.backward()
    assert torch.all(color.grad[1] == 0) and torch.all(color.grad[3] == 0)
    assert torch.any(part.grad[1] != 0)  # the part label of the same image still trains
    known = torch.tensor([0, 2])
    colour_only = torch.nn.functional.cross_entropy(color[known], y[known, 1], label_smoothing=0.1)
    part_only = torch.nn.functional.cross_entropy(part, y[:, 0], label_smoothing=0.1)
    assert torch.isclose(loss, colour_only + part_only)
