"""BatchNorm twins: the default computes in full precision and keeps 8-bit codes of its
normalised input (FloatBNFn, docs/MOBILE_NETS.md); the paper's Range Batch-Normalization and
quantized BatchNorm on an 8-bit input (Banner et al. 2018, sec. 4). Quantized and range-based
LayerNorm and GroupNorm.

Range BN replaces the standard deviation by a scaled range, which needs no sum of squares:

    x_tilde = (x - mean(x)) / S,   S = sqrt(sigma_hat^2 + eps),
    sigma_hat = mean over chunks k of  c(n_k) * (max_k(x) - min_k(x))

computed per channel over chunks of the batch (n_k values each). With c(n) = 1/d2(n), where
d2(n) is the expected range of n standard Gaussians, sigma_hat is an unbiased estimate of sigma
for every n ("exact"). The paper's c(n) = 1/sqrt(2 ln n) ("paper") and the 2018 code's constant
("hoffer2018") are kept for comparison. Eval uses the running statistics, as BN does.
BatchNorm1d and BatchNorm3d run the same twins on their input viewed as (N, C, L, 1).

LayerNorm and GroupNorm twins (any subclass: timm's LayerNorm2d, GroupNormAct...) keep the
module's forward and reroute its F.layer_norm / F.group_norm call: an 8-bit input (codes kept
for backward) and an 8-bit g_l, as BN. Their range variant normalises each row of n values
(a token's features; a (sample, group)) by sigma_hat = c(n) (max - min) of the row.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from q8.config import QuantConfig
from q8.functional import GradSpec, fake_quantize
from q8.kernels import Kernels
from q8.kernels.reference import code_dtype, minmax
from q8.layers import _TWINS, ActRangeMixin, float32_under_autocast


@functools.lru_cache(maxsize=4096)
def d2(n: int) -> float:
    """E[max - min] of n i.i.d. standard normals: integral of 1 - Phi(x)^n - (1 - Phi(x))^n."""
    if n < 2:
        return 0.0
    x = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    log_phi = torch.special.log_ndtr(x)
    integrand = 1 - torch.exp(n * log_phi) - torch.exp(n * log_phi.flip(0))  # Phi(-x) = 1-Phi(x)
    return float(torch.trapezoid(integrand, x))


@torch.compiler.assume_constant_result  # a constant of the shapes: compiled graphs keep it
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


@functools.lru_cache(maxsize=256)  # made once per shape: no copy to the GPU at each step
def _chunk_tables(sizes: tuple[int, ...], spatial: int, rule: str, device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Constants of a chunking: c(n_k) / K per chunk (K,) and each sample's chunk (B,)."""
    chunk = torch.tensor([k for k, size in enumerate(sizes) for _ in range(size)], device=device)
    coef = torch.tensor([range_scale(k * spatial, rule) / len(sizes) for k in sizes],
                        device=device, dtype=dtype)
    return coef, chunk


def _per_chunk(s: Tensor, sizes: list[int], reduce) -> Tensor:  # noqa: ANN001
    """reduce(., dim=1) over each chunk's samples: (B, C) -> (K, C). chunk_sizes gives at most
    two sizes, the larger first, so two reshapes cover every chunk."""
    k1 = sizes.count(sizes[0])
    n1 = k1 * sizes[0]
    first = reduce(s[:n1].reshape(k1, sizes[0], -1), 1)
    if k1 == len(sizes):
        return first
    rest = reduce(s[n1:].reshape(len(sizes) - k1, sizes[-1], -1), 1)
    return torch.cat([first, rest])


def range_std(smin: Tensor, smax: Tensor, sizes: list[int], spatial: int,
              spec: RangeSpec) -> tuple[Tensor, ...]:
    """sigma_hat (C,) from per-sample extremes (B, C); also, for backward, each chunk's max
    and min (K, C), c(n_k) / K (K,) and each sample's chunk (B,)."""
    cmax, cmin = _per_chunk(smax, sizes, torch.amax), _per_chunk(smin, sizes, torch.amin)
    # a compiled graph holds the tables as constants: it traces the function, not its cache
    tables = _chunk_tables.__wrapped__ if torch.compiler.is_compiling() else _chunk_tables
    coef, chunk = tables(tuple(sizes), spatial, spec.rule, smax.device, smax.dtype)
    sigma = ((cmax - cmin) * coef[:, None]).sum(0)
    return sigma, cmax, cmin, coef, chunk


