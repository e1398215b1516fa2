"""Gradient bifurcation: one GEMM forward; g_l at grad_bits for dL/dx, wgrad_bits for dL/dW.
Every test runs on each kernel backend."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from q8 import QuantConfig, QuantConv2d, QuantLinear
from q8.kernels.reference import minmax, qparams
from tests.conftest import device_of

GRADS_ONLY = dict(weight_bits=None, act_bits=None, grad_rounding="stochastic")


def sqnr_db(ref, approx):
    return 10 * math.log10(ref.pow(2).sum() / (approx - ref).pow(2).sum())


def expected_sqnr_db(g, bits):
    """Stochastic rounding adds noise of variance E[p(1-p)] s^2 = s^2/6 per element; an
    i.i.d. upstream gradient g keeps that SQNR through the linear maps dL/dx and dL/dW."""
    s = qparams(*minmax(g), bits)[0]
    return 10 * math.log10(g.pow(2).mean() / (s * s / 6))


def conv_pair(config, backend, **kw):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(16, 32, 3, padding=1, **kw)
    q = QuantConv2d(16, 32, 3, padding=1, q8_config=dataclasses.replace(config, backend=backend),
                    **kw)
    q.load_state_dict(ref.state_dict())
    dev = device_of(backend)
    return ref.to(dev), q.to(dev)


def grads(layer, x, g_out):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    layer(x).backward(g_out)
    return x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("wgrad_bits", [16, None])
def test_data_path_at_8_bits_weight_path_at_wgrad_bits(backend, wgrad_bits):
    ref, q = conv_pair(QuantConfig(grad_bits=8, wgrad_bits=wgrad_bits, **GRADS_ONLY), backend)
    dev = device_of(backend)
    x = torch.randn(32, 16, 12, 12, device=dev)
    g = torch.randn(32, 32, 12, 12, device=dev)  # an i.i.d. upstream gradient
    gx_ref, gw_ref, gb_ref = grads(ref, x, g)
    gx, gw, gb = grads(q, x, g)
    want8 = expected_sqnr_db(g, 8)
    assert abs(sqnr_db(gx_ref, gx) - want8) < 1.5
    if wgrad_bits is None:  # the fp32 copy: dL/dW is exactly the fp32 result
        torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(gb, gb_ref, rtol=1e-6, atol=0)
    else:
        want16 = expected_sqnr_db(g, 16)
        assert abs(sqnr_db(gw_ref, gw) - want16) < 1.5
        assert sqnr_db(gw_ref, gw) - sqnr_db(gx_ref, gx) > 40  # 8 bits apart = 48 dB


def test_no_bifurcation_puts_both_paths_at_8_bits(backend):
    ref, q = conv_pair(QuantConfig(grad_bits=8, wgrad_bits=8, **GRADS_ONLY), backend)
    dev = device_of(backend)
    x, g = torch.randn(32, 16, 12, 12, device=dev), torch.randn(32, 32, 12, 12, device=dev)
    gx_ref, gw_ref, _ = grads(ref, x, g)
    gx, gw, _ = grads(q, x, g)
    want8 = expected_sqnr_db(g, 8)
    assert abs(sqnr_db(gx_ref, gx) - want8) < 1.5
    assert abs(sqnr_db(gw_ref, gw) - want8) < 1.5


def test_linear_bifurcation_over_leading_dims(backend):
    torch.manual_seed(0)
    dev = device_of(backend)
    ref = torch.nn.Linear(64, 48)
    cfg = QuantConfig(grad_bits=8, wgrad_bits=16, backend=backend, **GRADS_ONLY)
    q = QuantLinear(64, 48, q8_config=cfg)
    q.load_state_dict(ref.state_dict())
    ref, q = ref.to(dev), q.to(dev)
    x, g = torch.randn(8, 50, 64, device=dev), torch.randn(8, 50, 48, device=dev)
    gx_ref, gw_ref, _ = grads(ref, x, g)
    gx, gw, _ = grads(q, x, g)
    assert abs(sqnr_db(gx_ref, gx) - expected_sqnr_db(g, 8)) < 1.5
    assert abs(sqnr_db(gw_ref, gw) - expected_sqnr_db(g, 16)) < 1.5


def test_full_precision_layer_matches_fp32_exactly(backend):
    cfg = QuantConfig(weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None)
    ref, q = conv_pair(cfg, backend, groups=4)
    dev = device_of(backend)
    x, g = torch.randn(4, 16, 9, 9, device=dev), torch.randn(4, 32, 9, 9, device=dev)
    torch.testing.assert_close(q(x), ref(x), rtol=0, atol=0)
    for a, b in zip(grads(q, x, g), grads(ref, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


class CountConvolutions(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.forward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward += 1
        return func(*args, **(kwargs or {}))


def test_forward_runs_one_convolution(backend):
    _, q = conv_pair(QuantConfig(), backend)
    x = torch.randn(2, 16, 8, 8, device=device_of(backend), requires_grad=True)
    with CountConvolutions() as count:
        y = q(x)
    assert count.forward == 1
    y.sum().backward()
    assert x.grad is not None and q.weight.grad is not None


@pytest.mark.parametrize("kw", [dict(groups=16), dict(stride=2, dilation=2), dict(bias=False)])
def test_quantized_conv_forward_matches_fake_quantized_reference(backend, kw):
    from q8 import fake_quantize

    cfg = QuantConfig(per_channel_weights=True)
    ref, q = conv_pair(cfg, backend, **kw)
    x = torch.randn(4, 16, 10, 10, device=device_of(backend))
    want = F.conv2d(fake_quantize(x, 8, dim=1), fake_quantize(ref.weight, 8, dim=0), ref.bias,
                    ref.stride, ref.padding, ref.dilation, ref.groups)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)


def test_running_range_used_in_eval_and_round_trips_through_state_dict(backend):
    _, q = conv_pair(QuantConfig(act_momentum=0.5, act_ranges="tensor"), backend)
    dev = device_of(backend)
    for scale in (1.0, 3.0):
        q(torch.rand(4, 16, 6, 6, device=dev) * scale)
    lo, hi = q.act_range
    assert lo.item() >= 0 and 1.0 < hi.item() < 3.0  # EMA of ~1 and ~3
    q.eval()
    x = torch.rand(4, 16, 6, 6, device=dev) * 10  # beyond the running range: clipped in eval
    y = q(x)
    _, q2 = conv_pair(QuantConfig(act_momentum=0.5, act_ranges="tensor"), backend)
    q2.load_state_dict(q.state_dict())
    q2.eval()
    assert torch.equal(q2(x), y)


def test_a_loaded_state_dict_decides_whether_the_running_range_is_used(backend):
    """A twin that has trained (running range in use) loads a fresh twin's state: in eval it
    must go back to the batch's own range, as the fresh twin does."""
    dev = device_of(backend)
    _, trained = conv_pair(QuantConfig(), backend)
    trained(torch.rand(4, 16, 6, 6, device=dev))
    _, fresh = conv_pair(QuantConfig(), backend)
    trained.load_state_dict(fresh.state_dict())
    x = torch.randn(4, 16, 6, 6, device=dev)
    assert torch.equal(trained.eval()(x), fresh.eval()(x))


