"""The reference kernels: the paper's maths in plain PyTorch, the oracle of every other backend.

Quantizer (GEMMLOWP: asymmetric, uniform, B bits) of x over a range [lo, hi]; the range is
widened to hold 0 (lo0 = min(lo, 0), hi0 = max(hi, 0)), so that 0.0 is a code:

    s = (hi0 - lo0) / (2^B - 2)        one code of slack: the grid [-z s, (2^B - 1 - z) s]
    z = ceil(-lo0 / s)                 covers [lo, hi], so |x_hat - x| <= s/2 inside it
    q = clamp(round(x / s) + z, 0, 2^B - 1)          nearest (half to even)
    q = clamp(floor(x / s + u) + z, 0, 2^B - 1)      stochastic: E[x_hat] = x
    x_hat = (q - z) s

A constant range (lo == hi == c) gets s = |c| (1 if c == 0), which represents c exactly. A NaN
or inf in the range makes s and every x_hat NaN: a divergence shows at the loss, never hidden.

Noise for stochastic rounding: u = lowbias32((i + seed) mod 2^32) / 2^32 at 24-bit resolution
for element i (row-major), with one seed per quantization call drawn from torch's generator
(a 0-d int64 tensor on the CPU, so that drawing it reads nothing back to Python and a compiled
graph keeps it): every backend computes the same u, so a seeded run is the same on every
machine, and |E[floor(y + u)] - y| <= 2^-24 of a step.

Each op below is the specification of the same op of `q8.kernels.cpu` and `q8.kernels.cuda`:
their elementwise results equal these bit for bit; their per-plane sums agree within float
summation's bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from q8.gemm import CODE_DTYPE, Operand

Seed = Tensor | int  # a stochastic rounding's seed: draw_seed's 0-d tensor, or a plain integer

# ---- the quantizer ------------------------------------------------------------------------


def minmax(x: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of x (0-d), or of each slice x.select(dim, i) shaped to broadcast against
    x; (0, 0) for an empty x."""
    if x.numel() == 0:
        zero = x.new_zeros(())
        return zero, zero
    if dim is None:
        return torch.aminmax(x)
    lo, hi = torch.aminmax(x.movedim(dim, 0).reshape(x.shape[dim], -1), dim=1)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return lo.view(shape), hi.view(shape)


def qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale s and integer zero point z (as floats) of the range [lo, hi], elementwise."""
    lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
    span = hi0 - lo0
    constant = torch.where(span == 0, 1.0, span)  # a NaN range keeps a NaN scale
    scale = torch.where(hi > lo, span / (2**bits - 2), constant)
    return scale, torch.ceil(-lo0 / scale)


def uniform(shape: torch.Size, seed: Seed, device: torch.device | str = "cpu") -> Tensor:
    """U[0, 1) noise of `shape`: the lowbias32 hash of (element index + seed) mod 2^32."""
    h = (torch.arange(shape.numel(), device=device, dtype=torch.int64) + seed) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return ((h >> 8).to(torch.float32) * 2.0**-24).view(shape)


def draw_seed(generator: torch.Generator | None = None) -> Tensor:
    """The seed of one quantization call, a 0-d int64 tensor on the CPU, from `generator`
    (default: torch's CPU generator, which torch.manual_seed seeds)."""
    seed = torch.randint(0, 2**62, (), generator=generator, device=generator.device
                         if generator is not None else "cpu")
    return seed.cpu()


def codes(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
          seed: Seed | None = None) -> Tensor:
    """q (as floats): round to nearest if seed is None, else stochastically with u(seed)."""
    y = x / scale
    y = y.round() if seed is None else (y + uniform(x.shape, seed, x.device)).floor()
    return (y + zero_point).clamp(0, 2**bits - 1)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """x_hat = (q - z) s, from integer codes or their float values."""
    return (q.float() - zero_point) * scale


def fake_quant(x: Tensor, lo: Tensor, hi: Tensor, bits: int | None,
               seed: Seed | None = None) -> Tensor:
    """x_hat of x over [lo, hi] (x itself for bits=None)."""
    if bits is None:
        return x
    scale, zero_point = qparams(lo, hi, bits)
    return dequantize(codes(x, scale, zero_point, bits, seed), scale, zero_point)


def code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32


def centred_dtype(bits: int) -> torch.dtype:
    """The dtype of q - z as a GEMM operand (q8.gemm): bf16 up to 8 bits, float32 above (both
    exact for these integers)."""
    return CODE_DTYPE if bits <= 8 else torch.float32


# ---- the backend ----------------------------------------------------------------------------


class Reference:
    """The kernel interface of q8's autograd functions, in plain PyTorch on any device.

    A saved input (`saved`) is what a backward keeps of an activation: (codes, scale,
    zero_point) for a quantized one, (x,) for a full-precision one. `seed` is None for
    rounding to nearest, else the stochastic rounding's seed (`draw_seed`).
    """

    name = "reference"

    def serves(self, x: Tensor) -> bool:
        """Whether this backend runs on x's device."""
        return True

    # conv / linear / BN inputs

    def quantize_input(self, x: Tensor, lo: Tensor, hi: Tensor,
                       bits: int | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """x_hat over [lo, hi] (nearest) and what backward keeps of x: its codes."""
        if bits is None:
            return x, (x,)
        scale, zero_point = qparams(lo, hi, bits)
        q = codes(x, scale, zero_point, bits)
        return dequantize(q, scale, zero_point), (q.to(code_dtype(bits)), scale, zero_point)

    def restore(self, saved: tuple[Tensor, ...]) -> Tensor:
        """x_hat from what quantize_input saved."""
        return saved[0] if len(saved) == 1 else dequantize(*saved)

    def restore_codes(self, saved: tuple[Tensor, ...]) -> Operand:
        """What quantize_input saved as a GEMM operand: q - z with its scale and zero point."""
        if len(saved) == 1:
            return Operand(saved[0])
        q, scale, zero_point = saved
        bits = 8 if q.dtype == torch.uint8 else 16
        return Operand((q.float() - zero_point).to(centred_dtype(bits)), scale, zero_point)

    # weights: nearest rounding over W's own range, per tensor or per output channel

    def quantize_weight(self, w: Tensor, bits: int | None,
                        per_channel: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        """W_hat and the (scale, zero point) that requantize_weight rebuilds it from."""
        if bits is None:
            return w, ()
        scale, zero_point = qparams(*minmax(w.detach(), 0 if per_channel else None), bits)
        return self.requantize_weight(w, bits, (scale, zero_point)), (scale, zero_point)

    def requantize_weight(self, w: Tensor, bits: int | None, qp: tuple[Tensor, ...]) -> Tensor:
        if bits is None:
            return w
        scale, zero_point = qp
        return dequantize(codes(w.detach(), scale, zero_point, bits), scale, zero_point)

    def weight_codes(self, w: Tensor, bits: int | None, qp: tuple[Tensor, ...]) -> Operand:
        """W as a GEMM operand: q - z of requantize_weight's codes, with scale and zero point."""
        if bits is None:
            return Operand(w)
        scale, zero_point = qp
        q = codes(w.detach(), scale, zero_point, bits)
        return Operand((q - zero_point).to(centred_dtype(bits)), scale, zero_point)

    # layer gradients: g_l for dL/dx (bits) and its copy for dL/dW (wbits), bifurcation

    def grad_pair(self, g: Tensor, bits: int | None, wbits: int | None, seed: Seed | None,
                  need_data: bool = True, need_weight: bool = True
                  ) -> tuple[Tensor | None, Tensor | None]:
        """Both copies of g_l over g's own range, rounded with the same u; None for a copy not
        needed; one tensor for both when bits == wbits; g itself for bits None."""
        lo, hi = minmax(g)
        if bits == wbits:
            g_q = fake_quant(g, lo, hi, bits, seed)
            return g_q, g_q
        data = fake_quant(g, lo, hi, bits, seed) if need_data else None
        return data, (fake_quant(g, lo, hi, wbits, seed) if need_weight else None)

    def grad_pair_codes(self, g: Tensor, bits: int | None, wbits: int | None,
                        seed: Seed | None, need_data: bool = True, need_weight: bool = True
                        ) -> tuple[Operand | None, Operand | None]:
        """grad_pair's copies as GEMM operands (q - z, scale, zero point; two bytes for more
        than 8 bits: q8.gemm.Operand); g itself for a copy of bits None."""
        lo, hi = minmax(g)

        def copy(b: int | None) -> Operand:
            if b is None:
                return Operand(g)
            scale, zero_point = qparams(lo, hi, b)
            centred = codes(g, scale, zero_point, b, seed) - zero_point
            if b <= 8:
                return Operand(centred.to(CODE_DTYPE), scale, zero_point)
            high = torch.floor(centred / 256)  # two bytes: 256 hi + lo, lo in [0, 255]
            low = centred - 256 * high
            return Operand(high.to(CODE_DTYPE), scale, zero_point, low.to(CODE_DTYPE))

        if bits == wbits:
            both = copy(bits)
            return both, both
        return (copy(bits) if need_data else None), (copy(wbits) if need_weight else None)

    # ReLU: y and a 1-bit mask of y > 0 (bit i of byte k is element 8k + i)

    def relu(self, x: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        y = x.relu_() if inplace else x.relu()
        flags = F.pad((y > 0).flatten(), (0, -y.numel() % 8)).view(-1, 8)
        weights = 2 ** torch.arange(8, device=y.device, dtype=torch.int32)
        return y, (flags * weights).sum(1).to(torch.uint8)

    def relu_backward(self, gy: Tensor, packed: Tensor) -> Tensor:
        """gy where y > 0, else 0 (PyTorch's ReLU gradient)."""
        bits = (packed.view(-1, 1).int() >> torch.arange(8, device=gy.device)) & 1
        mask = bits.flatten()[: gy.numel()].bool().view(gy.shape)
        return torch.where(mask, gy, 0.0)

    # max-pool: the argmax saved as its offset inside the window (uint8)

    def max_pool(self, x: Tensor, geometry: tuple) -> tuple[Tensor, Tensor]:
        """y and each output's argmax as a window offset, row-major over the kernel."""
        kernel, stride, padding, dilation, ceil_mode = geometry
        y, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode,
                              return_indices=True)
        oh, ow = _window_origins(y.shape, stride, padding, x.device)
        W = x.shape[-1]
        row = (idx // W - oh) // dilation[0]
        col = (idx % W - ow) // dilation[1]
        return y, (row * kernel[1] + col).to(torch.uint8)

    def max_pool_backward(self, gy: Tensor, local: Tensor, in_shape: torch.Size,
                          geometry: tuple) -> Tensor:
        kernel, stride, padding, dilation, ceil_mode = geometry
        oh, ow = _window_origins(gy.shape, stride, padding, gy.device)
        local = local.long()
        row = local // kernel[1] * dilation[0] + oh
        col = local % kernel[1] * dilation[1] + ow
        return torch.ops.aten.max_pool2d_with_indices_backward(
            gy, gy.new_empty(in_shape), kernel, stride, padding, dilation, ceil_mode,
            row * in_shape[-1] + col)

    # Range BN (q8.norm): the passes over activations; the per-channel maths is in q8.norm.
    # A sum over a plane of quantized values is a sum of integers: with x_hat = (q - z) s,
    # sum(x_hat) = s sum(q - z) and sum(g x_hat) = s_g s sum((q_g - z_g)(q - z)), summed exactly
    # (in float64: integers below 2^53) and rounded once, so every backend gets the same bits.

    def range_bn_stats(self, x: Tensor, lo: Tensor, hi: Tensor, bits: int | None
                       ) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor]:
        """What backward keeps of x, and per plane (sample, channel) of x_hat: sum, min, max,
        each (B, C)."""
        x_hat, saved = self.quantize_input(x, lo, hi, bits)
        planes = x_hat.flatten(2)
        if len(saved) == 1:
            total = planes.sum(-1)
        else:
            q, scale, zero_point = saved
            total = ((q.flatten(2).double() - zero_point.double()).sum(-1) * scale.double())
        return saved, total.to(planes.dtype), planes.amin(-1), planes.amax(-1)

    def range_bn_affine(self, saved: tuple[Tensor, ...], a: Tensor, b: Tensor) -> Tensor:
        """y = a x_hat + b, a and b per channel."""
        x_hat = self.restore(saved)
        shape = [1, -1] + [1] * (x_hat.dim() - 2)
        return x_hat * a.view(shape) + b.view(shape)

    def range_bn_grad_sums(self, saved: tuple[Tensor, ...], gy: Tensor, mean: Tensor,
                           t_max: Tensor, t_min: Tensor, bits: int | None, seed: Seed | None
                           ) -> tuple[Tensor, ...]:
        """Per plane (B, C), with g = gy quantized to `bits` over gy's range: the sums of g and
        of g (x_hat - mean), the number of values equal to their chunk's max t_max and min
        t_min (B, C); and gy's range, from which range_bn_grad_input rebuilds the same g."""
        g_lo, g_hi = minmax(gy)
        x_hat = self.restore(saved).flatten(2)
        n_max = (x_hat == t_max.unsqueeze(-1)).sum(-1).float()
        n_min = (x_hat == t_min.unsqueeze(-1)).sum(-1).float()
        if bits is None or len(saved) == 1:  # a full-precision g or x: float sums
            g = fake_quant(gy, g_lo, g_hi, bits, seed).flatten(2)
            s_gx = (g * (x_hat - mean.view(1, -1, 1))).sum(-1)
            return g.sum(-1), s_gx, n_max, n_min, g_lo, g_hi
        g_scale, g_zero = qparams(g_lo, g_hi, bits)
        dg = (codes(gy, g_scale, g_zero, bits, seed) - g_zero).flatten(2).double()
        q, scale, zero_point = saved
        dx = q.flatten(2).double() - zero_point.double()
        sum_g, sum_gx = dg.sum(-1), (dg * dx).sum(-1)
        s_g = g_scale.double() * sum_g
        s_gx = g_scale.double() * (scale.double() * sum_gx - mean.double() * sum_g)
        return s_g.to(gy.dtype), s_gx.to(gy.dtype), n_max, n_min, g_lo, g_hi

    def range_bn_grad_input(self, saved: tuple[Tensor, ...], gy: Tensor, g_lo: Tensor,
                            g_hi: Tensor, bits: int | None, seed: Seed | None, a: Tensor,
                            g_mean: Tensor, t_max: Tensor, t_min: Tensor, w_max: Tensor,
                            w_min: Tensor) -> Tensor:
        """dL/dx = a (g - g_mean) + w_max where x_hat is its chunk's max - w_min where it is
        its chunk's min; a, g_mean per channel, the rest per plane (B, C)."""
        g = fake_quant(gy, g_lo, g_hi, bits, seed).flatten(2)
        x_hat = self.restore(saved).flatten(2)
        at_max = torch.where(x_hat == t_max.unsqueeze(-1), w_max.unsqueeze(-1), 0.0)
        at_min = torch.where(x_hat == t_min.unsqueeze(-1), w_min.unsqueeze(-1), 0.0)
        gx = (g - g_mean.view(1, -1, 1)) * a.view(1, -1, 1) + at_max - at_min
        return gx.view(gy.shape)


def _window_origins(out_shape: torch.Size, stride: tuple, padding: tuple,
                    device: torch.device) -> tuple[Tensor, Tensor]:
    """The input row (column) where each output row's (column's) window starts: (OH, 1) and
    (1, OW), int64."""
    oh = torch.arange(out_shape[-2], device=device).view(-1, 1) * stride[0] - padding[0]
    ow = torch.arange(out_shape[-1], device=device).view(1, -1) * stride[1] - padding[1]
    return oh, ow
