"""ReLU and max-pool twins: PyTorch's results and gradients, from less saved memory (1 bit per
element for ReLU's mask, one byte per output for the pool's argmax), on each kernel backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q8
from q8 import QuantConfig, quantize_model
from q8.functional import MaxPool2dFn, ReLUFn
from q8.kernels import Kernels
from tests.conftest import device_of


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (4, 9), (3, 1001)])
@pytest.mark.parametrize("inplace", [False, True])
def test_relu_matches_pytorch_and_saves_one_bit_per_element(backend, shape, inplace) -> None:
    kernels = Kernels(backend)
    x = torch.randn(shape, device=device_of(backend))
    x.view(-1)[::5] = 0.0  # zeros pass no gradient, as in torch.relu
    x.view(-1)[1::7] = -0.0
    gy = torch.randn(shape, device=x.device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ReLUFn.apply(xa * 1.0, inplace, kernels)
    ya.backward(gy)
    F.relu(xb).backward(gy)
    assert torch.equal(ya, F.relu(x)) and torch.equal(xa.grad, xb.grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ReLUFn.apply(x.clone().requires_grad_(), False, kernels)
    assert [t.dtype for t in saved] == [torch.uint8]
    assert saved[0].numel() == (x.numel() + 7) // 8


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "ceil_mode"),
    [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False), (3, 2, 1, 2, False),
     (3, 2, 0, 1, True), ((2, 3), (1, 2), (1, 0), 1, False)],
)
def test_max_pool_matches_pytorch_and_saves_one_byte_per_output(
        backend, kernel, stride, padding, dilation, ceil_mode) -> None:
    pair = lambda v: tuple(v) if isinstance(v, tuple) else (v, v)  # noqa: E731
    args = (pair(kernel), pair(stride), pair(padding), pair(dilation), ceil_mode)
    kernels = Kernels(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 13, generator=g).to(device_of(backend))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = MaxPool2dFn.apply(xa, args, kernels)
    yb = F.max_pool2d(xb, kernel, stride, padding, dilation, ceil_mode)
    gy = torch.randn(yb.shape, generator=g).to(x.device)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MaxPool2dFn.apply(x.clone().requires_grad_(), args, kernels)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.uint8, yb.shape)]


def test_max_pool_on_planes_of_2_to_23_values_or_more_stays_exact(backend) -> None:
    """Index arithmetic stays exact where float32 no longer holds every index (the CPU
    backend's switches to float64)."""
    x = torch.randn(1, 1, 2900, 2900, generator=torch.Generator().manual_seed(0)).to(
        device_of(backend))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = MaxPool2dFn.apply(xa, ((3, 3), (2, 2), (1, 1), (1, 1), False), Kernels(backend))
    yb = F.max_pool2d(xb, 3, 2, 1)
    gy = torch.randn(yb.shape)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)


class ReadsWeights(nn.Module):
    """timm's BEiT attention: its forward hands its qkv layer's weight to F.linear itself."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, image):
        y = F.linear(input=x, weight=self.qkv.weight, bias=self.qkv.bias)
        return y, F.conv2d(image, self.conv.weight, None, 1, "same")


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(weight_bits=None)],
                         ids=["paper", "fp32-weights"])
def test_functional_calls_on_a_twin_s_weight_run_its_quantized_gemm(config):
    """The F.linear / F.conv2d calls in the parent's code run the twins' bifurcated GEMMs: the
    same outputs and gradients as calling the twins, each quantized once per call (with fp32
    weights too, where the GEMM inside receives the weight itself)."""
    torch.manual_seed(0)
    model = quantize_model(ReadsWeights(), config)
    assert type(model).__name__ == "Q8ReadsWeights"
    twin = copy.deepcopy(model)
    x, image = torch.randn(4, 10, 16, requires_grad=True), torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    y, z = model(x, image)
    (y.sum() + z.sum()).backward()
    torch.manual_seed(1)
    y_ref = twin.qkv(x.detach())
    z_ref = twin.conv._q8_conv2d(image, twin.conv.weight, None, 1, "same")
    (y_ref.sum() + z_ref.sum()).backward()
    assert torch.equal(y, y_ref) and torch.equal(z, z_ref)
    assert torch.equal(model.qkv.weight.grad, twin.qkv.weight.grad)
    assert torch.equal(model.conv.weight.grad, twin.conv.weight.grad)
    assert int(model.qkv.act_range_steps) == int(model.conv.act_range_steps) == 1
    float_model = q8.dequantize_model(model)
    assert type(float_model) is ReadsWeights and type(float_model.qkv) is nn.Linear
