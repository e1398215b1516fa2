"""Activation twins (GELU, SiLU, Hardswish, Hardsigmoid, Sigmoid, Tanh, Mish; timm's wrappers):
the forward is f(x) exactly, the backward g f'(x_hat) from one byte per element."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import q8
from q8 import QuantConfig, quantize_model
from q8.kernels.reference import fake_quant, minmax, qparams
from q8.layers import QuantActivationMixin, activation_kind
from tests.conftest import BACKENDS, backend_params, device_of

timm_act = pytest.importorskip("timm.layers.activations")


# The derivatives, written out (float64): what the twins' backward must equal at x_hat.
def _phi(x):
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _gelu_tanh_prime(x):
    c = math.sqrt(2 / math.pi)
    t = torch.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _mish_prime(x):
    t = torch.tanh(F.softplus(x))
    return t + x * (1 - t * t) * torch.sigmoid(x)


# PyTorch's values at the kinks: hardswish' is (2x + 3)/6 on [-3, 3], hardsigmoid' 1/6 on (-3, 3)
DERIVATIVES = {
    "gelu": lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * _phi(x),
    "gelu_tanh": _gelu_tanh_prime,
    "silu": lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
    "hardswish": lambda x: torch.where(x < -3, 0.0, torch.where(x <= 3, (2 * x + 3) / 6, 1.0)),
    "hardsigmoid": lambda x: torch.where((x > -3) & (x < 3), 1 / 6, 0.0),
    "mish": _mish_prime,
    "sigmoid": lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)),
    "tanh": lambda x: 1 - torch.tanh(x) ** 2,
}
# PyTorch's op of each function: the forward of every twin, timm's wrappers' too
NATIVE = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
          "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "mish": F.mish,
          "sigmoid": torch.sigmoid, "tanh": torch.tanh}
# sup |f''| over the reals: GELU phi(x)(2 - x^2) at 0 (its tanh form too), SiLU
# sigma'(x)(2 - x tanh(x/2)) at 0, sigma(1 - sigma)(1 - 2 sigma) at sigma = (3 -+ sqrt 3)/6,
# 2 tanh (1 - tanh^2) at tanh = 1/sqrt 3, Mish's numerically (about x = -0.088); the hard ones
# are piecewise linear/quadratic, with jumps of f' at the kinks +-3
MAX_SECOND = {"gelu": math.sqrt(2 / math.pi), "gelu_tanh": math.sqrt(2 / math.pi), "silu": 0.5,
              "hardswish": 1 / 3, "hardsigmoid": 0.0, "mish": 0.6443,
              "sigmoid": 1 / (6 * math.sqrt(3)), "tanh": 4 / (3 * math.sqrt(3))}
JUMP = {"hardswish": 0.5, "hardsigmoid": 1 / 6}  # |f'(3+) - f'(3-)|, the same at -3

MODULES = {  # name: a factory of the float module
    "GELU": nn.GELU,
    "GELU-tanh": lambda: nn.GELU(approximate="tanh"),
    "SiLU": nn.SiLU,
    "SiLU-inplace": lambda: nn.SiLU(inplace=True),
    "Hardswish": nn.Hardswish,
    "Hardswish-inplace": lambda: nn.Hardswish(inplace=True),
    "Hardsigmoid-inplace": lambda: nn.Hardsigmoid(inplace=True),
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "Mish": nn.Mish,
    "timm-GELU": timm_act.GELU,
    "timm-GELUTanh": timm_act.GELUTanh,
    "timm-Swish-inplace": lambda: timm_act.Swish(inplace=True),
    "timm-HardSwish": timm_act.HardSwish,
    "timm-HardSigmoid-inplace": lambda: timm_act.HardSigmoid(inplace=True),
    "timm-Sigmoid-inplace": lambda: timm_act.Sigmoid(inplace=True),
    "timm-Tanh": timm_act.Tanh,
    "timm-Mish": timm_act.Mish,
}
FLOAT_EPS = 2.0**-18  # float32's evaluation of f' (terms of magnitude ~1, a few ops of 2^-24)


def twin(name: str, backend: str = "reference", **config) -> nn.Module:
    module = quantize_model(nn.Sequential(MODULES[name]()),
                            QuantConfig(backend=backend, **config))[0]
    assert isinstance(module, QuantActivationMixin) == (config.get("act_bits", 8) is not None)
    return module


def data(device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x over about [-12, 12] (both kinks of the hard functions, the tails of the others) and
    an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(32, 16, 40, generator=g)).to(device), \
        torch.randn(32, 16, 40, generator=g).to(device)


def run(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output and dL/dx; the input goes in through a multiplication, so that an in-place
    activation may overwrite it."""
    leaf = x.clone().requires_grad_(True)
    y = module(leaf * 1.0)
    y.backward(gy)
    return y.detach(), leaf.grad


