"""Twins of LayerNorm, GroupNorm, BatchNorm1d/3d (timm's subclasses too): 8-bit input, an
8-bit stochastically rounded g_l, the module's own forward; Range LayerNorm / GroupNorm."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import (
    GroupNorm,
    GroupNorm1,
    GroupNormAct,
    LayerNorm,
    LayerNorm2d,
    LayerNormAct,
    LayerNormAct2d,
)
from torch import nn

from q8 import QuantConfig, dequantize_model, fake_quantize, quantize_model
from q8.kernels import Kernels
from q8.kernels.reference import fake_quant, minmax, qparams
from q8.layers import ActRangeMixin, twin_class
from q8.norm import (
    QuantNormMixin,
    QuantSampleNormMixin,
    RangeBatchNorm1d,
    RangeBatchNorm2d,
    RangeLayerNorm,
    RangeNormMixin,
    RangeSampleNormMixin,
    range_scale,
)
from tests.conftest import device_of

FP = dict(weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None, bn="batchnorm")
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def twin_of(module: nn.Module, mixin: type, config: QuantConfig) -> nn.Module:
    """A copy of `module` turned into its twin, as quantize_model's swap does."""
    twin = copy.deepcopy(module)
    twin.__class__ = twin_class(mixin, type(module))
    twin._q8_setup(config, Kernels(config.backend))
    return twin


def randomise_affine(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            lo, hi = (0.5, 2.0) if name == "weight" else (-1.0, 1.0)
            p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
    return module


def run(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, seed: int = 1) -> list:
    """Output, dL/dx and the parameters' gradients of one backward of gy (seeded rounding)."""
    module.zero_grad()
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = module(xi)
    y.backward(gy)
    return [y.detach(), xi.grad] + [p.grad.clone() for p in module.parameters()]


# every normalisation twin, with bits None everywhere, is the fp32 module to the bit

FP32_CASES = {
    "LayerNorm": (lambda: nn.LayerNorm(16), (4, 5, 16)),
    "LayerNorm-2d-shape": (lambda: nn.LayerNorm((5, 16)), (4, 5, 16)),
    "LayerNorm-no-bias": (lambda: nn.LayerNorm(16, bias=False), (4, 5, 16)),
    "timm.LayerNorm": (lambda: LayerNorm(16), (4, 5, 16)),
    "timm.LayerNorm2d": (lambda: LayerNorm2d(8), (2, 8, 5, 5)),
    "timm.LayerNormAct": (lambda: LayerNormAct(16, act_layer=nn.GELU), (4, 5, 16)),
    "timm.LayerNormAct2d": (lambda: LayerNormAct2d(8), (2, 8, 5, 5)),
    "GroupNorm": (lambda: nn.GroupNorm(4, 16), (3, 16, 5, 5)),
    "GroupNorm-3d": (lambda: nn.GroupNorm(4, 16), (3, 16, 7)),
    "timm.GroupNorm": (lambda: GroupNorm(16, num_groups=4), (3, 16, 5, 5)),
    "timm.GroupNorm1": (lambda: GroupNorm1(16), (3, 16, 5, 5)),
    "timm.GroupNormAct": (lambda: GroupNormAct(16, 4), (3, 16, 5, 5)),
    "BatchNorm1d-2d": (lambda: nn.BatchNorm1d(16), (8, 16)),
    "BatchNorm1d-3d": (lambda: nn.BatchNorm1d(16), (8, 16, 7)),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(4), (4, 4, 3, 3, 3)),
}


@pytest.mark.parametrize("case", FP32_CASES)
def test_full_precision_twin_is_the_fp32_module(case):
    make, shape = FP32_CASES[case]
    ref = randomise_affine(make())
    mixin = QuantNormMixin if isinstance(ref, nn.modules.batchnorm._BatchNorm) else \
        QuantSampleNormMixin
    twin = twin_of(ref, mixin, QuantConfig(**FP, backend="reference"))
    assert isinstance(twin, type(ref))
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)
    for got, want in zip(run(twin, x, gy), run(ref, x, gy), strict=True):
        assert torch.equal(got, want)
    for name, buf in ref.named_buffers():  # BN's running statistics
        assert torch.equal(twin.get_buffer(name), buf), name


