"""The default BN twin (bn_compute="float"): BatchNorm on the full-precision input and g_l, its
normalised input kept for backward as 8-bit codes with one range per channel."""

import pytest
import torch
from torch import nn

from q8 import QuantConfig, quantize_model
from q8.norm import QuantBatchNorm2d, QuantNormMixin, RangeBatchNorm2d, channel_codes

# g_l in 8 bits keeps a BN twin; activations in full precision: nothing saved is rounded
FLOAT_SAVE = QuantConfig(weight_bits=None, act_bits=None)


def bn_pair(config: QuantConfig, channels: int = 5) -> tuple[nn.Module, nn.Module]:
    """A BatchNorm2d with random gamma/beta, and its twin under `config` (same parameters)."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(channels)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.uniform_(-1.0, 1.0)
    twin = nn.Sequential(nn.BatchNorm2d(channels))
    twin[0].load_state_dict(ref.state_dict())
    quantize_model(twin, config)
    return ref, twin[0]


def spread_input(shape: tuple[int, ...] = (4, 5, 6, 7)) -> torch.Tensor:
    """Channels of very different scales and offsets, as a depthwise conv gives."""
    scales = torch.tensor([1.0, 30.0, 0.01, 3.0, 0.3])[: shape[1]]
    return torch.randn(shape) * scales[:, None, None] + 2.0


def grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y = module(x)
    (y * g).sum().backward()
    return [y.detach(), x.grad, module.weight.grad, module.bias.grad]


def test_defaults_are_float_bn_and_the_paper_is_a_preset() -> None:
    assert (QuantConfig().bn, QuantConfig().bn_compute) == ("batchnorm", "float")
    assert QuantConfig().short_str() == "w8a8g8/16-sr-batchnorm32"
    with pytest.raises(ValueError, match="bn_compute"):
        QuantConfig(bn_compute="int8")
    for config in (QuantConfig(bn="range"), QuantConfig(bn="range", bn_compute="8bit")):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        quantize_model(model, config)  # Range BN is the paper's, on the 8-bit input
        assert isinstance(model[1], RangeBatchNorm2d) and config.short_str().endswith("rangebn")


def test_without_rounding_it_is_torch_batchnorm() -> None:
    """Nothing saved rounded: output, every gradient and the running statistics are torch's."""
    ref, twin = bn_pair(FLOAT_SAVE)
    assert isinstance(twin, QuantBatchNorm2d)
    x, g = spread_input(), torch.randn(4, 5, 6, 7)
    for a, b in zip(grads(twin, x, g), grads(ref, x, g), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(twin.running_mean, ref.running_mean)
    assert torch.equal(twin.running_var, ref.running_var)
    twin.eval()
    ref.eval()
    torch.testing.assert_close(twin(x), ref(x))


@pytest.mark.parametrize("save_bits", [None, 16])
def test_saved_codes_change_backward_by_the_rounding_bound_only(save_bits) -> None:
    """Forward and the running statistics are BN's exactly. Backward reads x_tilde from codes
    with error e, |e_c| <= step_c / 2 (step_c: channel c's range / (2^B - 1), B = act_bits, 8,
    or bn_save_bits); from

        dL/dx = gamma invstd (g - mean(g) - x_tilde mean(g x_tilde))

    the error of dL/dx is at most gamma invstd (|e| |mean(g x_tilde)| + |x_tilde| mean(|g|) e_c
    + e_c mean(|g|) e_c), and that of dL/dgamma at most sum(|g|) e_c."""
    ref, twin = bn_pair(QuantConfig(bn_save_bits=save_bits))
    x, g = spread_input(), torch.randn(4, 5, 6, 7)
    y, gx, gw, gb = grads(twin, x, g)
    y_ref, gx_ref, gw_ref, gb_ref = grads(ref, x, g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gb, gb_ref)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    c = (slice(None), None, None)
    xt = (x - mean[c]) / torch.sqrt(var[c] + ref.eps)
    step = (xt.amax((0, 2, 3)) - xt.amin((0, 2, 3))) / (2 ** (save_bits or 8) - 1)
    e = step / 2  # per channel
    if save_bits == 16:  # and fp32's rounding of codes * step + offset (test below)
        e = e + 2 * 2**-24 * (xt.abs().amax((0, 2, 3)) + 2**15 * step + 2**16 * step
                              + xt.abs().amax((0, 2, 3)))
    n = x.numel() // x.shape[1]
    m1, abs_g = (g * xt).sum((0, 2, 3)) / n, g.abs().sum((0, 2, 3)) / n
    scale = (ref.weight / torch.sqrt(var + ref.eps)).detach()
    bound = scale[c] * (e[c] * m1.abs()[c] + xt.abs() * (abs_g * e)[c] + (e * abs_g * e)[c])
    assert ((gx - gx_ref).abs() <= bound * 1.01 + 1e-6).all()
    assert ((gw - gw_ref).abs() <= (g.abs().sum((0, 2, 3)) * e) * 1.01 + 1e-6).all()
    assert not torch.equal(gx, gx_ref)  # the codes do round


@pytest.mark.parametrize(("save_bits", "dtype"), [(None, torch.uint8), (16, torch.int16)])
def test_it_keeps_codes_not_the_float_input(save_bits, dtype) -> None:
    """What BN keeps for backward: one code per value (uint8, or int16 for 16 bits), and
    per-channel constants."""
    _, twin = bn_pair(QuantConfig(bn_save_bits=save_bits))
    x = spread_input().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        twin(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert [t.dtype for t in big] == [dtype]
    assert sum(t.numel() for t in saved) < x.numel() + 8 * x.shape[1]


def test_channel_codes_round_to_nearest_per_channel() -> None:
    x = spread_input()
    codes, scale, lo = channel_codes(x, 8)
    assert codes.dtype == torch.uint8 and codes.amin() == 0 and codes.amax() == 255
    assert ((codes * scale + lo - x).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_the_label_names_the_saved_bits() -> None:
    assert QuantConfig(bn_save_bits=16).short_str() == "w8a8g8/16-sr-batchnorm32s16"


def test_16_bit_channel_codes_take_two_bytes() -> None:
    """int16 codes shifted by 2^15: the values 2^16 - 1 steps span; the offset carries the
    shift, so x ~ codes * scale + offset with fp32's rounding of offset and product on top of
    half a step: at most 2^-24 of |offset| + 2^16 scale + |x| each."""
    x = spread_input()
    codes, scale, offset = channel_codes(x, 16)
    assert codes.dtype == torch.int16 and codes.amin() == -2**15 and codes.amax() == 2**15 - 1
    fp32 = 2**-24 * (offset.abs() + 2**16 * scale + x.abs())
    assert ((codes * scale + offset - x).abs() <= scale / 2 + 2 * fp32).all()


def test_every_bn_of_a_mobile_net_becomes_a_float_bn_twin() -> None:
    """timm's BatchNormAct2d too: every BN of MobileNetV3 keeps the 8-bit codes of x_tilde."""
    import timm

    model = timm.create_model("mobilenetv3_small_050", num_classes=4, in_chans=1)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    quantize_model(model, QuantConfig())
    modules = dict(model.named_modules())
    assert bns and all(isinstance(modules[n], QuantNormMixin) for n in bns)
    assert (f"the {len(bns)} BatchNorm layers compute in full precision and keep 8-bit codes"
            in model.q8_report.summary())
    x = torch.randn(8, 1, 32, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum().backward()
    maps = [t for t in saved if t.dim() == 4 and t.shape[0] == 8 and t.shape[-1] > 1]  # not pooled
    assert maps and all(t.dtype in (torch.uint8, torch.bool) for t in maps), \
        sorted({(t.dtype, tuple(t.shape)) for t in maps if t.dtype.is_floating_point})


def test_it_compiles_as_one_graph_with_eager_s_bits() -> None:
    """torch.compile(fullgraph=True) traces the default BN twin; under aot_eager the loss and
    every gradient are eager's, bit for bit (the same ops in the same order)."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 10))
    quantize_model(model, QuantConfig(backend="reference"))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    losses = []
    for m in (compiled, eager):
        torch.manual_seed(1)  # the same stochastic rounding of g_l
        loss = m(x).square().mean()
        loss.backward()
        losses.append(loss)
    assert torch.equal(*losses)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), eager.parameters()))