def estimate_std(x: Tensor, chunks: int = 16, rule: str = "exact") -> Tensor:
    """Range BN's per-channel estimate of the standard deviation of x (B, C, ...)."""
    B, C = x.shape[:2]
    spatial = x.numel() // (B * C)
    smin, smax = x.flatten(2).amin(-1), x.flatten(2).amax(-1)
    sizes = chunk_sizes(B, spatial, chunks)
    return range_std(smin, smax, sizes, spatial, RangeSpec(chunks, rule, 0.0))[0]


class RangeBNFn(torch.autograd.Function):
    """Range BN in training mode, on an 8-bit input, with an 8-bit output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, running_mean, running_var, momentum,  # noqa: ANN001, ANN205
                act_bits, grad: GradSpec, spec: RangeSpec, group, kernels: Kernels):  # noqa: ANN001
        k = kernels.on(x)
        B, C = x.shape[:2]
        spatial = x.numel() // (B * C)
        saved_x, ssum, smin, smax = k.range_bn_stats(x, x_lo, x_hi, act_bits)
        mean = ssum.sum(0) / (B * spatial)
        sizes = chunk_sizes(B, spatial, spec.chunks)
        sigma, cmax, cmin, coef, chunk = range_std(smin, smax, sizes, spatial, spec)
        if group is not None:  # the mean over every rank's values and chunks
            mean, sigma, coef = _all_reduce_stats(group, ssum.sum(0), B * spatial, sigma,
                                                  coef)
        S = torch.sqrt(sigma * sigma + spec.eps)
        if running_mean is not None:
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(sigma * sigma, momentum)
        gamma = weight if weight is not None else torch.ones_like(S)
        a = gamma / S
        b = -mean * a + (bias if bias is not None else 0)
        y = k.range_bn_affine(saved_x, a, b)
        ctx.grad, ctx.has_weight, ctx.has_bias = grad, weight is not None, bias is not None
        ctx.sizes, ctx.group, ctx.kernels, ctx.n_x = sizes, group, kernels, len(saved_x)
        ctx.save_for_backward(*saved_x, mean, sigma, S, gamma, cmax, cmin, coef, chunk)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        k = ctx.kernels.on(gy)
        saved = ctx.saved_tensors
        saved_x = saved[: ctx.n_x]
        mean, sigma, S, gamma, cmax, cmin, coef, chunk = saved[ctx.n_x :]
        t_max, t_min = cmax[chunk], cmin[chunk]  # (B, C): each sample's chunk extremes
        C = gy.shape[1]
        n = gy.numel() // C
        bits, seed = ctx.grad.bits, ctx.grad.seed()
        # g = gy quantized (rebuilt from the same seed in both passes); sums over each plane
        s_g, s_gx, n_max, n_min, g_lo, g_hi = k.range_bn_grad_sums(
            saved_x, gy, mean, t_max, t_min, bits, seed)
        g_beta, g_gamma = s_g.sum(0), s_gx.sum(0) / S  # sums of g and of g * x_tilde
        sum_g, sum_gx = g_beta, g_gamma  # over the values that set mean and sigma
        if ctx.group is not None:
            sums = torch.cat([g_beta, g_gamma, g_beta.new_full((1,), n)])
            dist.all_reduce(sums, group=ctx.group)
            sum_g, sum_gx, n = sums[:C], sums[C : 2 * C], sums[-1]
        # x_tilde = (x - mean) / S, S = sqrt(sigma^2 + eps), sigma = sum_k c_k range_k / K:
        # the mean's gradient centres g; S's flows to each chunk's max and min.
        grad_sigma = -gamma * sum_gx / S * (sigma / S)  # (C,)
        w = grad_sigma * coef[chunk, None]  # (B, C): dL/d(range of the sample's chunk)
        w_max = w / _per_chunk(n_max, ctx.sizes, torch.sum)[chunk]  # ties counted per chunk
        w_min = w / _per_chunk(n_min, ctx.sizes, torch.sum)[chunk]
        gx = k.range_bn_grad_input(saved_x, gy, g_lo, g_hi, bits, seed, gamma / S, sum_g / n,
                                   t_max, t_min, w_max, w_min)
        return (gx, g_gamma if ctx.has_weight else None, g_beta if ctx.has_bias else None,
                None, None, None, None, None, None, None, None, None, None)


def _all_reduce_stats(group, value_sum: Tensor, count: int, sigma: Tensor,  # noqa: ANN001
                      coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Synchronised Range BN: the mean over all ranks' values and sigma_hat as the mean of
    c(n_k) * range_k over all ranks' chunks (one all-reduce). Returns mean, sigma and the
    chunks' coefficients rescaled from 1/K to 1/K_total, for backward."""
    k = len(coef)
    # counts by fill, not from a host list: a copy from the host would wait for the GPU
    counts = torch.cat([value_sum.new_full((1,), count), value_sum.new_full((1,), k)])
    stats = torch.cat([value_sum, sigma * k, counts])
    dist.all_reduce(stats, group=group)
    C = value_sum.numel()
    total_count, total_k = stats[-2], stats[-1]
    return stats[:C] / total_count, stats[C : 2 * C] / total_k, coef * (k / total_k)


