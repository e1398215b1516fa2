"""Range Batch-Normalization and quantized BatchNorm (Banner et al. 2018, sec. 4).

Range BN replaces the standard deviation by a scaled range, which needs no sum of squares:

    x_tilde = (x - mean(x)) / S,   S = sqrt(sigma_hat^2 + eps),
    sigma_hat = mean over chunks k of  c(n_k) * (max_k(x) - min_k(x))

computed per channel over chunks of the batch (n_k values each). With c(n) = 1/d2(n), where
d2(n) is the expected range of n standard Gaussians, sigma_hat is an unbiased estimate of sigma
for every n ("exact"). The paper's c(n) = 1/sqrt(2 ln n) ("paper") and the 2018 code's constant
("hoffer2018") are kept for comparison. Eval uses the running statistics, as BN does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from q8.config import QuantConfig
from q8.functional import GradSpec, quantize_grad, quantize_input, restore_input
from q8.layers import _TWINS, ActRangeMixin
from q8.quantizer import fake_quantize


@functools.lru_cache(maxsize=4096)
def d2(n: int) -> float:
    """E[max - min] of n i.i.d. standard normals: integral of 1 - Phi(x)^n - (1 - Phi(x))^n."""
    if n < 2:
        return 0.0
    x = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    log_phi = torch.special.log_ndtr(x)
    integrand = 1 - torch.exp(n * log_phi) - torch.exp(n * log_phi.flip(0))  # Phi(-x) = 1-Phi(x)
    return float(torch.trapezoid(integrand, x))


def range_scale(n: int, rule: str = "exact") -> float:
    """c(n): sigma_hat = c(n) * range of n samples; 0 when n < 2 (no spread to measure)."""
    if n < 2:
        return 0.0
    if rule == "exact":
        return 1.0 / d2(n)
    paper = 1.0 / math.sqrt(2 * math.log(n))
    if rule == "paper":
        return paper
    return 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4))) * paper  # "hoffer2018"


# A chunk of m values has P(range < e*sigma) ~ e^(m-1): with few values per chunk 1/sigma_hat is
# heavy-tailed (two close samples give a near-zero range and x_tilde explodes). Chunks hold at
# least this many values; one chunk of all n values keeps |x_tilde| <= d2(n).
MIN_CHUNK_VALUES = 32


def chunk_sizes(batch: int, spatial: int, chunks: int) -> list[int]:
    """Samples per chunk: the batch split into <= `chunks` near-equal groups of whole samples,
    each holding at least MIN_CHUNK_VALUES values per channel (or one chunk of everything)."""
    most = batch * spatial // MIN_CHUNK_VALUES
    k = max(1, min(chunks, batch, most))
    base, rem = divmod(batch, k)
    return [base + 1] * rem + [base] * (k - rem)


@dataclass(frozen=True)
class RangeSpec:
    chunks: int
    rule: str
    eps: float


def range_std(x: Tensor, spec: RangeSpec) -> tuple[Tensor, tuple]:
    """sigma_hat per channel of x (B, C, ...), and what backward needs to differentiate it."""
    B, C = x.shape[:2]
    xv = x.reshape(B, C, -1)
    sizes = chunk_sizes(B, xv.shape[-1], spec.chunks)
    smin, smax = torch.aminmax(xv, dim=-1)  # per-sample extremes (B, C)
    lengths = torch.tensor(sizes, device=x.device)
    cmax = torch.segment_reduce(smax, "max", lengths=lengths, axis=0)  # (K, C)
    cmin = torch.segment_reduce(smin, "min", lengths=lengths, axis=0)
    coef = torch.tensor([range_scale(s * xv.shape[-1], spec.rule) for s in sizes],
                        device=x.device, dtype=x.dtype)
    sigma = ((cmax - cmin) * coef[:, None]).mean(0)
    return sigma, (lengths, cmax, cmin, coef)


def range_std_backward(x: Tensor, grad_sigma: Tensor, saved: tuple) -> Tensor:
    """dL/dx from dL/dsigma_hat (C,): the range's gradient goes to each chunk's max and min
    (split evenly among ties, as torch.amax does)."""
    lengths, cmax, cmin, coef = saved
    B, C = x.shape[:2]
    xv = x.reshape(B, C, -1)
    chunk_of = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    is_max = xv == cmax[chunk_of].unsqueeze(-1)
    is_min = xv == cmin[chunk_of].unsqueeze(-1)
    n_max = torch.segment_reduce(is_max.sum(-1).to(x.dtype), "sum", lengths=lengths, axis=0)
    n_min = torch.segment_reduce(is_min.sum(-1).to(x.dtype), "sum", lengths=lengths, axis=0)
    w = grad_sigma * coef[:, None] / len(lengths)  # (K, C): d sigma / d range_k
    gx = is_max * (w / n_max)[chunk_of].unsqueeze(-1) - is_min * (w / n_min)[chunk_of].unsqueeze(-1)
    return gx.view_as(x)


class RangeBNFn(torch.autograd.Function):
    """Range BN in training mode, on an 8-bit input, with an 8-bit output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, running_mean, running_var, momentum,  # noqa: ANN001, ANN205
                act_bits, grad: GradSpec, spec: RangeSpec):
        x_hat, saved_x = quantize_input(x, act_bits, x_lo, x_hi)
        dims = [0] + list(range(2, x.dim()))
        mean = x_hat.mean(dims)
        sigma, saved_range = range_std(x_hat, spec)
        S = torch.sqrt(sigma * sigma + spec.eps)
        if running_mean is not None:
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(sigma * sigma, momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        a = (weight / S) if weight is not None else 1 / S
        b = -mean * a + (bias if bias is not None else 0)
        y = torch.addcmul(b.view(shape), x_hat, a.view(shape))
        ctx.grad, ctx.n_x, ctx.shape, ctx.dims = grad, len(saved_x), shape, dims
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(*saved_x, mean, sigma, S, weight, *saved_range)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        saved = ctx.saved_tensors
        x_hat = restore_input(saved[: ctx.n_x])
        mean, sigma, S, weight = saved[ctx.n_x : ctx.n_x + 4]
        saved_range = saved[ctx.n_x + 4 :]
        shape, dims = ctx.shape, ctx.dims
        g = quantize_grad(gy, ctx.grad)[0]
        x_tilde = (x_hat - mean.view(shape)) / S.view(shape)
        g_beta = g.sum(dims)
        g_gamma = (g * x_tilde).sum(dims)
        gamma = weight if weight is not None else torch.ones_like(S)
        n = x_hat.numel() // x_hat.shape[1]
        # x_tilde = (x - mean) / S: the mean's gradient centres g; S's goes through the range.
        gx = (g - (g_beta / n).view(shape)) * (gamma / S).view(shape)
        grad_sigma = -gamma * g_gamma / S * (sigma / S)  # dL/dS * dS/dsigma
        gx = gx + range_std_backward(x_hat, grad_sigma, saved_range)
        return (gx, g_gamma if ctx.has_weight else None, g_beta if ctx.has_bias else None,
                None, None, None, None, None, None, None, None)


class QuantBNFn(torch.autograd.Function):
    """Standard BN in training mode, on an 8-bit input, with an 8-bit output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, running_mean, running_var, momentum, eps,  # noqa: ANN001, ANN205
                act_bits, grad: GradSpec):
        x_hat, saved_x = quantize_input(x, act_bits, x_lo, x_hi)
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x_hat, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.grad, ctx.n_x, ctx.eps = grad, len(saved_x), eps
        ctx.save_for_backward(*saved_x, weight, save_mean, save_invstd)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        saved = ctx.saved_tensors
        x_hat = restore_input(saved[: ctx.n_x])
        weight, save_mean, save_invstd = saved[ctx.n_x :]
        g = quantize_grad(gy, ctx.grad)[0]
        mask = [ctx.needs_input_grad[0], weight is not None, weight is not None]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x_hat, weight, None, None, save_mean, save_invstd, True, ctx.eps, mask)
        return gx, gw, gb, None, None, None, None, None, None, None, None


class QuantNormMixin(ActRangeMixin):
    """Quantized BN in place of a BatchNorm2d; timm's BatchNormAct2d keeps its drop and
    activation layers, applied after the normalisation as before."""

    twin_prefix = "Quant"
    q8_norm = "batchnorm"

    def __init__(self, *args, q8_config: QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._q8_setup(q8_config or QuantConfig())

    def _q8_setup(self, config: QuantConfig) -> None:
        self._q8_init_range(config)
        # BN's output gradient is one 8-bit copy: bifurcation concerns the conv/linear GEMMs.
        self.q8_grad = GradSpec(config.grad_bits, config.grad_bits, config.grad_rounding)
        self.q8_range = RangeSpec(config.range_bn_chunks, config.range_bn_scale, self.eps)

    def _q8_momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked)  # cumulative average, as _BatchNorm does

    def _q8_normalize(self, x: Tensor) -> Tensor:
        cfg: QuantConfig = self.q8_config
        weight, bias = self.weight, self.bias
        if cfg.bn_param_bits is not None and weight is not None:
            weight = fake_quantize(weight, cfg.bn_param_bits)
            bias = fake_quantize(bias, cfg.bn_param_bits)
        use_batch_stats = self.training or self.running_mean is None
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        lo, hi = self._q8_input_range(x) if cfg.act_bits is not None else (None, None)
        if not use_batch_stats:  # eval: running statistics, input still quantized
            if cfg.act_bits is not None:
                x = _FakeQuantizeRange.apply(x, cfg.act_bits, lo, hi)
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, weight,
                                             bias, False, 0.0, self.eps)
        rm = self.running_mean if self.training else None
        rv = self.running_var if self.training else None
        m = self._q8_momentum() if self.training and self.track_running_stats else 0.0
        if self.q8_norm == "range":
            return RangeBNFn.apply(x, weight, bias, lo, hi, rm, rv, m, cfg.act_bits, self.q8_grad,
                                   self.q8_range)
        return QuantBNFn.apply(x, weight, bias, lo, hi, rm, rv, m, self.eps, cfg.act_bits,
                               self.q8_grad)

    def forward(self, x: Tensor) -> Tensor:
        y = self._q8_normalize(x)
        if isinstance(getattr(self, "act", None), nn.Module):  # timm BatchNormAct2d
            y = self.act(self.drop(y))
        return y


class _FakeQuantizeRange(torch.autograd.Function):
    """x quantized over a given [lo, hi] (eval-time running range), straight-through."""

    @staticmethod
    def forward(ctx, x, bits, lo, hi):  # noqa: ANN001, ANN205
        return quantize_input(x, bits, lo, hi)[0]

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g, None, None, None


class RangeNormMixin(QuantNormMixin):
    """Range BN in place of a BatchNorm2d."""

    twin_prefix = "Range"
    q8_norm = "range"


class RangeBatchNorm2d(RangeNormMixin, nn.BatchNorm2d):
    """BatchNorm2d normalised by the scaled range (Range BN), with 8-bit input and gradient."""


class QuantBatchNorm2d(QuantNormMixin, nn.BatchNorm2d):
    """Standard BatchNorm2d with 8-bit input and output gradient."""


_TWINS[(RangeNormMixin, nn.BatchNorm2d)] = RangeBatchNorm2d
_TWINS[(QuantNormMixin, nn.BatchNorm2d)] = QuantBatchNorm2d