# gradients: only g_l's rounding differs from autograd on the same 8-bit input


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum() / (approx - ref).pow(2).sum())


def expected_sqnr_db(g: torch.Tensor, bits: int) -> float:
    """Stochastic rounding adds noise of variance E[p(1-p)] s^2 = s^2/6 per element of g; the
    backward is linear in g, so an i.i.d. g keeps that SQNR in dL/dx, dL/dgamma, dL/dbeta."""
    s = qparams(*minmax(g), bits)[0]
    return 10 * math.log10(g.pow(2).mean() / (s * s / 6))


def sqnr_tolerance_db(m: int) -> float:
    """5 sd of a measured SQNR over m output values: the signal's and the noise's power are
    sums of m roughly independent squares, each within a relative sd of sqrt(2/m) (chi-square;
    the two-point rounding noise has Var(e^2) = 1.4 E[e^2]^2 < 2), and 10 log10 turns a relative
    error d into 4.34 d dB."""
    return 5 * 10 / math.log(10) * math.sqrt(2 / m + 2 / m)


def range_layer_norm(x, weight, bias, normalized_shape, eps, rule="exact"):
    """Range LayerNorm written with autograd: each row of n = prod(normalized_shape) values
    over c(n) (max - min)."""
    n = math.prod(normalized_shape)
    v = x.reshape(-1, n)
    sigma = (v.amax(1, keepdim=True) - v.amin(1, keepdim=True)) * range_scale(n, rule)
    y = ((v - v.mean(1, keepdim=True)) / torch.sqrt(sigma**2 + eps)).view_as(x)
    return y * weight + bias


def range_group_norm(x, groups, weight, bias, eps, rule="exact"):
    """Range GroupNorm written with autograd: each (sample, group) over c(n) (max - min)."""
    v = x.reshape(x.shape[0], groups, -1)
    n = v.shape[-1]
    sigma = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) * range_scale(n, rule)
    y = ((v - v.mean(-1, keepdim=True)) / torch.sqrt(sigma**2 + eps)).view_as(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * weight.view(shape) + bias.view(shape)


def reference_of(module: nn.Module, range_norm: bool, rule: str = "exact"):
    """The function the twin computes on its (quantized) input, in autograd: the module
    itself, or the range formula followed by the module's activation (timm's *Act)."""
    if not range_norm:
        return module
    act = getattr(module, "act", nn.Identity())
    if isinstance(module, LayerNorm2d):
        return lambda x: range_layer_norm(x.permute(0, 2, 3, 1), module.weight, module.bias,
                                          module.normalized_shape, module.eps,
                                          rule).permute(0, 3, 1, 2)
    if isinstance(module, nn.LayerNorm):
        return lambda x: act(range_layer_norm(x, module.weight, module.bias,
                                              module.normalized_shape, module.eps, rule))
    return lambda x: act(range_group_norm(x, module.num_groups, module.weight, module.bias,
                                          module.eps, rule))


SQNR_CASES = {  # n = 256 values normalised together; dgamma, dbeta have 256 values
    "LayerNorm": (lambda: nn.LayerNorm(256), (16, 16, 256)),
    "GroupNorm": (lambda: nn.GroupNorm(8, 256), (8, 256, 4, 4)),
}


@pytest.mark.parametrize("case", SQNR_CASES)
@pytest.mark.parametrize("norm", ["standard", "range"])
def test_gradients_carry_the_8_bit_noise_of_g_l_only(backend, case, norm):
    make, shape = SQNR_CASES[case]
    dev = device_of(backend)
    ref = make()
    with torch.no_grad():  # gamma near 1: the output values weigh about equally in the SQNR
        ref.weight.uniform_(0.8, 1.25)
        ref.bias.uniform_(-1, 1)
    mixin = RangeSampleNormMixin if norm == "range" else QuantSampleNormMixin
    twin = twin_of(ref, mixin, QuantConfig(grad_bits=8, act_bits=8, backend=backend)).to(dev)
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)
    got = run(twin, x.to(dev), gy.to(dev))[1:]
    ref64 = copy.deepcopy(ref).double()
    x_hat = fake_quantize(x, 8).double().requires_grad_(True)  # the batch's range, nearest
    reference_of(ref64, norm == "range")(x_hat).backward(gy.double())
    want = [x_hat.grad, ref64.weight.grad, ref64.bias.grad]
    expected = expected_sqnr_db(gy, 8)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        measured = sqnr_db(b, a.cpu().double())
        assert abs(measured - expected) <= sqnr_tolerance_db(b.numel()), (name, measured)


