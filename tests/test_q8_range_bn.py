"""Range BN: an unbiased sigma estimate for every n, an exact gradient, and no NaN ever; the
layer's tests run on each kernel backend."""

import math

import pytest
import torch

from q8 import QuantBatchNorm2d, QuantConfig, RangeBatchNorm2d, d2
from q8.functional import fake_quantize
from q8.norm import MIN_CHUNK_VALUES, chunk_sizes, estimate_std, range_scale
from tests.conftest import device_of

FP = dict(weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None)


def test_d2_matches_known_values():
    assert d2(2) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-6)  # E|X1 - X2| exactly
    assert d2(16) == pytest.approx(3.532, abs=1e-3)
    assert d2(1024) == pytest.approx(6.497, abs=1e-3)
    assert d2(50176) == pytest.approx(8.462, abs=1e-3)


def test_scale_rules_reproduce_the_papers_figures():
    # the 2018 code's constant (eladhoffer/quantized.pytorch) underestimates sigma by 19% at n = 16
    assert range_scale(16, "hoffer2018") * d2(16) == pytest.approx(0.81, abs=0.005)
    # the paper's 1/sqrt(2 ln n) overestimates: ratio 1.40 at n = 8
    assert range_scale(8, "paper") * d2(8) == pytest.approx(1.40, abs=0.005)


# n = B*H*W from 16 to 10^6; C channels so that the average over channels has < 0.5% noise
SHAPES = [(16, 4096, 1, 1), (4, 2048, 2, 2), (8, 512, 8, 8), (16, 256, 16, 16),
          (3, 64, 37, 59), (16, 16, 64, 64), (16, 4, 250, 250)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n={s[0] * s[2] * s[3]}")
def test_sigma_estimate_is_unbiased_for_every_n(shape):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    mean = torch.randn(C, generator=g) * 10
    sigma = torch.rand(C, generator=g) * 5 + 0.1
    x = torch.randn(shape, generator=g) * sigma.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    est = estimate_std(x, chunks=16, rule="exact")
    assert (est / sigma).mean().item() == pytest.approx(1.0, abs=0.02)


def test_module_estimate_is_what_running_var_learns(backend):
    cfg = QuantConfig(weight_bits=None, grad_bits=None, wgrad_bits=None, backend=backend)
    bn = RangeBatchNorm2d(64, momentum=1.0, q8_config=cfg).to(device_of(backend))
    x = torch.randn(16, 64, 8, 8, device=device_of(backend)) * 3 + 1
    bn(x)
    assert bn.running_var.sqrt().mean().item() == pytest.approx(3.0, rel=0.02)
    assert bn.running_mean.mean().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("batch, spatial", [(5, 7), (1, 9), (3, 1), (1, 1), (17, 2), (64, 49)])
def test_any_batch_shape_works(backend, batch, spatial):
    sizes = chunk_sizes(batch, spatial, 16)
    assert sum(sizes) == batch and len(sizes) <= 16
    assert len(sizes) == 1 or all(s * spatial >= MIN_CHUNK_VALUES for s in sizes)
    bn = RangeBatchNorm2d(3, q8_config=QuantConfig(backend=backend)).to(device_of(backend))
    x = torch.randn(batch, 3, spatial, 1, device=device_of(backend), requires_grad=True)
    y = bn(x)
    y.pow(2).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def reference_range_bn(x, weight, bias, spec):
    """Range BN written with autograd (float64): the ground truth for the hand-written backward."""
    B, C = x.shape[:2]
    xv = x.reshape(B, C, -1)
    mean = xv.mean((0, 2))
    sizes = chunk_sizes(B, xv.shape[-1], spec.chunks)
    sigma = 0
    for part in torch.split(xv, sizes):
        n = part.shape[0] * part.shape[2]
        sigma = sigma + (part.amax((0, 2)) - part.amin((0, 2))) * range_scale(n, spec.rule)
    sigma = sigma / len(sizes)
    S = torch.sqrt(sigma**2 + spec.eps)
    y = (xv - mean[:, None]) / S[:, None] * weight[:, None] + bias[:, None]
    return y.view_as(x)


@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (10, 3, 4, 4), (3, 6, 2, 3), (70, 2, 1, 1)])
@pytest.mark.parametrize("rule", ["exact", "paper"])
def test_backward_matches_autograd_of_the_definition(shape, rule):
    cfg = QuantConfig(**FP, bn="range", range_bn_chunks=4, range_bn_scale=rule)
    bn = RangeBatchNorm2d(shape[1], q8_config=cfg).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    bn(x).backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    w2, b2 = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    ref = reference_range_bn(x2, w2, b2, bn.q8_range)
    torch.testing.assert_close(bn(x.detach()), ref.detach())
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bn.weight.grad, w2.grad)
    torch.testing.assert_close(bn.bias.grad, b2.grad)


