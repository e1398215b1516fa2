"""The quantizer's contract (Banner et al. 2018: GEMMLOWP-style, asymmetric, uniform) on every
kernel backend, each tolerance from the maths: inputs (nearest, over a given range), weights
(nearest, per tensor or per channel) and the g_l pair (stochastic), through the backend's own
ops."""

import math

import pytest
import torch

from q8 import QuantConfig, fake_quantize
from q8.kernels import load
from q8.kernels.reference import draw_seed, minmax, qparams, uniform
from tests.conftest import device_of

BITS = [2, 4, 8, 16]
F32_EPS = torch.finfo(torch.float32).eps


def scale_of(x, bits, dim=None):
    return qparams(*minmax(x, dim), bits)[0]


def quantize(backend, x, bits):
    """x_hat of x over its own range, nearest, by the backend's input quantizer."""
    return load(backend).quantize_input(x, *minmax(x), bits)[0]


def stochastic(backend, x, bits, seed):
    """x_hat of x over its own range, stochastic rounding, by the backend's g_l quantizer."""
    return load(backend).grad_pair(x, bits, bits, seed)[0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])  # ranges holding 0, all positive, all negative
def test_nearest_error_at_most_half_a_step(backend, bits, shift):
    x = (torch.randn(4096) * 2 + shift).to(device_of(backend))
    s = scale_of(x, bits)
    err = (quantize(backend, x, bits) - x).abs().max()
    # plus float32 rounding of x / s and (q - z) * s: a few ulps of max|x|
    assert err <= s / 2 + 4 * F32_EPS * x.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_has_at_most_2_to_the_bits_values(backend, bits):
    x = (torch.randn(100_000) * 5 + 1).to(device_of(backend))
    assert quantize(backend, x, bits).unique().numel() <= 2**bits


def test_zero_is_exact_and_relu_zeros_stay_zero(backend):
    x = torch.relu(torch.randn(1000)).to(device_of(backend))
    for q in (quantize(backend, x, 8), stochastic(backend, x, 8, seed=3)):
        assert (q[x == 0] == 0).all()


def test_per_channel_weights_use_each_slice_range(backend):
    w = (torch.randn(16, 3, 3, 3) * torch.logspace(-3, 1, 16).view(-1, 1, 1, 1)).to(
        device_of(backend))
    k = load(backend)
    q, _ = k.quantize_weight(w, 8, per_channel=True)
    s = scale_of(w, 8, dim=0)
    assert ((q - w).abs() <= s / 2 + 4 * F32_EPS * w.abs().amax((1, 2, 3), keepdim=True)).all()
    # a per-tensor scale erases the small channels entirely
    assert (k.quantize_weight(w, 8, per_channel=False)[0][0] == 0).all() and not (q[0] == 0).all()


@pytest.mark.parametrize("value", [0.0, 1.5, -2.25, 1e-30, 3e5])
def test_zero_range_returns_input_exactly(backend, value):
    x = torch.full((7, 5), value, device=device_of(backend))
    k = load(backend)
    assert torch.equal(quantize(backend, x, 8), x)
    assert torch.equal(stochastic(backend, x, 8, seed=11), x)
    assert torch.equal(k.quantize_weight(x, 8, per_channel=True)[0], x)


def test_constant_slice_with_per_channel_is_exact(backend):
    w = torch.randn(4, 10, device=device_of(backend))
    w[1] = 0.0
    w[2] = -0.7
    q, _ = load(backend).quantize_weight(w, 8, per_channel=True)
    assert torch.equal(q[1:3], w[1:3]) and not q.isnan().any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_propagates_as_nan(backend, bad):
    x = torch.randn(100, device=device_of(backend))
    x[3] = bad
    k = load(backend)
    assert quantize(backend, x, 8).isnan().all()
    for seed in (None, 5):
        data, weight = k.grad_pair(x, 8, 16, seed)
        assert data.isnan().all() and weight.isnan().all()


def _rounding_sigma(x, bits):
    # stochastic rounding of x: step s, fraction p above the lower code -> var = p(1-p) s^2
    s = scale_of(x, bits)
    p = (x / s).double()
    p = p - p.floor()
    return (p * (1 - p)).sqrt() * s


