"""Twins of nn.Conv1d, nn.Conv3d and nn.ConvTranspose1d/2d/3d: the Conv2d twin's quantized
forward and bifurcated backward, on any number of spatial dimensions, plain or transposed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import q8
from q8 import QuantConfig, fake_quantize, quantize_model
from q8.kernels.reference import minmax, qparams
from q8.layers import QuantLayerMixin, twin_class
from tests.conftest import device_of
from tests.test_q8_bifurcation import GRADS_ONLY, expected_sqnr_db, sqnr_db

EPS = 2.0**-24

LAYERS = {  # name: (class, constructor arguments, input shape)
    "conv1d-same": (nn.Conv1d, dict(in_channels=16, out_channels=24, kernel_size=4,
                                    padding="same", dilation=2), (8, 16, 40)),
    "conv1d-valid": (nn.Conv1d, dict(in_channels=16, out_channels=24, kernel_size=3,
                                     padding="valid", stride=2, groups=4), (8, 16, 41)),
    "conv1d-1x1": (nn.Conv1d, dict(in_channels=16, out_channels=24, kernel_size=1), (4, 16, 9)),
    "conv3d": (nn.Conv3d, dict(in_channels=8, out_channels=16, kernel_size=3, padding=1,
                               stride=(1, 2, 2), groups=2), (4, 8, 5, 8, 8)),
    "convT1d": (nn.ConvTranspose1d, dict(in_channels=16, out_channels=24, kernel_size=3,
                                         stride=2, padding=1, output_padding=1), (8, 16, 20)),
    "convT2d": (nn.ConvTranspose2d, dict(in_channels=16, out_channels=24, kernel_size=3,
                                         stride=2, groups=4, dilation=2), (4, 16, 6, 7)),
    "convT3d": (nn.ConvTranspose3d, dict(in_channels=8, out_channels=8, kernel_size=2,
                                         stride=2), (4, 8, 3, 4, 5)),
}


def pair(name: str, config: QuantConfig, backend: str = "reference"):
    """The float layer and its twin, with the same parameters, on the backend's device."""
    cls, kwargs, _ = LAYERS[name]
    torch.manual_seed(0)
    ref = cls(**kwargs)
    twin = twin_class(QuantLayerMixin, cls)(
        **kwargs, q8_config=dataclasses.replace(config, backend=backend))
    twin.load_state_dict(ref.state_dict(), strict=False)
    dev = device_of(backend)
    return ref.to(dev), twin.to(dev)


def inputs(name: str, device: str, seed: int = 1) -> torch.Tensor:
    return torch.randn(LAYERS[name][2], generator=torch.Generator().manual_seed(seed)).to(device)