# Range LayerNorm / GroupNorm: the definition, and its exact gradient

RANGE_CASES = {
    "LayerNorm": (lambda: nn.LayerNorm(12), (6, 5, 12)),
    "LayerNorm-2d-shape": (lambda: nn.LayerNorm((3, 4)), (6, 5, 3, 4)),
    "timm.LayerNorm2d": (lambda: LayerNorm2d(6), (3, 6, 4, 5)),
    "GroupNorm": (lambda: nn.GroupNorm(3, 12), (4, 12, 3, 3)),
    "GroupNorm-one-value": (lambda: nn.GroupNorm(4, 4), (5, 4, 1)),
    "timm.GroupNormAct": (lambda: GroupNormAct(12, 4, act_layer=nn.Identity), (4, 12, 5)),
}


@pytest.mark.parametrize("case", RANGE_CASES)
@pytest.mark.parametrize("rule", ["exact", "paper"])
def test_range_norm_is_its_definition_with_autograd_s_gradient(case, rule):
    """float64, nothing quantized: forward and backward against autograd on the formula;
    ties at a row's max and min (autograd shares their gradient evenly, as the twin does)."""
    make, shape = RANGE_CASES[case]
    ref = randomise_affine(make()).double()
    cfg = QuantConfig(**FP, norm="range", range_bn_scale=rule, backend="reference")
    twin = twin_of(ref, RangeSampleNormMixin, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x.view(-1)[:: 7] = x.max()  # repeated maxima in many rows
    x.view(-1)[3:: 11] = x.min()
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    got = run(twin, x, gy)
    ref.zero_grad()
    xr = x.clone().requires_grad_(True)
    y = reference_of(ref, True, rule)(xr)
    y.backward(gy)
    want = [y.detach(), xr.grad, ref.weight.grad, ref.bias.grad]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# the same bits on every kernel backend

BACKEND_CASES = {
    "LayerNorm": (lambda: nn.LayerNorm(32), (4, 7, 32)),
    "timm.LayerNorm2d": (lambda: LayerNorm2d(32), (4, 32, 5, 3)),
    "GroupNorm": (lambda: nn.GroupNorm(4, 32), (4, 32, 5, 3)),
}


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("norm", ["standard", "range"])
def test_every_backend_gives_the_reference_s_bits(backend, case, norm):
    """The twins' kernels are the elementwise quantizers (quantize_input, restore, grad_pair),
    equal to the reference's bit for bit; the rest is the same PyTorch on the same values."""
    make, shape = BACKEND_CASES[case]
    module = randomise_affine(make())
    mixin = RangeSampleNormMixin if norm == "range" else QuantSampleNormMixin
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
    results = []
    for name in ("reference", backend):
        dev = device_of(name)
        twin = twin_of(module, mixin, QuantConfig(backend=name)).to(dev)
        results.append([t.cpu() for t in run(twin, x.to(dev), gy.to(dev))])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# state dict and eval: the running input range


@pytest.mark.parametrize("norm", ["standard", "range"])
@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(16), lambda: GroupNormAct(16, 4)],
                         ids=["LayerNorm", "GroupNormAct"])