def bernstein(sigma, s, n, delta=1e-9):
    """|mean of n draws - x| bound at probability 1 - delta for a variable of spread s and
    std sigma: P(|err| >= e) <= 2 exp(-n e^2 / (2 sigma^2 + 2 s e / 3))."""
    t = math.log(2 / delta)
    a = s * t / (3 * n)
    return a + (a * a + 2 * sigma**2 * t / n).sqrt()


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_is_unbiased_at_rate_sigma_over_sqrt_n(backend, bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, generator=g).to(device_of(backend))
    sigma = _rounding_sigma(x, bits)
    s = scale_of(x, bits)
    for n in (64, 1024):
        draws = torch.stack([stochastic(backend, x, bits, draw_seed(g)) for _ in range(n)])
        err = draws.double().mean(0) - x
        # each element's mean is within Bernstein's bound (a Bernoulli per element), plus the
        # 24-bit noise's bias (at most 2^-24 of a step) and float32 rounding
        tol = bernstein(sigma, s, n) + s * 2**-24 + 4 * F32_EPS * x.abs().max()
        assert (err.abs() <= tol).all()
        # ...and the RMS error over elements is sigma/sqrt(N): 2048 elements give ~1.6% noise
        ratio = err.pow(2).mean().sqrt() / (sigma.pow(2).mean().sqrt() / math.sqrt(n))
        assert 0.9 < ratio < 1.1


def test_stochastic_rounding_error_is_below_one_step(backend):
    x = torch.randn(10_000, device=device_of(backend))
    s = scale_of(x, 8)
    err = (stochastic(backend, x, 8, seed=1) - x).abs()
    assert (err < s + 4 * F32_EPS * x.abs().max()).all()


def test_the_noise_is_uniform_on_the_2_to_24_grid():
    """u = hash(i + seed) / 2^24 for 2^20 consecutive indices: a chi-square test on 64 bins
    (63 degrees of freedom: mean 63, sd 11.2; 6 sd), every value on the grid, in [0, 1)."""
    u = uniform(torch.Size([1 << 20]), seed=123)
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)
    k = u.double() * 2**24
    assert torch.equal(k, k.round()) and u.min() >= 0 and u.max() < 1
    assert not torch.equal(u, uniform(torch.Size([1 << 20]), seed=124))


def test_stochastic_rounding_is_reproducible_with_a_seeded_generator():
    x = torch.randn(1000)
    a = fake_quantize(x, 4, "stochastic", generator=torch.Generator().manual_seed(1))
    b = fake_quantize(x, 4, "stochastic", generator=torch.Generator().manual_seed(1))
    c = fake_quantize(x, 4, "stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fake_quantize_on_cuda_with_a_cuda_generator():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, device="cuda")
    draws = torch.stack([fake_quantize(x, 8, "stochastic", generator=g) for _ in range(256)])
    sigma = _rounding_sigma(x, 8)
    bound = bernstein(sigma, scale_of(x, 8), 256) + 4 * F32_EPS * x.abs().max()
    assert ((draws.double().mean(0) - x).abs() <= bound).all()
    g2 = torch.Generator(device="cuda").manual_seed(0)
    assert torch.equal(draws[0], fake_quantize(x, 8, "stochastic", generator=g2))


def test_straight_through_gradient():
    x = torch.randn(50, requires_grad=True)
    w = torch.randn(50)
    (fake_quantize(x, 4) * w).sum().backward()
    assert torch.equal(x.grad, w)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"act_bits": 17}, "act_bits"),
        ({"grad_bits": 0}, "grad_bits"),
        ({"wgrad_bits": 4}, "wgrad_bits"),
        ({"grad_bits": None}, "wgrad_bits"),
        ({"grad_rounding": "up"}, "grad_rounding"),
        ({"bn": "layer"}, "bn"),
        ({"range_bn_scale": "x"}, "range_bn_scale"),
        ({"act_momentum": 0}, "act_momentum"),
        ({"range_bn_chunks": 0}, "range_bn_chunks"),
        ({"weight_bits": 8.0}, "weight_bits"),
        ({"backend": "tpu"}, "backend"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


def test_config_error_lists_valid_choices():
    with pytest.raises(ValueError, match="stochastic, nearest"):
        QuantConfig(grad_rounding="up")
    with pytest.raises(ValueError, match="2..16"):
        QuantConfig(weight_bits=1)
    with pytest.raises(ValueError, match="auto, reference, cpu, cuda"):
        QuantConfig(backend="gpu")


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="wbits"):
        QuantConfig.from_dict({"wbits": 8})
    assert QuantConfig.from_dict(QuantConfig().to_dict()) == QuantConfig()


def test_fake_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounding"):
        fake_quantize(torch.randn(3), 8, rounding="floor")
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(torch.randn(3), 1)
