"""The GEMM modes (q8.gemm) against the dequantized mode, on small shapes on the CPU.

`codes` multiplies the centred codes q - z in bf16 (exact integers up to 255) with fp32
accumulation, then scales: it may differ from the dequantized fp32 GEMM by the bf16 output's
rounding (at most 2^-8 of each output) plus the two fp32 accumulations, each at most
(K + 2) 2^-24 of the sum of the K products' magnitudes A (Higham 2002, 3.5). `int8` is exact
in int32 and rounds twice to float: it differs by the accumulation terms alone.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from q8 import QuantConfig, QuantConv2d, QuantLinear
from q8.kernels.reference import minmax, qparams

EPS = 2.0**-24


def _pair(layer_cls, args, mode, config, x, gy, seed=3):
    """Output, dL/dx, dL/dW of one twin in `mode`, with the same weights, input and noise."""
    torch.manual_seed(0)
    layer = layer_cls(*args, q8_config=dataclasses.replace(config, gemm=mode)).to(x.device)
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(xi)
    y.backward(gy)
    return y.detach(), xi.grad, layer.weight.grad, layer


def _centred(t, bits):
    s, z = qparams(*minmax(t), bits)
    q = (t / s).round() + z
    return (q.clamp(0, 2**bits - 1) - z).double(), s.double()


def _abs_conv(a, b, geometry):
    """|a| * |b| summed as the forward conv sums them (float64): the A of the bound."""
    if geometry is None:
        return F.linear(a.abs(), b.abs())
    return F.conv2d(a.abs(), b.abs(), None, *geometry)


CONVS = {  # name: (in, out, kernel, kwargs, input shape)
    "3x3": (16, 24, 3, {"padding": 1}, (4, 16, 9, 9)),
    "1x1": (16, 24, 1, {}, (4, 16, 5, 5)),  # a plain product: int8 runs it
    "grouped-stride2": (16, 24, 3, {"padding": 1, "stride": 2, "groups": 4}, (4, 16, 9, 9)),
    # taps that see only padding (ResNet's last stage on small images): their gradient is 0
    "3x3-on-1x1": (16, 24, 3, {"padding": 1, "stride": 2}, (4, 16, 1, 1)),
}


@pytest.mark.parametrize("mode", ["codes", "int8"])
@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_forward_within_the_bound(device, mode, name, channels_last):
    cin, cout, k, kw, shape = CONVS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).relu().to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cfg = QuantConfig(grad_rounding="nearest", act_ranges="tensor")
    torch.manual_seed(0)
    deq = QuantConv2d(cin, cout, k, **kw, q8_config=cfg).to(device)
    torch.manual_seed(0)
    other = QuantConv2d(cin, cout, k, **kw, q8_config=dataclasses.replace(cfg, gemm=mode))
    y_d, y_m = deq(x), other.to(device)(x)
    xi, sx = _centred(x, 8)
    wi, sw = _centred(deq.weight.detach(), 8)
    geometry = (deq.stride, deq.padding, deq.dilation, deq.groups)
    A = _abs_conv(xi, wi, geometry) * sx * sw
    K = cin // deq.groups * k * k
    exact = mode == "int8" and name == "1x1"
    product = (y_d - deq.bias.view(1, -1, 1, 1)).abs().double()  # what bf16 rounds
    rounding = 0.0 if exact else 2.0**-8 * (product + A * 2 * K * EPS)
    tol = rounding + (2 * K + 8) * EPS * (A + y_d.abs().double()) + 1e-30
    assert ((y_m.double() - y_d.double()).abs() <= tol).all()
    if not exact:  # the bound is not vacuous: bf16's rounding shows
        assert not torch.equal(y_m, y_d)


@pytest.mark.parametrize("mode", ["codes", "int8"])
def test_linear_forward_and_data_path_int8_is_exact(device, mode):
    """A linear layer of 32 rows (> 16, k and n multiples of 8): int8's products are exact, so
    the difference from the dequantized mode is the accumulation's alone."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 64, generator=g).to(device)
    gy = torch.randn(32, 40, generator=g).to(device)
    cfg = QuantConfig(grad_rounding="nearest")
    y_d, gx_d, gw_d, deq = _pair(QuantLinear, (64, 40), "dequantized", cfg, x, gy)
    y_m, gx_m, gw_m, _ = _pair(QuantLinear, (64, 40), mode, cfg, x, gy)
    xi, sx = _centred(x, 8)
    wi, sw = _centred(deq.weight.detach(), 8)
    gi, sg = _centred(gy, 8)
    A_y = F.linear(xi.abs(), wi.abs()) * sx * sw
    A_x = gi.abs() @ wi.abs() * sg * sw
    bf16 = 0.0 if mode == "int8" else 2.0**-8
    product = (y_d - deq.bias).abs().double()
    for got, want, prod, A, K in ((y_m, y_d, product, A_y, 64),
                                  (gx_m, gx_d, gx_d.abs().double(), A_x, 40)):
        tol = (bf16 * (prod + 2 * K * EPS * A) + (2 * K + 8) * EPS * (A + want.abs().double())
               + 1e-30)
        assert ((got.double() - want.double()).abs() <= tol).all()