def test_fp32_state_dict_loads_strictly_into_a_twin():
    ref, q = conv_pair(QuantConfig(), "reference")
    q.load_state_dict(ref.state_dict(), strict=True)
    assert set(ref.state_dict()) < set(q.state_dict())


@pytest.mark.parametrize("wgrad_bits", [16, 8, None])
def test_a_copy_the_backward_does_not_need_is_skipped_and_changes_nothing(backend, wgrad_bits):
    """The stem's input needs no dL/dx and a frozen layer no dL/dW: that copy of g_l is not
    quantized, and the other path gets the same floats (the same noise draw) as before."""
    config = QuantConfig(grad_bits=8, wgrad_bits=wgrad_bits, grad_rounding="stochastic")
    _, q = conv_pair(config, backend)
    dev = device_of(backend)
    x, g = torch.randn(8, 16, 10, 10, device=dev), torch.randn(8, 32, 10, 10, device=dev)

    def run(x_grad: bool, w_grad: bool):
        q.zero_grad()
        q.weight.requires_grad_(w_grad)
        q.bias.requires_grad_(w_grad)
        xi = x.clone().requires_grad_(x_grad)
        torch.manual_seed(1)
        q(xi).backward(g)
        return xi.grad, q.weight.grad

    gx_both, gw_both = run(True, True)
    gx_only, no_gw = run(True, False)
    no_gx, gw_only = run(False, True)
    assert no_gw is None and no_gx is None
    assert torch.equal(gx_only, gx_both) and torch.equal(gw_only, gw_both)