def test_eval_quantizes_over_the_running_range_which_round_trips(norm, make):
    ref = randomise_affine(make())
    mixin = RangeSampleNormMixin if norm == "range" else QuantSampleNormMixin
    cfg = QuantConfig(act_momentum=0.5, backend="reference")
    twin = twin_of(ref, mixin, cfg)
    shape = (4, 16) if isinstance(ref, nn.LayerNorm) else (4, 16, 3, 3)
    for scale in (1.0, 3.0):
        twin(torch.rand(shape) * scale)
    lo, hi = twin.act_range
    assert lo >= 0 and 1.0 < hi < 3.0  # an EMA of about 1 and about 3
    twin.eval()
    x = torch.rand(shape) * 10  # beyond the running range: clipped in eval
    y = twin(x)
    x_hat = fake_quant(x, lo, hi, 8)
    with torch.no_grad():
        want = reference_of(ref, norm == "range")(x_hat)
    assert torch.equal(y, want)
    fresh = twin_of(ref, mixin, cfg)
    fresh.load_state_dict(twin.state_dict())
    assert torch.equal(fresh.eval()(x), y)
    assert set(fresh.state_dict()) == set(ref.state_dict()) | {"act_range", "act_range_steps"}
    twin.load_state_dict(ref.state_dict(), strict=True)  # an fp32 checkpoint loads


# BatchNorm1d: Range BN / quantized BN on the input viewed as 4-D


@pytest.mark.parametrize("shape", [(12, 6), (12, 6, 5)])
@pytest.mark.parametrize("bn", ["range", "batchnorm"])
def test_batchnorm1d_is_the_2d_twin_on_the_input_as_4d(backend, shape, bn):
    """LeViT's (B*N, C) and a sequence's (N, C, L): the BatchNorm2d twin on (N, C, L, 1), to the
    bit: output, gradients, running statistics and input range."""
    dev = device_of(backend)
    cfg = QuantConfig(bn=bn, range_bn_chunks=4, backend=backend)
    mixin = RangeNormMixin if bn == "range" else QuantNormMixin
    one_d = twin_of(randomise_affine(nn.BatchNorm1d(6)), mixin, cfg).to(dev)
    two_d = twin_of(randomise_affine(nn.BatchNorm2d(6)), mixin, cfg).to(dev)
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)
    x, gy = x.to(dev), gy.to(dev)
    as_4d = (shape[0], shape[1], -1, 1)
    got, want = run(one_d, x, gy), run(two_d, x.reshape(as_4d), gy.reshape(as_4d))
    assert got[0].shape == shape and got[1].shape == shape
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b.reshape(a.shape))
    for (name, a), b in zip(one_d.named_buffers(), two_d.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_range_batchnorm1d_class_is_the_registered_twin():
    assert twin_class(RangeNormMixin, nn.BatchNorm1d) is RangeBatchNorm1d
    assert twin_class(RangeNormMixin, nn.BatchNorm2d) is RangeBatchNorm2d
    assert twin_class(RangeSampleNormMixin, nn.LayerNorm) is RangeLayerNorm


# the config field


def test_norm_choice_is_validated_and_labelled():
    with pytest.raises(ValueError, match="QuantConfig.norm='rms' is invalid"):
        QuantConfig(norm="rms")
    assert QuantConfig(**FP).is_full_precision
    assert not QuantConfig(**FP, norm="range").is_full_precision  # the maths changes
    assert QuantConfig(norm="range").short_str().endswith("-rangenorm")
    model = quantize_model(nn.Sequential(nn.LayerNorm(8)), QuantConfig(**FP, norm="range"))
    assert type(model[0]) is RangeLayerNorm


def test_quantize_model_picks_the_twin_by_the_config():
    def convert(**cfg):
        model = nn.Sequential(nn.LayerNorm(8), GroupNormAct(8, 2), nn.BatchNorm1d(8))
        return [type(m).__name__ for m in quantize_model(model, QuantConfig(**cfg))]

    assert convert() == ["QuantLayerNorm", "QuantGroupNormAct", "QuantBatchNorm1d"]
    assert convert(norm="range", bn="range") == [
        "RangeLayerNorm", "RangeGroupNormAct", "RangeBatchNorm1d"]
    assert convert(**FP) == ["LayerNorm", "GroupNormAct", "BatchNorm1d"]  # nothing to quantize


# timm models: every norm converted, a step trains, dequantize_model gives the model back

TIMM = {  # name -> create_model kwargs and input side that keep a CPU step short
    "convnext_atto": ({}, 32),  # LayerNorm2d, LayerNorm (channels last)
    "vit_tiny_patch16_224": ({"img_size": 32, "depth": 2}, 32),  # LayerNorm
    "resnetv2_50x1_bit": ({}, 32),  # GroupNormAct
    "levit_128s": ({"img_size": 64}, 64),  # BatchNorm1d on (B*N, C)
}


def make_timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **TIMM[name][0])