class QuantBNFn(torch.autograd.Function):
    """Standard BN in training mode, on an 8-bit input, with an 8-bit output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, running_mean, running_var, momentum, eps,  # noqa: ANN001, ANN205
                act_bits, grad: GradSpec, kernels: Kernels):  # noqa: ANN001
        x_hat, saved_x = kernels.on(x).quantize_input(x, x_lo, x_hi, act_bits)
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x_hat, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.grad, ctx.n_x, ctx.eps, ctx.kernels = grad, len(saved_x), eps, kernels
        ctx.save_for_backward(*saved_x, weight, save_mean, save_invstd)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        k = ctx.kernels.on(gy)
        saved = ctx.saved_tensors
        x_hat = k.restore(saved[: ctx.n_x])
        weight, save_mean, save_invstd = saved[ctx.n_x :]
        g = ctx.grad.data_copy(k, gy)
        mask = [ctx.needs_input_grad[0], weight is not None, weight is not None]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x_hat, weight, None, None, save_mean, save_invstd, True, ctx.eps, mask)
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


def channel_codes(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, C, H, W) as `bits`-bit codes with one [lo, hi] per channel (nearest rounding):
    x ~ codes * scale + offset, |error| <= scale / 2. Up to 8 bits the codes are uint8 and the
    offset is lo; above, int16 codes shifted down by 2^15, and the offset shifted up to match
    (two bytes a value)."""
    lo, hi = minmax(x, dim=1)
    scale = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    codes = torch.round((x - lo) / scale)
    if bits <= 8:
        return codes.to(code_dtype(bits)), scale, lo
    return (codes - 2**15).to(torch.int16), scale, lo + 2**15 * scale