def grads(layer: nn.Module, x: torch.Tensor, g_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    layer(x).backward(g_out)
    return x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def convolution(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's convolution of x and w (no bias) in x's dtype: explicit padding for the
    string modes (as F.conv*d, the odd pixel at the end), transposed where the layer is."""
    x, padding = q8.layers.explicit_padding(x, layer.padding, layer.dilation, layer.kernel_size)
    return torch.ops.aten.convolution(x, w.to(x.dtype), None, layer.stride, padding,
                                      layer.dilation, layer.transposed, layer.output_padding,
                                      layer.groups)


def products_per_output(layer: nn.Module) -> int:
    """K, the most products one output sums (a transposed convolution's outputs sum fewer)."""
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


@pytest.mark.parametrize("name", LAYERS)
def test_full_precision_twin_equals_fp32_exactly(backend, name):
    cfg = QuantConfig(weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None)
    ref, q = pair(name, cfg, backend)
    x = inputs(name, device_of(backend))
    y = ref(x)
    assert torch.equal(q(x), y)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(x.device)
    for a, b in zip(grads(q, x, g), grads(ref, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("act_ranges", ["channel", "tensor"])
def test_forward_matches_the_fake_quantized_reference(backend, name, per_channel, act_ranges):
    """y = conv(x_hat, W_hat) + b with x_hat, W_hat the quantizer's (x per channel or per
    tensor, W per slice of its first dimension, as q8.kernels quantizes weights), up to fp32
    summation: each output differs by at most 2 K eps of the sum A of its products' magnitudes
    (plus the bias's rounding)."""
    cfg = QuantConfig(per_channel_weights=per_channel, act_ranges=act_ranges)
    ref, q = pair(name, cfg, backend)
    x = inputs(name, device_of(backend))
    x_hat = fake_quantize(x, 8, dim=1 if act_ranges == "channel" else None)
    w_hat = fake_quantize(ref.weight.detach(), 8, dim=0 if per_channel else None)
    want = convolution(ref, x_hat, w_hat) + ref.bias.detach().view(1, -1, *[1] * (x.dim() - 2))
    A = convolution(ref, x_hat.double().abs(), w_hat.double().abs())
    tol = 2 * products_per_output(ref) * EPS * A + 2 * EPS * want.abs().double() + 1e-30
    assert ((q(x).double() - want.double()).abs() <= tol).all()


@pytest.mark.parametrize("name", ["conv1d-same", "conv3d", "convT1d", "convT2d"])
@pytest.mark.parametrize("wgrad_bits", [16, None])
def test_bifurcated_gradients_have_the_sqnr_their_bits_give(backend, name, wgrad_bits):
    """dL/dx from the 8-bit copy of g_l, dL/dW from the wgrad_bits copy: each has the SQNR of
    stochastic rounding's noise (s^2/6 per element) on an i.i.d. g_l (test_q8_bifurcation)."""
    cfg = QuantConfig(grad_bits=8, wgrad_bits=wgrad_bits, **GRADS_ONLY)
    ref, q = pair(name, cfg, backend)
    x = inputs(name, device_of(backend))
    g = torch.randn(ref(x).shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    gx_ref, gw_ref, gb_ref = grads(ref, x, g)
    gx, gw, gb = grads(q, x, g)
    assert abs(sqnr_db(gx_ref, gx) - expected_sqnr_db(g, 8)) < 1.5
    if wgrad_bits is None:  # the fp32 copy: dL/dW is the fp32 result
        torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(gb, gb_ref, rtol=1e-6, atol=0)
    else:
        assert abs(sqnr_db(gw_ref, gw) - expected_sqnr_db(g, 16)) < 1.5


def _centred(t: torch.Tensor, bits: int):
    s, z = qparams(*minmax(t), bits)
    q = ((t / s).round() + z).clamp(0, 2**bits - 1)
    return (q - z).double(), s.double()


class CountIntMM(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten._int_mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["codes", "int8"])
@pytest.mark.parametrize("name", LAYERS)
def test_each_gemm_mode_within_the_bound_of_the_dequantized_mode(device, mode, name):
    """Nearest rounding, so both modes multiply the same integers; as tests/test_q8_gemm.py
    derives: bf16's rounding of each product (2^-8, none where int8 runs) plus two fp32
    accumulations of K products, in the forward, dL/dx (8-bit g_l) and dL/dW (16-bit g_l in
    two bytes). int8's plain product runs on a 1x1 Conv1d (exact there)."""
    # one range per tensor: a range per channel runs the forward and dL/dW dequantized in every
    # mode (tests/test_q8_act_ranges.py)
    ref, deq = pair(name, QuantConfig(grad_rounding="nearest", act_ranges="tensor"))
    _, other = pair(name, QuantConfig(grad_rounding="nearest", gemm=mode, act_ranges="tensor"))
    deq, other = deq.to(device), other.to(device)
    x = inputs(name, device).relu()
    gy = torch.randn(ref.to(device)(x).shape, generator=torch.Generator().manual_seed(4))
    gy = gy.to(device)
    out = []
    for layer in (deq, other):
        xi = x.clone().requires_grad_(True)
        with CountIntMM() as count:
            y = layer(xi)
            y.backward(gy)
        out.append((y.detach(), xi.grad, layer.weight.grad))
    (y_d, gx_d, gw_d), (y_m, gx_m, gw_m) = out
    exact = mode == "int8" and name == "conv1d-1x1"
    assert (count.calls == 2) == exact  # forward and dL/dx
    bf16 = 0.0 if exact else 2.0**-8

    xi, sx = _centred(x, 8)
    wi, sw = _centred(deq.weight.detach(), 8)
    K = products_per_output(deq)
    A_y = convolution(deq, xi.abs(), wi.abs()) * sx * sw
    product = (y_d - deq.bias.detach().view(1, -1, *[1] * (x.dim() - 2))).abs().double()
    tol = bf16 * (product + 2 * K * EPS * A_y) + (2 * K + 8) * EPS * (A_y + y_d.abs().double())
    assert ((y_m.double() - y_d.double()).abs() <= tol + 1e-30).all()
    if not exact:  # the bound is not vacuous: bf16's rounding shows
        assert not torch.equal(y_m, y_d)

    # the backward's convolutions on a "same" conv's padded input, as the twin runs them
    x_pad, padding = q8.layers.explicit_padding(x, deq.padding, deq.dilation, deq.kernel_size)
    args = (list(deq.stride), list(padding), list(deq.dilation), deq.transposed,
            list(deq.output_padding), deq.groups)
    g8, s8 = _centred(gy, 8)
    A_x = torch.ops.aten.convolution_backward(
        g8.abs(), x_pad.double(), wi.abs(), None, *args, [True, False, False])[0] * s8 * sw
    K_x = deq.out_channels // deq.groups * math.prod(deq.kernel_size)
    A_x = _crop_like(A_x, gx_d, deq, x)
    tol = bf16 * (gx_d.abs().double() + 2 * K_x * EPS * A_x) + (2 * K_x + 8) * EPS * A_x
    assert ((gx_m.double() - gx_d.double()).abs() <= tol + 1e-30).all()

    g16, s16 = _centred(gy, 16)
    hi = torch.floor(g16 / 256)
    split = 256 * hi.abs() + (g16 - 256 * hi).abs()  # what the two bf16 outputs round
    xq, _ = _centred(x_pad, 8)
    A_w = torch.ops.aten.convolution_backward(
        split, xq.abs(), wi, None, *args, [False, True, False])[1] * s16 * sx
    K_w = gy.numel() // gy.shape[1] if not deq.transposed else x.numel() // x.shape[1]
    tol = 2.0**-8 * A_w * (1 + 2 * K_w * EPS) + (2 * K_w + 8) * EPS * A_w
    assert ((gw_m.double() - gw_d.double()).abs() <= tol + 1e-30).all()


def _crop_like(a: torch.Tensor, like: torch.Tensor, layer: nn.Module,
               x: torch.Tensor) -> torch.Tensor:
    """A bound on the padded input of a "same" conv, cut back to the input (the pad's start)."""
    if a.shape == like.shape:
        return a
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    index = tuple(slice(t // 2, t // 2 + n) for t, n in zip(total, x.shape[2:]))
    return a[(slice(None), slice(None), *index)]


@pytest.mark.parametrize("name", ["convT1d", "convT2d", "convT3d"])
def test_per_channel_weights_keep_a_transposed_forward_dequantized(name):
    """A transposed convolution's weight has its input channels first, the dimension that
    per-channel ranges follow: their scales vary inside each output's sum, so codes runs that
    GEMM on the dequantized values, the same floats as the dequantized mode."""
    cfg = QuantConfig(per_channel_weights=True)
    _, deq = pair(name, cfg)
    _, codes = pair(name, dataclasses.replace(cfg, gemm="codes"))
    x = inputs(name, "cpu")
    assert torch.equal(codes(x), deq(x))


def test_state_dict_keys_are_the_originals_plus_the_input_range():
    for name in LAYERS:
        ref, q = pair(name, QuantConfig())
        assert set(q.state_dict()) == set(ref.state_dict()) | {"act_range", "act_range_steps"}
        q.load_state_dict(ref.state_dict(), strict=True)  # an fp32 checkpoint loads


def test_conv_transpose_output_size_and_unbatched_input_work():
    """ConvTranspose's forward(x, output_size) picks output_padding; F.conv1d takes an
    unbatched (C, L) input: the twins do both, with the float layer's shapes."""
    ref, q = pair("convT2d", QuantConfig())
    x = inputs("convT2d", "cpu")
    size = [s + 1 for s in ref(x).shape[2:]]
    assert q(x, output_size=size).shape == ref(x, output_size=size).shape
    ref, q = pair("conv1d-same", QuantConfig())
    x = inputs("conv1d-same", "cpu")[0]
    y = q(x.requires_grad_())
    y.sum().backward()
    assert y.shape == ref(x).shape and x.grad.shape == x.shape


def test_quantize_model_swaps_every_conv_and_dequantize_model_gives_them_back():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ConvTranspose3d(4, 4, 2, 2),
                             nn.Flatten(1, 2), nn.Conv2d(32, 8, 1), nn.ConvTranspose2d(8, 8, 3),
                             nn.Flatten(2), nn.Conv1d(8, 8, 3, padding="same"),
                             nn.ConvTranspose1d(8, 2, 3))

    model = quantize_model(make(), QuantConfig())
    assert all(isinstance(m, QuantLayerMixin) for m in model if not isinstance(m, nn.Flatten))
    assert not model.q8_report.kept
    x = torch.randn(2, 3, 4, 5, 5)
    model(x).square().mean().backward()
    float_model = q8.dequantize_model(model)
    assert [type(m) for m in float_model] == [type(m) for m in make()]
    assert set(float_model.state_dict()) == set(make().state_dict())


def test_every_gemm_of_n_d_and_transposed_convs_counts_as_quantized():
    """q8.coverage sees aten.convolution and its backward of every dimension and transposed:
    all on quantized operands, and the FLOPs torch's own counter gives the float model."""
    from torch.utils.flop_counter import FlopCounterMode

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(4, 8, 3, padding="same"), nn.ConvTranspose1d(8, 8, 2, 2),
                             nn.Unflatten(2, (4, 5)), nn.ConvTranspose2d(8, 8, 3),
                             nn.Unflatten(2, (2, 3)), nn.Conv3d(8, 4, 1))

    x = torch.randn(4, 4, 10)
    for per_channel in (False, True):
        report = q8.coverage(quantize_model(make(), QuantConfig(per_channel_weights=per_channel)),
                             x)
        assert report.share("forward") == report.share("backward") == 1.0, report.summary()
    with FlopCounterMode(display=False) as counter:
        make()(x).sum().backward()
    assert sum(g.flops for g in report.gemms) == counter.get_total_flops()


def test_ecaresnet26t_is_fully_converted_and_trains_a_step():
    """timm's ECA attention is a gate whose branch is a Conv1d over channels (padding
    (k - 1) // 2): with gates="8bit" it is quantized too, and nothing with parameters is left
    in full precision; the default keeps that branch in fp32."""
    timm = pytest.importorskip("timm")
    default = quantize_model(timm.create_model("ecaresnet26t", num_classes=10), QuantConfig())
    kept = [k for k in default.q8_report.kept if k[1] == "Conv1d"]
    assert kept and all(k[2].startswith("squeeze-excitation branch") for k in kept)
    torch.manual_seed(0)
    model = quantize_model(timm.create_model("ecaresnet26t", num_classes=10),
                           QuantConfig(gates="8bit"))
    assert not model.q8_report.kept
    assert sum(type(m).__name__ == "QuantConv1d" for m in model.modules()) > 0
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