@pytest.mark.parametrize("name", TIMM)
@pytest.mark.parametrize("norm", ["standard", "range"])
def test_timm_models_convert_every_norm_and_train(name, norm):
    model = quantize_model(make_timm(name), QuantConfig(norm=norm, backend="reference"))
    modules = dict(model.named_modules())
    norms = [n for n, m in modules.items() if isinstance(m, NORMS)]
    assert norms and all(isinstance(modules[n], ActRangeMixin) for n in norms)
    assert not [k for k in model.q8_report.kept if isinstance(modules[k[0]], NORMS)]
    assert set(norms) <= {n for n, _, _ in model.q8_report.replaced}
    for m in modules.values():
        if isinstance(m, (GroupNormAct, LayerNormAct2d)):
            assert isinstance(m.act, nn.Module)  # the activation stays
    side = TIMM[name][1]
    x, y = torch.randn(2, 3, side, side), torch.randint(0, 10, (2,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    fresh = make_timm(name)
    dequantize_model(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    assert set(model.state_dict()) == set(fresh.state_dict())


def test_dequantize_model_gives_back_each_norm_class():
    def small():
        torch.manual_seed(0)
        return nn.Sequential(LayerNorm2d(4), GroupNormAct(4, 2), GroupNorm1(4), nn.Flatten(),
                             nn.LayerNorm(36), LayerNormAct(36), nn.BatchNorm1d(36))

    for cfg in (QuantConfig(backend="reference"),
                QuantConfig(norm="range", bn="batchnorm", backend="reference")):
        model = quantize_model(small(), cfg)
        model(torch.randn(4, 4, 3, 3)).square().mean().backward()
        float_model = dequantize_model(model)
        assert [type(m) for m in float_model.modules()] == [type(m) for m in small().modules()]
        assert set(float_model.state_dict()) == set(small().state_dict())
        ref = small()
        ref.load_state_dict(float_model.state_dict())
        x = torch.randn(4, 4, 3, 3)
        assert torch.equal(float_model.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("norm", ["standard", "range"])
def test_norm_twins_compile_as_one_graph_with_eager_s_bits(backend, norm):
    """Explicit backward formulas, no autograd inside them: Dynamo captures the twins with
    fullgraph, and the captured graph on eager's kernels (aot_eager) gives eager's bits."""
    dev = device_of(backend)
    torch.manual_seed(0)
    net = nn.Sequential(LayerNorm2d(3), GroupNormAct(3, 3), nn.Flatten(), nn.LayerNorm(27),
                        nn.Unflatten(1, (9, 3)), nn.BatchNorm1d(9))
    eager = quantize_model(net, QuantConfig(norm=norm, backend=backend)).to(dev)
    traced = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(2)
    x, gy = torch.randn(4, 3, 3, 3, generator=g).to(dev), torch.randn(4, 9, 3, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    got, want = run(compiled, x, gy.to(dev)), run(eager, x, gy.to(dev))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_norm_params_quantized_when_asked():
    """bn_param_bits: gamma and beta of LayerNorm / GroupNorm fake-quantized, as for BN."""
    ref = randomise_affine(nn.LayerNorm(16))
    twin = twin_of(ref, QuantSampleNormMixin, QuantConfig(**FP, bn_param_bits=4,
                                                           backend="reference"))
    x = torch.randn(5, 16)
    want = F.layer_norm(x, (16,), fake_quantize(ref.weight, 4), fake_quantize(ref.bias, 4),
                        ref.eps)
    assert torch.equal(twin(x), want)