class FloatBNFn(torch.autograd.Function):
    """Standard BN in training mode on the full-precision input and output gradient; what it
    keeps for backward is x_tilde = (x - mean) * invstd as 8-bit codes with one range per
    channel (a channel that is mostly flat with a few spikes has |x_tilde| up to sqrt(n), so a
    range shared by all channels would leave the others a few codes). Backward is torch's on
    x = x_tilde / invstd + mean:

        dL/dx = gamma * invstd * (g - mean(g) - x_tilde * mean(g * x_tilde))

    with the means per channel, dL/dgamma = sum(g * x_tilde), dL/dbeta = sum(g)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, bits):  # noqa: ANN001, ANN205
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
        if bits is None:
            saved = (x.detach(),)
        else:
            saved = channel_codes((x.detach() - mean[:, None, None]) * invstd[:, None, None], bits)
        ctx.eps = eps
        ctx.save_for_backward(*saved, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        *saved, weight, mean, invstd = ctx.saved_tensors
        if len(saved) == 1:
            x = saved[0]
        else:
            codes, scale, lo = saved
            x = (codes * scale + lo) / invstd[:, None, None] + mean[:, None, None]
        mask = [ctx.needs_input_grad[0], weight is not None, weight is not None]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, ctx.eps, mask)
        return gx, gw, gb, None, None, None, None, None


class QuantNormMixin(ActRangeMixin):
    """Quantized BN in place of a BatchNorm2d; timm's BatchNormAct2d keeps its drop and
    activation layers, applied after the normalisation as before."""

    twin_prefix = "Quant"
    q8_norm = "batchnorm"

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        self._q8_init_range(config, kernels)
        # BN's output gradient is one 8-bit copy: bifurcation concerns the conv/linear GEMMs.
        self.q8_grad = GradSpec(config.grad_bits, config.grad_bits, config.grad_rounding)
        self.q8_range = RangeSpec(config.range_bn_chunks, config.range_bn_scale, self.eps)

    @property
    def q8_float_bn(self) -> bool:
        """Standard BN computing in full precision, 8-bit codes saved (bn_compute="float");
        a Range BN twin always computes on the 8-bit input."""
        return self.q8_norm == "batchnorm" and self.q8_config.bn_compute == "float"

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
        if x.numel() == 0:  # an empty batch: an empty output, the statistics left alone
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, weight,
                                             bias, use_batch_stats, 0.0, self.eps)
        rm = self.running_mean if self.training else None
        rv = self.running_var if self.training else None
        m = self._q8_momentum() if self.training and self.track_running_stats else 0.0
        if self.q8_float_bn:
            if not use_batch_stats:
                return nn.functional.batch_norm(x, self.running_mean, self.running_var, weight,
                                                 bias, False, 0.0, self.eps)
            bits = cfg.act_bits if cfg.bn_save_bits is None else cfg.bn_save_bits
            return FloatBNFn.apply(x, weight, bias, rm, rv, m, self.eps, bits)
        lo, hi = self._q8_input_range(x) if cfg.act_bits is not None else (None, None)
        if not use_batch_stats:  # eval: running statistics, input still quantized
            if cfg.act_bits is not None:
                x = _FakeQuantizeRange.apply(x, cfg.act_bits, lo, hi, self.q8_kernels)
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, weight,
                                             bias, False, 0.0, self.eps)
        if self.q8_norm == "range":
            return RangeBNFn.apply(x, weight, bias, lo, hi, rm, rv, m, cfg.act_bits, self.q8_grad,
                                   self.q8_range, self._q8_sync_group(), self.q8_kernels)
        return QuantBNFn.apply(x, weight, bias, lo, hi, rm, rv, m, self.eps, cfg.act_bits,
                               self.q8_grad, self.q8_kernels)

    @float32_under_autocast
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            y = self._q8_normalize(x)
        else:  # BatchNorm1d's (N, C) and (N, C, L), BatchNorm3d's (N, C, D, H, W): as 4-D
            y = self._q8_normalize(x.reshape(x.shape[0], x.shape[1], -1, 1)).reshape(x.shape)
        if isinstance(getattr(self, "act", None), nn.Module):  # timm BatchNormAct2d
            y = self.act(self.drop(y))
        return y


class _FakeQuantizeRange(torch.autograd.Function):
    """x quantized over a given [lo, hi] (eval-time running range), straight-through."""

    @staticmethod
    def forward(ctx, x, bits, lo, hi, kernels: Kernels):  # noqa: ANN001, ANN205
        return kernels.on(x).quantize_input(x, lo, hi, bits)[0]

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g, None, None, None, None


class RangeNormMixin(QuantNormMixin):
    """Range BN in place of a BatchNorm2d."""

    twin_prefix = "Range"
    q8_norm = "range"
    q8_sync: object = None  # None: per-replica statistics; "world" or a process group: synced

    def _q8_sync_group(self):  # noqa: ANN202
        """The process group to all-reduce batch statistics over, or None (one process)."""
        if self.q8_sync is None or not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.q8_sync == "world" else self.q8_sync
        return group if dist.get_world_size(group) > 1 else None


def set_range_bn_sync(model: nn.Module, group: object = "world", enabled: bool = True) -> int:
    """Synchronise every Range BN layer of `model` across the ranks of `group` (default: all
    ranks; `enabled=False`: back to per-replica statistics, like BN under DDP). Synced layers
    all-reduce the batch mean, the chunks' scaled ranges and, in backward, the two gradient
    sums: the result equals Range BN over the global batch split into all ranks' chunks.
    Activation ranges stay per replica. Returns the number of layers changed."""
    layers = [m for m in model.modules() if isinstance(m, RangeNormMixin)]
    for m in layers:
        m.q8_sync = (group if group is not None else "world") if enabled else None
    return len(layers)


class RangeBatchNorm2d(RangeNormMixin, nn.BatchNorm2d):
    """BatchNorm2d normalised by the scaled range (Range BN), with 8-bit input and gradient."""


class QuantBatchNorm2d(QuantNormMixin, nn.BatchNorm2d):
    """Standard BatchNorm2d with 8-bit input and output gradient."""


_TWINS[(RangeNormMixin, nn.BatchNorm2d)] = RangeBatchNorm2d
_TWINS[(QuantNormMixin, nn.BatchNorm2d)] = QuantBatchNorm2d


class QuantBatchNorm1d(QuantNormMixin, nn.BatchNorm1d):
    """Standard BatchNorm1d with 8-bit input and output gradient, (N, C) or (N, C, L)."""


class RangeBatchNorm1d(RangeNormMixin, nn.BatchNorm1d):
    """BatchNorm1d as Range BN: (N, C) or (N, C, L) normalised as (N, C, L, 1)."""


class QuantBatchNorm3d(QuantNormMixin, nn.BatchNorm3d):
    """Standard BatchNorm3d with 8-bit input and output gradient."""


class RangeBatchNorm3d(RangeNormMixin, nn.BatchNorm3d):
    """BatchNorm3d as Range BN: (N, C, D, H, W) normalised as (N, C, D*H*W, 1)."""


for _twin in (QuantBatchNorm1d, RangeBatchNorm1d, QuantBatchNorm3d, RangeBatchNorm3d):
    _TWINS[_twin.__bases__] = _twin  # (mixin, base)


# ---- LayerNorm and GroupNorm: statistics per sample ------------------------------------------
# The values normalised together are one row of n values: a token's features (LayerNorm), a
# (sample, group) (GroupNorm); the batch plays no part, so eval computes what training does.
# Range LayerNorm / GroupNorm take sigma_hat = c(n) (max - min) of the row: Range BN with one
# chunk, the row (docs/RANGE_BN.md).


@dataclass(frozen=True)
class SampleNormSpec:
    """One F.layer_norm (`normalized_shape`: x's last dims) or F.group_norm (`groups`) call."""

    normalized_shape: tuple[int, ...] | None
    groups: int | None
    eps: float
    rule: str = "exact"  # c(n) of the range variant (range_scale)

    def rows(self, x: Tensor) -> tuple[int, int]:
        """x as (rows, n): each row is the n values normalised together."""
        if self.groups is None:
            n = math.prod(self.normalized_shape)
            return x.numel() // n, n
        rows = x.shape[0] * self.groups
        return rows, x.numel() // rows

    def affine_shape(self, x: Tensor) -> tuple[int, ...]:
        """The shape of gamma and beta that broadcasts against x."""
        if self.groups is None:
            return self.normalized_shape
        return (x.shape[1],) + (1,) * (x.dim() - 2)


class QuantSampleNormFn(torch.autograd.Function):
    """Standard LayerNorm / GroupNorm on an 8-bit input, with an 8-bit output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, spec: SampleNormSpec, act_bits,  # noqa: ANN001, ANN205
                grad: GradSpec, kernels: Kernels):  # noqa: ANN001
        x_hat, saved_x = kernels.on(x).quantize_input(x, x_lo, x_hi, act_bits)
        if spec.groups is None:
            y, mean, rstd = torch.ops.aten.native_layer_norm(
                x_hat, spec.normalized_shape, weight, bias, spec.eps)
        else:
            N, C = x.shape[:2]
            y, mean, rstd = torch.ops.aten.native_group_norm(
                x_hat.contiguous(), weight, bias, N, C, x.numel() // (N * C), spec.groups,
                spec.eps)
        ctx.spec, ctx.grad, ctx.kernels, ctx.n_x = spec, grad, kernels, len(saved_x)
        ctx.save_for_backward(*saved_x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        k = ctx.kernels.on(gy)
        spec: SampleNormSpec = ctx.spec
        saved = ctx.saved_tensors
        x_hat = k.restore(saved[: ctx.n_x])
        weight, bias, mean, rstd = saved[ctx.n_x :]
        g = ctx.grad.data_copy(k, gy)
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], bias is not None and need[2]]
        if spec.groups is None:
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                g, x_hat, spec.normalized_shape, mean, rstd, weight, bias, mask)
        else:
            N, C = x_hat.shape[:2]
            gx, gw, gb = torch.ops.aten.native_group_norm_backward(
                g.contiguous(), x_hat.contiguous(), mean, rstd, weight, N, C,
                x_hat.numel() // (N * C), spec.groups, mask)
        return gx, gw, gb, None, None, None, None, None, None


class RangeSampleNormFn(torch.autograd.Function):
    """LayerNorm / GroupNorm normalised by each row's scaled range, on an 8-bit input, with an
    8-bit output gradient:  y = (x - mean) / S * gamma + beta,  S = sqrt(sigma_hat^2 + eps),
    sigma_hat = c(n) (max - min), mean, max and min over the row's n values."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, spec: SampleNormSpec, act_bits,  # noqa: ANN001, ANN205
                grad: GradSpec, kernels: Kernels):  # noqa: ANN001
        x_hat, saved_x = kernels.on(x).quantize_input(x, x_lo, x_hi, act_bits)
        rows, n = spec.rows(x)
        v = x_hat.reshape(rows, n)
        mean = v.mean(-1, keepdim=True)
        v_max, v_min = v.amax(-1, keepdim=True), v.amin(-1, keepdim=True)
        c = range_scale(n, spec.rule)
        sigma = (v_max - v_min) * c
        S = torch.sqrt(sigma * sigma + spec.eps)
        y = ((v - mean) / S).reshape(x.shape)
        shape = spec.affine_shape(x)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        ctx.spec, ctx.grad, ctx.kernels, ctx.n_x, ctx.c = spec, grad, kernels, len(saved_x), c
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(*saved_x, weight, mean, sigma, S, v_max, v_min)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        k = ctx.kernels.on(gy)
        spec: SampleNormSpec = ctx.spec
        saved = ctx.saved_tensors
        x_hat = k.restore(saved[: ctx.n_x])
        weight, mean, sigma, S, v_max, v_min = saved[ctx.n_x :]
        g = ctx.grad.data_copy(k, gy)
        g = g.contiguous()  # sums in one order on every backend (gy may come permuted)
        rows, n = spec.rows(x_hat)
        shape = spec.affine_shape(x_hat)
        v = x_hat.reshape(rows, n)
        x_tilde = (v - mean) / S
        g_gamma = g_beta = None
        if weight is not None and ctx.needs_input_grad[1]:
            g_gamma = (g * x_tilde.reshape(g.shape)).sum_to_size(shape).reshape(weight.shape)
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            g_beta = g.sum_to_size(shape).reshape(ctx.bias_shape)
        h = (g * weight.view(shape) if weight is not None else g).reshape(rows, n)  # dL/dx_tilde
        # the mean's gradient centres h; S's, dL/dS = -sum(h x_tilde) / S, reaches x through
        # dS/dsigma = sigma / S and dsigma/dx = c(n) at the row's max, -c(n) at its min
        # (shared among ties)
        grad_range = -(h * x_tilde).sum(-1, keepdim=True) / S * (sigma / S) * ctx.c
        at_max, at_min = (v == v_max).to(v.dtype), (v == v_min).to(v.dtype)
        gx = (h - h.mean(-1, keepdim=True)) / S + grad_range * (
            at_max / at_max.sum(-1, keepdim=True) - at_min / at_min.sum(-1, keepdim=True))
        return gx.reshape(gy.shape), g_gamma, g_beta, None, None, None, None, None, None