@pytest.mark.parametrize("name", MODULES)
def test_forward_is_f_and_backward_is_g_times_f_prime_of_x_hat(backend, name):
    """x_hat is the layer inputs' quantizer of x over its own [min, max] (8 bits, nearest)."""
    kind = activation_kind(MODULES[name]())
    x, gy = data(device_of(backend))
    y, gx = run(twin(name, backend), x, gy)
    assert torch.equal(y, NATIVE[kind](x))
    x_hat = fake_quant(x, *minmax(x), 8).double()
    want = gy.double() * DERIVATIVES[kind](x_hat)
    assert ((gx.double() - want).abs() <= FLOAT_EPS * gy.double().abs()).all()


@pytest.mark.parametrize("name", MODULES)
def test_gradient_error_is_bounded_by_the_step(name):
    """|f'(x_hat) - f'(x)| <= sup|f''| s/2 (mean value theorem, |x_hat - x| <= s/2); within s/2
    of a kink of Hardswish or Hardsigmoid, f' may be the other side's slope (plus the jump)."""
    kind = activation_kind(MODULES[name]())
    x, gy = data(seed=1)
    _, gx = run(twin(name), x, gy)
    s = qparams(*minmax(x), 8)[0].double()
    exact = gy.double() * DERIVATIVES[kind](x.double())
    slope = MAX_SECOND[kind] * s / 2
    near_kink = ((x.double().abs() - 3).abs() <= s / 2) if kind in JUMP else x < -math.inf
    bound = gy.double().abs() * (slope + torch.where(near_kink, JUMP.get(kind, 0.0), 0.0)
                                 + FLOAT_EPS)
    assert ((gx.double() - exact).abs() <= bound).all()
    if MAX_SECOND[kind] > 0:  # the approximation is there to bound: f' of x_hat, not of x
        assert not torch.allclose(gx.double(), exact, rtol=0, atol=FLOAT_EPS)


def test_the_second_derivative_bounds_hold():
    """MAX_SECOND against f'' by autograd (float64) on a fine grid of [-20, 20]."""
    t = torch.linspace(-20, 20, 400_001, dtype=torch.float64, requires_grad=True)
    for kind, f_prime in DERIVATIVES.items():
        d1 = f_prime(t)  # hardsigmoid's is piecewise constant: no graph to differentiate
        f2 = torch.autograd.grad(d1.sum(), t)[0] if d1.requires_grad else torch.zeros_like(t)
        assert f2.abs().max() <= MAX_SECOND[kind] * (1 + 1e-4), kind


@pytest.mark.parametrize("name", MODULES)
def test_backward_keeps_one_byte_per_element(name):
    """The float module saves its input or output (4 bytes per element; timm's in-place Swish
    three such tensors); the twin its codes and two scalars (scale, zero point)."""
    x, _ = data()
    saved = {}
    for key, module in (("float", MODULES[name]()), ("twin", twin(name))):
        saved[key] = []
        with saved_tensors_hooks(lambda t, key=key: saved[key].append(t) or t, lambda t: t):
            module(x.clone().requires_grad_(True) * 1.0)
    assert sum(t.numel() * t.element_size() for t in saved["float"]) >= 4 * x.numel()
    codes, scale, zero_point = saved["twin"]
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scale.numel() == zero_point.numel() == 1


@pytest.mark.parametrize("backend_name", backend_params(BACKENDS))
@pytest.mark.parametrize("name", ["GELU", "SiLU-inplace", "Hardswish", "timm-Swish-inplace",
                                  "timm-HardSigmoid-inplace", "Tanh"])