@pytest.mark.parametrize("mode", ["codes", "int8"])
@pytest.mark.parametrize("name", CONVS)
def test_conv_backward_within_the_bound(device, mode, name):
    """dL/dx (8-bit g_l and W) and dL/dW (16-bit g_l in two bytes and x), nearest rounding."""
    cin, cout, k, kw, shape = CONVS[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).relu().to(device)
    cfg = QuantConfig(grad_rounding="nearest", act_ranges="tensor")
    torch.manual_seed(0)
    deq = QuantConv2d(cin, cout, k, **kw, q8_config=cfg).to(device)
    torch.manual_seed(0)
    other = QuantConv2d(cin, cout, k, **kw,
                        q8_config=dataclasses.replace(cfg, gemm=mode)).to(device)
    gy = torch.randn(deq(x).shape, generator=g).to(device)
    grads = []
    for layer in (deq, other):
        xi = x.clone().requires_grad_(True)
        layer(xi).backward(gy)
        grads.append((xi.grad, layer.weight.grad))
    (gx_d, gw_d), (gx_m, gw_m) = grads
    geometry = (deq.stride, deq.padding, deq.dilation, deq.groups)
    wi, sw = _centred(deq.weight.detach(), 8)
    g8, s8 = _centred(gy, 8)
    A_x = torch.ops.aten.convolution_backward(
        g8.abs(), x.double(), wi.abs(), None, *geometry[:3], False, [0, 0], geometry[3],
        [True, False, False])[0] * s8 * sw
    K_x = cout // deq.groups * k * k
    exact = mode == "int8" and name == "1x1"
    bf16 = 0.0 if exact else 2.0**-8
    tol = bf16 * (gx_d.abs().double() + 2 * K_x * EPS * A_x) + (2 * K_x + 8) * EPS * A_x
    assert ((gx_m.double() - gx_d.double()).abs() <= tol + 1e-30).all()
    g16, s16 = _centred(gy, 16)
    hi = torch.floor(g16 / 256)
    split = 256 * hi.abs() + (g16 - 256 * hi).abs()  # what the two bf16 outputs round
    xi, sx = _centred(x, 8)
    A_w = torch.ops.aten.convolution_backward(
        split, xi.abs(), wi, None, *geometry[:3], False, [0, 0], geometry[3],
        [False, True, False])[1] * s16 * sx
    K_w = shape[0] * gy.shape[2] * gy.shape[3]
    tol = 2.0**-8 * A_w * (1 + 2 * K_w * EPS) + (2 * K_w + 8) * EPS * A_w
    assert ((gw_m.double() - gw_d.double()).abs() <= tol + 1e-30).all()


def test_per_channel_weights_keep_the_data_path_dequantized(device):
    """Per-channel weight scales vary along dL/dx's summed channels: codes runs that GEMM on
    the dequantized values, the same floats as the dequantized mode."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 16, 7, 7, generator=g).to(device)
    gy = torch.randn(4, 24, 5, 5, generator=g).to(device)
    cfg = QuantConfig(per_channel_weights=True, grad_rounding="nearest")
    _, gx_d, _, _ = _pair(QuantConv2d, (16, 24, 3), "dequantized", cfg, x, gy)
    _, gx_c, _, _ = _pair(QuantConv2d, (16, 24, 3), "codes", cfg, x, gy)
    assert torch.equal(gx_c, gx_d)


def _sqnr_db(ref, approx):
    return 10 * math.log10(ref.pow(2).sum() / (approx - ref).pow(2).sum())


@pytest.mark.parametrize("mode", ["codes", "int8"])
@pytest.mark.parametrize("name", CONVS)
def test_weight_gradient_sqnr_within_half_a_db_of_the_dequantized_mode(device, mode, name):
    """The paper's setting (stochastic rounding, a 16-bit g_l copy): dL/dW's SQNR against fp32
    autograd loses at most 0.5 dB to bf16's output rounding (8-bit inputs set it: ~40 dB)."""
    cin, cout, k, kw, shape = CONVS[name]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).to(device)
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(cin, cout, k, **kw).to(device)
    gy = torch.randn(ref(x).shape, generator=g).to(device)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(gy)
    sqnr = {}
    for m in ("dequantized", mode):
        torch.manual_seed(0)
        cfg = QuantConfig(gemm=m, act_ranges="tensor")
        layer = QuantConv2d(cin, cout, k, **kw, q8_config=cfg).to(device)
        torch.manual_seed(7)  # the same noise in both modes
        layer(x).backward(gy)
        sqnr[m] = _sqnr_db(ref.weight.grad.double(), layer.weight.grad.double())
    assert sqnr[mode] >= sqnr["dequantized"] - 0.5, sqnr


@pytest.mark.parametrize("mode", ["dequantized", "codes", "int8"])
def test_each_mode_trains_a_network_on_a_fixed_batch(device, mode):
    """Eight SGD steps on one batch, fixed seeds, the CPU: deterministic, and the loss falls."""
    from torch import nn

    from q8 import quantize_model

    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
        QuantConfig(gemm=mode)).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=g).to(device)
    y = torch.randint(0, 10, (32,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
