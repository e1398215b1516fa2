"""QuantConfig.act_ranges: a convolution's input quantized with one range per channel (the
default) or one per tensor (the paper). Every layer test runs on each kernel backend."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from q8 import QuantConfig, QuantConv2d, QuantLinear, fake_quantize, quantize_model
from q8.gemm_coverage import grid_bits
from q8.kernels import Kernels
from q8.kernels.reference import Reference, minmax
from tests.conftest import backend_params, device_of


def conv(config, backend, groups=1):
    torch.manual_seed(0)
    ref = nn.Conv2d(16, 32, 3, padding=1, groups=groups)
    q = QuantConv2d(16, 32, 3, padding=1, groups=groups,
                    q8_config=dataclasses.replace(config, backend=backend))
    q.load_state_dict(ref.state_dict())
    dev = device_of(backend)
    return ref.to(dev), q.to(dev)


def uneven_channels(device, seed=1):
    """Channels whose scales span four decades, as a depthwise net's do."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 1, 16).view(1, 16, 1, 1)
    return (torch.randn(4, 16, 10, 10, generator=g) * scales).to(device)


@pytest.mark.parametrize("groups", [1, 16])
@pytest.mark.parametrize("act_ranges", ["channel", "tensor"])
def test_conv_input_is_quantized_over_its_channels_or_the_tensor(backend, groups, act_ranges):
    ref, q = conv(QuantConfig(act_ranges=act_ranges), backend, groups)
    x = uneven_channels(device_of(backend))
    dim = 1 if act_ranges == "channel" else None
    want = F.conv2d(fake_quantize(x, 8, dim=dim), fake_quantize(ref.weight, 8), ref.bias,
                    padding=1, groups=groups)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    assert q.act_range.shape == ((2, 16) if act_ranges == "channel" else (2,))


def test_a_small_channel_keeps_its_resolution_only_with_its_own_range():
    """Nearest rounding errs by at most half a step, step = span / (2^8 - 2) with the span
    holding 0: the smallest channel's own span (about 6e-3) against the tensor's (about 60)."""
    x = uneven_channels("cpu")
    small = x[:, :1]
    span = small.amax().clamp(min=0) - small.amin().clamp(max=0)
    per_channel = (fake_quantize(x, 8, dim=1) - x)[:, :1].abs().max()
    per_tensor = (fake_quantize(x, 8) - x)[:, :1].abs().max()
    assert per_channel <= span / 254 / 2 * (1 + 1e-4)
    assert per_tensor > 100 * per_channel


def test_linear_layers_keep_one_range():
    q = QuantLinear(8, 4, q8_config=QuantConfig())
    q(torch.randn(3, 8))
    assert q.act_range.shape == (2,) and q.q8_act_channels is None


@pytest.mark.parametrize("gemm", ["codes", "int8"])
def test_per_channel_inputs_run_their_gemms_dequantized(gemm):
    """The channels' scales vary along the forward GEMM's sum, so forward and dL/dW run on the
    dequantized values in every mode: the same numbers as `dequantized` (dL/dx, which does not
    read x, runs on the codes)."""
    x = uneven_channels("cpu")
    g = torch.randn(4, 32, 10, 10)
    out = {}
    for mode in ("dequantized", gemm):
        _, q = conv(QuantConfig(gemm=mode, grad_rounding="nearest"), "reference")
        y = q(x)
        y.backward(g)
        out[mode] = y.detach(), q.weight.grad
    torch.testing.assert_close(out[gemm][0], out["dequantized"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[gemm][1], out["dequantized"][1], rtol=1e-5, atol=1e-5)


def test_running_ranges_load_across_act_ranges(backend):
    """A checkpoint made with the other act_ranges loads: one range spread over the channels,
    or the channels' widest range."""
    dev = device_of(backend)
    _, tensor = conv(QuantConfig(act_ranges="tensor"), backend)
    _, channel = conv(QuantConfig(), backend)
    x = uneven_channels(dev)
    tensor(x)
    channel(x)
    wide = conv(QuantConfig(), backend)[1]
    wide.load_state_dict(tensor.state_dict())
    assert torch.equal(wide.act_range, tensor.act_range.view(2, 1).expand(2, 16))
    one = conv(QuantConfig(act_ranges="tensor"), backend)[1]
    one.load_state_dict(channel.state_dict())
    assert torch.equal(one.act_range, torch.stack([channel.act_range[0].min(),
                                                   channel.act_range[1].max()]))
    torch.testing.assert_close(one.act_range, tensor.act_range)  # the same batch: same extremes


def test_per_channel_grid_counts_as_quantized_in_coverage():
    x = uneven_channels("cpu")
    assert grid_bits(fake_quantize(x, 8, dim=1)) == 8
    assert grid_bits(x) is None


def test_config_label_and_report():
    assert QuantConfig().short_str() == "w8a8g8/16-sr-batchnorm32"
    assert QuantConfig(act_ranges="tensor").short_str().endswith("-acttensor")
    with pytest.raises(ValueError, match="act_ranges"):
        QuantConfig(act_ranges="row")
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)), QuantConfig())
    assert "the 2 convolutions quantize their input with one range per channel" in (
        model.q8_report.summary())
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)), QuantConfig(act_ranges="tensor"))
    assert "one range per channel" not in model.q8_report.summary()


@pytest.mark.parametrize("cpu", backend_params(["cpu"]))
@pytest.mark.parametrize("shape", [(4, 16, 10, 10), (3, 5, 7), (2, 3, 4, 5, 6), (4, 16, 1, 1)])
def test_cpu_kernels_take_a_range_per_channel_to_the_reference_bits(cpu, shape):
    """The CPU kernels quantize and restore with a range per channel themselves (the CUDA
    kernels leave it to the reference): the same codes, x_hat, scales and zero points."""
    dev = device_of(cpu)
    k, ref = Kernels(cpu).on(torch.zeros(1, device=dev)), Reference()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g)
         * torch.logspace(-3, 1, shape[1]).view(1, -1, *[1] * (len(shape) - 2))).to(dev)
    lo, hi = (t.float() for t in minmax(x, 1))
    assert k.fuses(x, bits=8, makes_codes=True, ranges=(lo, hi))
    x_hat, saved = k.quantize_input(x, lo, hi, 8)
    want, want_saved = ref.quantize_input(x, lo, hi, 8)
    assert torch.equal(x_hat, want)
    for a, b in zip(saved, want_saved):
        assert torch.equal(a, b.to(a.dtype))
    assert torch.equal(k.restore(saved), ref.restore(want_saved))
