"""ReLU and max-pool twins: PyTorch's results and gradients, from less saved memory (1 bit per
element for ReLU's mask, one byte per output for the pool's argmax), on each kernel backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
