"""q8's fused CPU kernels (q8/csrc/cpu_kernels.cpp) against the PyTorch ops they replace.

The elementwise kernels do the same float operations in the same order as the PyTorch path, so
they must agree to the bit (with the same hash noise: `seed`). Range BN's kernels sum planes in
another order (8 float lanes, then double): there the bound is float summation's, n * 2^-24 of
the sum of magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 4.2).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import q8
import q8.quantizer as qq
from q8 import cpu_kernels
from q8.functional import (
    GradSpec,
    ReLUFn,
    _grad_pair,
    _mask_grad,
    _pack_positive,
    quantize_grad,
    quantize_weight,
)
from q8.norm import RangeBatchNorm2d

ops = cpu_kernels.load()
pytestmark = pytest.mark.skipif(ops is None, reason="the CPU kernels do not build here")
SEED = 0x2545F4914F6CDD1D


def test_kernels_build_where_a_compiler_is() -> None:
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja")
    assert ops is not None


def _grad_like(shape: tuple, seed: int = 0) -> torch.Tensor:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e-3
    g.view(-1)[::7] = 0.0  # exact zeros, as ReLU's backward makes
    return g


@pytest.mark.parametrize("bits,wbits", [(8, 16), (8, 8), (4, 12)])
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("numel", [1, 13, 40_003])  # not a multiple of 8 or of a task
def test_grad_pair_equals_the_pytorch_quantizer(bits: int, wbits: int, stochastic: bool,
                                                numel: int) -> None:
    g = _grad_like((numel,))
    noise = torch.tensor(SEED) if stochastic else None
    ref = _grad_pair.eager(g, bits, wbits, noise, True, True)
    out = ops.grad_pair(g, bits, wbits, SEED, stochastic, True, True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    if bits == wbits:
        assert out[0] is out[1]


def test_grad_pair_skips_the_copy_a_backward_does_not_need() -> None:
    g = _grad_like((1000,))
    data, weight = ops.grad_pair(g, 8, 16, SEED, True, False, True)
    assert data is None
    assert torch.equal(weight, _grad_pair.eager(g, 8, 16, torch.tensor(SEED), False, True)[1])


def test_a_nan_gradient_makes_every_value_nan() -> None:
    g = _grad_like((100,))
    g[37] = float("nan")
    data, weight = ops.grad_pair(g, 8, 16, SEED, True, True, True)
    assert data.isnan().all() and weight.isnan().all()


def test_quantize_grad_uses_the_kernel_and_keeps_the_hash_stream() -> None:
    """With the kernels on, rounding noise is a hash seed drawn from torch's generator: one
    draw per call, so seeding reproduces a run and the PyTorch path gives the same values."""
    g = _grad_like((4, 8, 5, 5))
    spec = GradSpec(8, 16, "stochastic")
    torch.manual_seed(3)
    out = quantize_grad(g, spec)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, ())
    ref = _grad_pair.eager(g, 8, 16, seed, True, True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_codes_and_dequantize_equal_the_pytorch_path() -> None:
    x = torch.randn(3, 5, 7, 11).relu_()
    lo, hi = torch.aminmax(x)
    out = ops.quantize_codes(x, lo, hi, 8)
    ref = qq.quantize_codes.eager(x, lo, hi, 8)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    codes, _, scale, zero_point = out
    assert torch.equal(ops.dequantize(codes, scale, zero_point),
                       qq.dequantize.eager(codes, scale, zero_point))


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 33)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_equal_the_pytorch_path(shape: tuple, per_channel: bool) -> None:
    w = torch.randn(shape)
    w_hat, scale = ops.quantize_weight(w, 8, per_channel)
    cpu_kernels.set_enabled(False)
    try:
        ref_hat, (ref_scale,) = quantize_weight(w, 8, per_channel)
    finally:
        cpu_kernels.set_enabled(None)
    assert torch.equal(scale, ref_scale) and torch.equal(w_hat, ref_hat)
    assert torch.equal(ops.requantize_weight(w, scale), w_hat)


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_mask_equals_the_pytorch_path(inplace: bool) -> None:
    x = torch.randn(1001)  # a partial last byte
    x[3], x[4] = float("nan"), -0.0
    x0 = x.clone()
    y = x if inplace else torch.empty_like(x)
    packed = ops.relu_pack(x, y)
    assert torch.equal(packed, _pack_positive(x0.clamp(min=0)))
    assert torch.allclose(y, x0.clamp(min=0), equal_nan=True)
    assert inplace or torch.allclose(x, x0, equal_nan=True)  # the input is left alone
    gy = torch.randn(1001)
    gy[5] = float("nan")
    assert torch.allclose(ops.relu_mask_grad(gy, packed), _mask_grad(gy, packed), equal_nan=True)


def test_relu_fn_gradient_through_the_kernel() -> None:
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = ReLUFn.apply(x * 1.0, True)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (x > 0).float())


def test_range_bn_sums_within_float_summation_bound() -> None:
    """Per plane: the sums of g and of g * (x_hat - mean), g rounded as grad_pair rounds it
    (the same seed), against float64; ties at the chunk extremes counted exactly."""
    B, C, H, W = 8, 6, 5, 7
    x = torch.randn(B, C, H, W)
    codes, scale, zero_point, _, smin, smax = ops.range_bn_stats(x, *torch.aminmax(x), 8)
    gy, mean = _grad_like((B, C, H, W)), torch.randn(C) * 0.1
    s_g, s_gx, n_max, n_min, _, _ = ops.range_bn_grad_sums(
        codes, scale, zero_point, gy, mean, smax, smin, 8, SEED, True)
    g = ops.grad_pair(gy, 8, 8, SEED, True, True, False)[0].view(B, C, -1)
    x_hat = ops.dequantize(codes, scale, zero_point).view(B, C, -1)
    terms = {"g": g, "gx": g * (x_hat - mean.view(1, C, 1))}  # float32 products, as the kernel
    n = H * W
    for name, got in (("g", s_g), ("gx", s_gx)):
        t = terms[name].double()
        assert ((got.double() - t.sum(-1)).abs() <= n * 2.0**-24 * t.abs().sum(-1)).all(), name
    assert torch.equal(n_max, (x_hat == smax.unsqueeze(-1)).sum(-1).float())
    assert torch.equal(n_min, (x_hat == smin.unsqueeze(-1)).sum(-1).float())


def _range_bn_step(native: bool, shape: tuple) -> tuple:
    """One training step of a Range BN layer, with the kernels (native) or the PyTorch ops;
    both round g_l with the same hash noise."""
    cpu_kernels.set_enabled(native)
    compile_enabled = qq.compile_enabled
    qq.compile_enabled = lambda: True  # the PyTorch path's hash noise (only rounding_noise)
    try:
        torch.manual_seed(0)
        bn = RangeBatchNorm2d(shape[1], q8_config=q8.QuantConfig())
        x = (torch.randn(shape) * 3 + 1).requires_grad_()
        y = bn(x)
        y.backward(torch.randn_like(y))
        return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean
    finally:
        qq.compile_enabled = compile_enabled
        cpu_kernels.set_enabled(None)


@pytest.mark.parametrize("shape", [(64, 16, 8, 8), (32, 64, 1, 1), (7, 3, 5, 5), (4, 8, 2, 2)])
def test_range_bn_layer_agrees_with_the_pytorch_path(shape: tuple) -> None:
    """Forward, backward and running statistics: the two paths differ only in the order of
    the per-channel sums over n values, which moves a result by at most n * 2^-24 of the sum
    of its terms' magnitudes. The terms here have random signs, so that sum is about sqrt(n)
    times the result's magnitude."""
    out, ref = _range_bn_step(True, shape), _range_bn_step(False, shape)
    n = shape[0] * shape[2] * shape[3]
    for a, b in zip(out, ref):
        assert (a - b).abs().max() <= n * 2.0**-24 * n**0.5 * b.abs().max()


def test_range_bn_kernels_do_not_depend_on_the_thread_count() -> None:
    """Each plane is reduced by one thread and the rest is elementwise: 1 and 2 threads give
    the same bits."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _range_bn_step(True, (64, 32, 8, 8))
        torch.set_num_threads(2)
        two = _range_bn_step(True, (64, 32, 8, 8))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_q8_falls_back_to_pytorch_ops_when_the_kernels_do_not_build(monkeypatch) -> None:
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpu_kernels.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert not cpu_kernels.usable(torch.zeros(1))
        g_data, g_w = quantize_grad(_grad_like((10,)), GradSpec(8, 16, "stochastic"))
        assert g_data.shape == (10,) and g_w.shape == (10,)
    finally:
        monkeypatch.undo()
        cpu_kernels.load.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_kernels.load() is not None


def test_q8_cpu_kernels_env_turns_them_off(monkeypatch) -> None:
    monkeypatch.setenv("Q8_CPU_KERNELS", "0")
    assert not cpu_kernels.usable(torch.zeros(1))
    monkeypatch.setenv("Q8_CPU_KERNELS", "1")
    assert cpu_kernels.usable(torch.zeros(1))
    assert not cpu_kernels.usable(torch.zeros(1, dtype=torch.float64))
