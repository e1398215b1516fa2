"""The quantizer's contract (../shared/PAPER.md, "Quantizer"), each tolerance from the maths."""

import math

import pytest
import torch

from q8 import QuantConfig, fake_quantize
from q8.quantizer import aminmax, fake_quant, fake_quant_own_range, qparams, uniform16

BITS = [2, 4, 8, 16]
F32_EPS = torch.finfo(torch.float32).eps


def scale_of(x, bits, dim=None):
    return qparams(*aminmax(x, dim), bits)[0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])  # ranges holding 0, all positive, all negative
def test_nearest_error_at_most_half_a_step(bits, shift):
    x = torch.randn(4096) * 2 + shift
    s = scale_of(x, bits)
    err = (fake_quantize(x, bits) - x).abs().max()
    # plus float32 rounding of x / s and (q - z) * s: a few ulps of max|x|
    assert err <= s / 2 + 4 * F32_EPS * x.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_has_at_most_2_to_the_bits_values(bits):
    x = torch.randn(100_000) * 5 + 1
    assert fake_quantize(x, bits).unique().numel() <= 2**bits


def test_zero_is_exact_and_relu_zeros_stay_zero():
    x = torch.relu(torch.randn(1000))
    q = fake_quantize(x, 8)
    assert torch.equal(q[x == 0], torch.zeros_like(q[x == 0]))


def test_per_channel_uses_each_slice_range():
    x = torch.randn(16, 3, 3, 3) * torch.logspace(-3, 1, 16).view(-1, 1, 1, 1)
    q = fake_quantize(x, 8, dim=0)
    s = scale_of(x, 8, dim=0)
    assert ((q - x).abs() <= s / 2 + 4 * F32_EPS * x.abs().amax((1, 2, 3), keepdim=True)).all()
    # a per-tensor scale would erase the small channels entirely
    assert (fake_quantize(x, 8)[0] == 0).all() and not (q[0] == 0).all()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("value", [0.0, 1.5, -2.25, 1e-30, 3e5])
def test_zero_range_returns_input_exactly(rounding, value):
    x = torch.full((7, 5), value)
    q = fake_quantize(x, 8, rounding=rounding)
    assert torch.equal(q, x)


def test_constant_slice_with_per_channel_is_exact():
    x = torch.randn(4, 10)
    x[1] = 0.0
    x[2] = -0.7
    q = fake_quantize(x, 8, dim=0)
    assert torch.equal(q[1:3], x[1:3]) and not q.isnan().any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_propagates_as_nan(bad):
    x = torch.randn(100)
    x[3] = bad
    for rounding in ("nearest", "stochastic"):
        assert fake_quantize(x, 8, rounding=rounding).isnan().all()


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
def test_stochastic_rounding_is_unbiased_at_rate_sigma_over_sqrt_n(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, generator=g)
    sigma = _rounding_sigma(x, bits)
    for n in (64, 1024):
        draws = torch.stack([fake_quantize(x, bits, "stochastic", generator=g) for _ in range(n)])
        err = draws.double().mean(0) - x
        # each element's mean is within Bernstein's bound (a Bernoulli per element)...
        s = scale_of(x, bits)
        # (+ the 16-bit noise's bias, at most 2^-17 of a step)
        tol = bernstein(sigma, s, n) + s * 2**-17 + 4 * F32_EPS * x.abs().max()
        assert (err.abs() <= tol).all()
        # ...and the RMS error over elements is sigma/sqrt(N): 2048 elements give ~1.6% noise
        ratio = err.pow(2).mean().sqrt() / (sigma.pow(2).mean().sqrt() / math.sqrt(n))
        assert 0.9 < ratio < 1.1


def test_uniform16_is_uniform_on_the_2_to_16_midpoints_in_every_lane():
    n = 1 << 20
    u = uniform16(torch.empty(n), torch.Generator().manual_seed(0)).double()
    k = u * 2**16 - 0.5
    assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 2**16 - 1
    assert k.unique().numel() == 2**16  # P(2^20 draws miss a level) ~ 7e-3
    # each of the four 16-bit lanes of a 64-bit draw (all 64 bits used): mean 1/2, sd
    # 1/sqrt(12); 6 standard errors
    lanes = u.view(-1, 4).mean(0)
    assert ((lanes - 0.5).abs() < 6 / math.sqrt(12 * n / 4)).all()
    assert u.shape == (n,) and uniform16(torch.empty(3, 5, dtype=torch.float64)).shape == (3, 5)