@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (3, 6, 2, 3), (70, 2, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_quantized_range_bn_is_the_definition_on_quantized_values(backend, shape, channels_last):
    """With 8-bit input and g_l (nearest rounding), the layer computes the definition on
    x_hat = fake_quantize(x) and its gradient for g_hat = fake_quantize(g): float32 against
    float64 autograd, within float32's error of sums of n = B*H*W terms, n 2^-24 relative to
    the sum of their magnitudes (Higham 2002, 4.2), here bounded by n times the largest."""
    dev = device_of(backend)
    cfg = QuantConfig(grad_rounding="nearest", range_bn_chunks=4, backend=backend)
    bn = RangeBatchNorm2d(shape[1], q8_config=cfg).to(dev)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dev)
    gy = torch.randn(shape, generator=g).to(dev)
    if channels_last:
        x, gy = (t.to(memory_format=torch.channels_last) for t in (x, gy))
    xq = x.clone().requires_grad_(True)
    y = bn(xq)
    y.backward(gy)
    x64 = fake_quantize(x, 8).double().requires_grad_(True)
    w64, b64 = (p.detach().double().requires_grad_(True) for p in (bn.weight, bn.bias))
    ref = reference_range_bn(x64, w64, b64, bn.q8_range)
    ref.backward(fake_quantize(gy, 8).double())
    n = shape[0] * shape[2] * shape[3]
    for got, want in ((y, ref), (xq.grad, x64.grad), (bn.weight.grad, w64.grad),
                      (bn.bias.grad, b64.grad)):
        tol = 8 * n * 2.0**-24 * want.abs().max().item()
        assert (got.double() - want.detach()).abs().max() <= tol


def test_small_batches_keep_normalised_values_bounded(backend):
    # 4 samples at 1x1 (late EfficientNet blocks): one chunk, so |x_tilde| <= d2(4)
    bn = RangeBatchNorm2d(512, q8_config=QuantConfig(backend=backend)).to(device_of(backend))
    torch.manual_seed(0)
    y = bn(torch.randn(4, 512, 1, 1, device=device_of(backend)))
    assert y.abs().max() <= d2(4) * (1 + 1e-5)


def test_range_bn_matches_batchnorm_on_gaussian_input(backend):
    torch.manual_seed(0)
    dev = device_of(backend)
    x = torch.randn(32, 8, 16, 16, device=dev) * 2 - 1
    rbn = RangeBatchNorm2d(8, q8_config=QuantConfig(backend=backend)).to(dev)
    bn = torch.nn.BatchNorm2d(8).to(dev)
    y, y_ref = rbn(x), bn(x)
    # same normalisation up to the estimator's noise (a few % of sigma) and 8-bit input
    # rounding (|x_hat - x| <= s/2 of a 255-step grid over ~8 sigma: ~1.6% of sigma)
    assert (y - y_ref).pow(2).mean().sqrt() < 0.05


