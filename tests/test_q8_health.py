"""q8.check_finite: the layer where a quantized model first went non-finite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import q8
from q8.health import find_non_finite


class Poison(nn.Module):
    """Identity, or a NaN in forward (`forward=True`) or backward (`backward=True`)."""

    def __init__(self) -> None:
        super().__init__()
        self.forward_nan = self.backward_nan = False

    def forward(self, x):
        if self.forward_nan:
            x = x * torch.where(torch.arange(x.shape[1]) == 0, float("nan"), 1.0).view(1, -1)
        return _NaNGrad.apply(x) if self.backward_nan else x


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def model():
    torch.manual_seed(0)
    return q8.quantize_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Poison(),
                                           nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
                             q8.QuantConfig())


def step(m):
    m(torch.randn(32, 8)).sum().backward()


def test_a_finite_model_passes():
    m = model()
    step(m)
    assert find_non_finite(m) is None
    q8.check_finite(m)


def test_a_nan_in_forward_is_named_at_the_first_layer_that_received_it():
    m = model()
    step(m)
    m[2].forward_nan = True
    step(m)
    with pytest.raises(q8.NonFiniteError, match=r"at 3 \(QuantLinear\): its input range"):
        q8.check_finite(m)


def test_a_nan_in_backward_is_named_at_the_last_layer_whose_gradient_it_reached():
    m = model()
    m[2].backward_nan = True
    step(m)
    assert torch.isfinite(m[5].weight.grad).all() and not torch.isfinite(m[0].weight.grad).all()
    with pytest.raises(q8.NonFiniteError, match=r"at 0 \(QuantLinear\): its weight gradient"):
        q8.check_finite(m)


def test_non_finite_weights_are_named():
    m = model()
    with torch.no_grad():
        m[3].weight[0, 0] = float("inf")
    assert find_non_finite(m) == "3 (QuantLinear): its parameters"