def test_every_backend_gives_the_reference_s_bits(backend_name, name):
    """The codes come from each backend's quantize_input, which every backend has (`cuda`
    under Triton's interpreter without a GPU): the outputs and gradients are the same bits as
    the reference backend's."""
    x, gy = (t[:4] for t in data(device_of(backend_name), seed=2))
    y, gx = run(twin(name, backend_name), x, gy)
    y_ref, gx_ref = run(twin(name, "reference"), x.cpu(), gy.cpu())
    assert torch.equal(y.cpu(), y_ref) and torch.equal(gx.cpu(), gx_ref)


@pytest.mark.parametrize("name", [n for n in MODULES if n.endswith("inplace")])
def test_in_place_activations_stay_in_place(name):
    """An in-place twin writes f(x) into x and returns x itself, as the float module does, and
    has the gradient of the same twin out of place."""
    x, gy = data(seed=3)
    module = twin(name)
    leaf = x.clone().requires_grad_(True)
    inner = leaf * 1.0
    y = module(inner)
    assert y is inner and inner._version > 0
    y.backward(gy)
    module.inplace = False
    _, gx = run(module, x, gy)
    assert torch.equal(leaf.grad, gx)


@pytest.mark.parametrize("name", ["GELU", "SiLU-inplace", "timm-Sigmoid-inplace"])
def test_no_bits_or_no_gradient_runs_the_float_module(name):
    """act_bits=None leaves the module as it is; a twin outside autograd (eval, no_grad) runs
    the float module's own forward."""
    x, gy = data(seed=4)
    ref_y, ref_gx = run(MODULES[name](), x, gy)
    y, gx = run(twin(name, act_bits=None), x, gy)
    assert torch.equal(y, ref_y) and torch.equal(gx, ref_gx)
    with torch.no_grad():
        assert torch.equal(twin(name)(x.clone()), MODULES[name]()(x.clone()))


def test_quantize_model_swaps_each_activation_and_dequantize_model_gives_it_back():
    def make():
        return nn.Sequential(*(factory() for factory in MODULES.values()),
                             nn.LeakyReLU(), nn.GELU(approximate="none"))

    model = quantize_model(make(), QuantConfig())
    swapped = [isinstance(m, QuantActivationMixin) for m in model]
    assert swapped == [True] * len(MODULES) + [False, True]  # no twin for LeakyReLU
    assert type(model[0]).__name__ == "QuantGELU" and model[1].q8_kind == "gelu_tanh"
    x = torch.randn(4, 8, requires_grad=True)
    model(x * 1.0).sum().backward()
    float_model = q8.dequantize_model(model)
    assert [type(m) for m in float_model] == [type(m) for m in make()]
    assert not q8.transform.holds_q8_state(float_model)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100",
                                  "vit_tiny_patch16_224"])
def test_timm_models_have_every_activation_swapped(name):
    """EfficientNet's SiLU and SE gate (Sigmoid), MobileNetV3's Hardswish and hard-sigmoid
    gate (gates in 8 bits), ViT's GELU: each is a twin, and a step is finite."""
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8} if name.startswith("vit") else {}
    model = quantize_model(timm.create_model(name, num_classes=10, **kwargs),
                           QuantConfig(gates="8bit"))
    kinds = [activation_kind(m) for m in model.modules()]
    twins = [isinstance(m, QuantActivationMixin) for m in model.modules()]
    assert any(twins) and twins == [k is not None for k in kinds]
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)


def test_activation_and_n_d_conv_twins_compile_as_one_graph():
    """Dynamo captures the activation twins (in place too) and the Conv1d / ConvTranspose2d
    twins with no graph break; the captured graph on eager's kernels gives eager's bits."""
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(inplace=True),
        nn.ConvTranspose2d(8, 8, 2, 2), nn.Hardswish(), nn.Flatten(2),
        nn.Conv1d(8, 4, 3, padding="same"), nn.GELU(), nn.Sigmoid()),
        QuantConfig(backend="reference"))
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    results = []
    for m in (torch.compile(model, backend="aot_eager", fullgraph=True), model):
        torch.manual_seed(1)  # the backward's stochastic rounding
        y = m(x)
        y.sum().backward()
        results.append((y.detach(), [p.grad for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (y_c, g_c), (y_e, g_e) = results
    assert torch.equal(y_c, y_e) and all(torch.equal(a, b) for a, b in zip(g_c, g_e))