def test_eval_uses_running_statistics(backend):
    cfg = QuantConfig(act_bits=None, backend=backend)
    bn = RangeBatchNorm2d(4, momentum=1.0, q8_config=cfg).to(device_of(backend))
    x = torch.randn(16, 4, 8, 8, device=device_of(backend)) * 2 + 3
    bn(x)
    bn.eval()
    want = (x - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var + bn.eps).sqrt().view(
        1, -1, 1, 1)
    torch.testing.assert_close(bn(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [RangeBatchNorm2d, QuantBatchNorm2d])
def test_degenerate_inputs_never_give_nan(backend, cls):
    dev = device_of(backend)
    bn = cls(3, q8_config=QuantConfig(backend=backend)).to(dev)
    for x in (torch.zeros(4, 3, 5, 5), torch.full((4, 3, 5, 5), 2.5), torch.randn(1, 3, 4, 4)):
        x = x.to(dev).requires_grad_(True)
        y = bn(x)
        y.backward(torch.randn_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        y.detach().zero_()
    x = torch.randn(4, 3, 5, 5, device=dev, requires_grad=True)
    bn(x).backward(torch.zeros(4, 3, 5, 5, device=dev))  # all-zero gradient: no 0/0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_range_bn_single_value_per_channel_is_finite(backend):
    bn = RangeBatchNorm2d(3, q8_config=QuantConfig(backend=backend)).to(device_of(backend))
    x = torch.randn(1, 3, 1, 1, device=device_of(backend), requires_grad=True)
    y = bn(x)
    y.sum().backward()
    # x - mean(x) is 0 up to float32 rounding of x, then divided by sqrt(eps)
    atol = 4 * torch.finfo(torch.float32).eps * x.abs().max().item() / math.sqrt(bn.eps)
    torch.testing.assert_close(y, bn.bias.view(1, -1, 1, 1).expand_as(y).detach(), rtol=0,
                               atol=atol)
    assert torch.isfinite(x.grad).all()


def test_quantized_batchnorm_gradients_are_8_bit_noisy_but_unbiased(backend):
    torch.manual_seed(0)
    dev = device_of(backend)
    x = torch.randn(16, 4, 6, 6, device=dev)
    g = torch.randn(16, 4, 6, 6, device=dev)
    bn = torch.nn.BatchNorm2d(4).to(dev)
    xr = x.clone().requires_grad_(True)
    bn(xr).backward(g)
    cfg = QuantConfig(act_bits=None, bn="batchnorm", bn_compute="8bit", backend=backend)
    qbn = QuantBatchNorm2d(4, q8_config=cfg).to(dev)
    draws = []
    for _ in range(200):
        xq = x.clone().requires_grad_(True)
        qbn(xq).backward(g)
        draws.append(xq.grad)
    draws = torch.stack(draws)
    assert not torch.equal(draws[0], xr.grad)  # quantized...
    err = (draws.mean(0) - xr.grad).pow(2).mean() / (draws[0] - xr.grad).pow(2).mean()
    assert err < 3 / 200  # ...and the error of the mean shrinks like 1/N (unbiased)


def test_estimator_table_script_runs(load_script):
    text = load_script("range_bn_table").main(["--values", "100000", "--out", "-"])
    rows = [r for r in text.splitlines() if r.startswith("| 16 |")]
    exact = float(rows[0].split("|")[2].split("±")[0])
    assert exact == pytest.approx(1.0, abs=0.05)  # 4096 channels of n=16: sd 0.218/64 = 0.003


def _synced_rank(rank: int, world: int, init: str, x, weights, out) -> None:  # noqa: ANN001
    """One rank of test_synced_range_bn_equals_range_bn_of_the_global_batch."""
    import torch.distributed as dist

    from q8 import set_range_bn_sync

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        bn = RangeBatchNorm2d(6, q8_config=QuantConfig(**FP, bn="range", range_bn_chunks=4))
        assert set_range_bn_sync(bn) == 1
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        xr = x[part].clone().requires_grad_()
        y = bn(xr)
        (y * weights[part]).sum().backward()
        out[rank] = (y.detach(), xr.grad, bn.weight.grad, bn.running_var.clone())
    finally:
        dist.destroy_process_group()


def test_synced_range_bn_equals_range_bn_of_the_global_batch(tmp_path):
    """Two gloo ranks with half the batch each, synced, compute what one process computes on
    the whole batch with twice the chunks: the same output, input gradient and running
    statistics; the ranks' gamma gradients sum to the global one (DDP then averages them)."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, 4, 4, generator=g) * 3 + 1
    x[3, :, 1, 2] = 40.0  # an outlier: one chunk's max, on rank 0
    weights = torch.randn(x.shape, generator=g)
    world = 2
    out = mp.Manager().dict()
    mp.spawn(_synced_rank, args=(world, f"file://{tmp_path}/rendezvous", x, weights, out),
             nprocs=world)

    bn = RangeBatchNorm2d(6, q8_config=QuantConfig(**FP, bn="range", range_bn_chunks=8))
    xg = x.clone().requires_grad_()
    y = bn(xg)
    (y * weights).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)  # float32 sums in another order
    torch.testing.assert_close(torch.cat([out[r][0] for r in range(world)]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([out[r][1] for r in range(world)]), xg.grad, **tol)
    torch.testing.assert_close(out[0][2] + out[1][2], bn.weight.grad, **tol)
    for r in range(world):
        torch.testing.assert_close(out[r][3], bn.running_var, **tol)
    # and per-replica statistics (the default) differ: rank 0 holds the outlier
    local = RangeBatchNorm2d(6, q8_config=QuantConfig(**FP, bn="range", range_bn_chunks=4))
    assert not torch.allclose(local(x[:8]), y.detach()[:8], **tol)