class _RerouteNorm(TorchFunctionMode):
    """Inside a twin's forward, send F.layer_norm / F.group_norm to the quantized function."""

    def __init__(self, layer: QuantSampleNormMixin) -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return self.layer._q8_layer_norm(*args, **kwargs)
        if func is F.group_norm:
            return self.layer._q8_group_norm(*args, **kwargs)
        return func(*args, **kwargs)


class QuantSampleNormMixin(ActRangeMixin):
    """Quantized LayerNorm / GroupNorm in place of any nn.LayerNorm / nn.GroupNorm (timm's
    LayerNorm2d, LayerNormAct, GroupNormAct... too): the module's own forward runs, its
    F.layer_norm / F.group_norm call rerouted to the quantized function. `bn_param_bits`
    quantizes gamma and beta, as for BN."""

    twin_prefix = "Quant"
    q8_norm = "standard"

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        self._q8_init_range(config, kernels)
        self.q8_grad = GradSpec(config.grad_bits, config.grad_bits, config.grad_rounding)

    @float32_under_autocast
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        with _RerouteNorm(self):
            return super().forward(x, *args, **kwargs)

    def _q8_layer_norm(self, x: Tensor, normalized_shape: list[int], weight: Tensor | None = None,
                       bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
        if x.numel() == 0:
            return F.layer_norm(x, normalized_shape, weight, bias, eps)
        spec = SampleNormSpec(tuple(normalized_shape), None, eps, self.q8_config.range_bn_scale)
        return self._q8_apply(x, weight, bias, spec)

    def _q8_group_norm(self, x: Tensor, num_groups: int, weight: Tensor | None = None,
                       bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
        if x.numel() == 0:
            return F.group_norm(x, num_groups, weight, bias, eps)
        spec = SampleNormSpec(None, num_groups, eps, self.q8_config.range_bn_scale)
        return self._q8_apply(x, weight, bias, spec)

    def _q8_apply(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  spec: SampleNormSpec) -> Tensor:
        cfg: QuantConfig = self.q8_config
        if cfg.bn_param_bits is not None:
            weight, bias = (None if p is None else fake_quantize(p, cfg.bn_param_bits)
                            for p in (weight, bias))
        lo, hi = self._q8_input_range(x) if cfg.act_bits is not None else (None, None)
        fn = RangeSampleNormFn if self.q8_norm == "range" else QuantSampleNormFn
        return fn.apply(x, weight, bias, lo, hi, spec, cfg.act_bits, self.q8_grad,
                        self.q8_kernels)


class RangeSampleNormMixin(QuantSampleNormMixin):
    """Range LayerNorm / GroupNorm in place of an nn.LayerNorm / nn.GroupNorm."""

    twin_prefix = "Range"
    q8_norm = "range"


class QuantLayerNorm(QuantSampleNormMixin, nn.LayerNorm):
    """Standard LayerNorm with 8-bit input and output gradient."""


class RangeLayerNorm(RangeSampleNormMixin, nn.LayerNorm):
    """LayerNorm normalised by each token's scaled range, with 8-bit input and gradient."""


class QuantGroupNorm(QuantSampleNormMixin, nn.GroupNorm):
    """Standard GroupNorm with 8-bit input and output gradient."""


class RangeGroupNorm(RangeSampleNormMixin, nn.GroupNorm):
    """GroupNorm normalised by each (sample, group)'s scaled range, 8-bit input and gradient."""


for _twin in (QuantLayerNorm, RangeLayerNorm, QuantGroupNorm, RangeGroupNorm):
    _TWINS[_twin.__bases__] = _twin