def test_stochastic_rounding_error_is_below_one_step():
    x = torch.randn(10_000)
    s = scale_of(x, 8)
    assert ((fake_quantize(x, 8, "stochastic") - x).abs() < s + 4 * F32_EPS * x.abs().max()).all()


def test_stochastic_rounding_is_reproducible_with_a_seeded_generator():
    x = torch.randn(1000)
    a = fake_quantize(x, 4, "stochastic", generator=torch.Generator().manual_seed(1))
    b = fake_quantize(x, 4, "stochastic", generator=torch.Generator().manual_seed(1))
    c = fake_quantize(x, 4, "stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stochastic_rounding_on_cuda():
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


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="wbits"):
        QuantConfig.from_dict({"wbits": 8})
    assert QuantConfig.from_dict(QuantConfig().to_dict()) == QuantConfig()


def test_fake_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounding"):
        fake_quantize(torch.randn(3), 8, rounding="floor")
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(torch.randn(3), 1)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("dim", [None, 0])
def test_fake_quant_over_its_own_range_equals_fake_quant_exactly(bits, dim):
    """The weights' 3-pass fake quantization clips nothing, so it is fake_quant to the bit."""
    g = torch.Generator().manual_seed(bits)
    cases = [torch.randn(64, 3, 3, 3, generator=g) * 10.0**e for e in (-30, -3, 0, 3, 30)]
    cases += [torch.rand(64, 9, generator=g) + 0.5, -torch.rand(64, 9, generator=g) - 0.5,
              torch.full((8, 5), -2.5), torch.full((8, 5), 3.0), torch.zeros(8, 5),
              torch.randn(64, 9, generator=g).round(), torch.randn(1, 1, generator=g)]
    for _ in range(20):  # ranges whose ends fall on or near grid points
        x = torch.randint(-300, 300, (32, 17), generator=g).float() / 7
        cases.append(x + torch.randn(32, 17, generator=g) * 1e-6)
    for x in cases:
        scale, zero_point = qparams(*aminmax(x, dim), bits)
        assert torch.equal(fake_quant_own_range(x, scale), fake_quant(x, scale, zero_point, bits))
    bad = torch.tensor([1.0, float("nan"), -2.0])
    scale, zero_point = qparams(*aminmax(bad), bits)
    assert fake_quant_own_range(bad, scale).isnan().all()


@pytest.mark.parametrize("bits", [2, 8, 16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_fake_quant_is_the_dequantized_code_to_the_bit(bits, stochastic):
    """fake_quant computes (clamp(round(x/s) + z, 0, 2^B-1) - z) * s without adding z, and
    x/s + u as one addcdiv: the same floats, clipped ranges (ends inside x) included."""
    g = torch.Generator().manual_seed(bits)
    for e in (-30, -3, 0, 3, 30):
        x = torch.randn(32, 33, generator=g) * 10.0**e
        x[0, :2] = torch.stack([torch.tensor(0.0), 1e6 * x.abs().max()])  # far outside a range
        for shrink in (1.0, 0.5, 1e-4):
            scale, zero_point = qparams(*torch.aminmax(x * shrink), bits)
            noise = uniform16(x, g) if stochastic else None
            y = x / scale
            y = y.add_(noise).floor_() if stochastic else y.round_()
            want = y.add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)
            assert torch.equal(fake_quant(x, scale, zero_point, bits, noise), want)
            if stochastic:  # the noise may also be overwritten in place
                assert torch.equal(fake_quant(x, scale, zero_point, bits, noise, True), want)


def test_qparams_of_one_range_on_the_host_is_the_tensor_arithmetic_to_the_bit():
    """A 0-d range on a CPU takes NumPy's float32 scalar path: the same scale and zero point
    bits as the tensor path (signed zeros, subnormals, overflow, inf and NaN included)."""
    special = [0.0, -0.0, 1e-45, -1e-45, 1e-38, 1.0, -1.0, 2.5, -3.0, 1 / 3, 3.4e38, -3.4e38,
               float("inf"), float("-inf"), float("nan")]
    g = torch.Generator().manual_seed(0)
    values = torch.tensor(special + (torch.randn(40, generator=g) * 10.0 ** torch.randint(
        -40, 38, (40,), generator=g)).tolist())
    for lo in values:
        for hi in values:
            for bits in (2, 8, 16):
                host = qparams(lo, hi, bits)  # 0-d: host path
                tensor = qparams(lo.view(1), hi.view(1), bits)
                for a, b in zip(host, tensor, strict=True):
                    assert a.dim() == 0 and a.dtype == b.dtype == torch.float32
                    assert a.view(1).view(torch.int32) == b.view(torch.int32)
