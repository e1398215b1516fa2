"""The GEMMLOWP quantizer of the paper: asymmetric, uniform, 2^bits levels over [min, max].

    scale s = (hi - lo) / (2^B - 2),  zero point z = ceil(-lo / s)       (see `qparams`)
    code  q = clamp(round(x / s) + z, 0, 2^B - 1)      nearest
          q = clamp(floor(x / s + u) + z, 0, 2^B - 1)  stochastic, u ~ U[0, 1): E[x_hat] = x
    value x_hat = (q - z) * s

u is drawn at 16-bit resolution by PyTorch's generator (`uniform16`), or hashed from the element
index and a drawn seed at 24-bit resolution by the fused kernels (`uniform_hash`: torch.compile,
q8.cpu_kernels), so E[x_hat] = x up to 2^-17 of a step.

Non-finite input propagates: a NaN or inf in a tensor (or slice) makes its range non-finite and
every quantized value of it NaN, so a divergence is seen at the loss, never hidden as finite
garbage.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from q8 import cpu_kernels
from q8.compile import compile_enabled, fused


class QTensor(NamedTuple):
    """Integer codes plus the (scale, zero point) that map them back to real values."""

    codes: Tensor  # uint8 for <= 8 bits, int32 above
    scale: Tensor  # broadcastable to codes
    zero_point: Tensor  # float, integer-valued, broadcastable to codes

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point)


def qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point for the range [lo, hi] (elementwise over slices).

    The range is widened to hold 0 so that 0.0 is a code (GEMMLOWP's nudged zero point: ReLU
    zeros and zero gradients stay exact). One code of slack, s = range / (2^B - 2) with
    z = ceil(-lo / s), makes the grid [-z*s, (2^B - 1 - z)*s] cover [lo, hi]: nothing is clipped,
    so |x_hat - x| <= s/2 and stochastic rounding stays unbiased up to the range ends.
    A constant slice c (zero range) gets s = |c| (1 if c == 0), which represents c exactly;
    |c| is hi0 - lo0 there.
    """
    if lo.dim() == 0 and _host_readable(lo):
        return _qparams_host(lo, hi, bits)
    lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
    span = hi0 - lo0
    const = torch.where(span == 0, 1.0, span)  # a NaN range keeps a NaN scale
    scale = torch.where(hi > lo, span / (2**bits - 2), const)
    zero_point = torch.ceil(-lo0 / scale)
    return scale, zero_point


def _host_readable(t: Tensor) -> bool:
    """Whether reading t's values out to Python is cheap: in eager PyTorch on a CPU. (A GPU
    would wait for the device; a compiled graph cannot trace it.)"""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _qparams_host(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """qparams of one range on a CPU, in NumPy's float32 scalar arithmetic: the same floats
    (signed zeros and NaN included) in 4 dispatcher calls instead of 12, each of which costs
    more than the arithmetic on a 0-d tensor."""
    f32 = np.float32
    lo, hi = f32(lo.item()), f32(hi.item())
    lo0 = f32(0) if lo > 0 else lo  # clamp keeps -0.0 and NaN
    hi0 = f32(0) if hi < 0 else hi
    with np.errstate(all="ignore"):  # overflow, inf and NaN as on tensors
        span = hi0 - lo0
        const = f32(1) if span == 0 else span  # a NaN range keeps a NaN scale
        scale = span / f32(2**bits - 2) if hi > lo else const
        zero_point = np.ceil(-lo0 / scale)
    return (torch.scalar_tensor(float(scale), dtype=torch.float32),
            torch.scalar_tensor(float(zero_point), dtype=torch.float32))


def aminmax(x: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of x, or of each slice x.select(dim, i), shaped to broadcast against x."""
    if dim is None:
        return torch.aminmax(x)
    dim = dim % x.dim()
    lo, hi = torch.aminmax(x.transpose(0, dim).reshape(x.shape[dim], -1), dim=1)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return lo.view(shape), hi.view(shape)


def uniform_hash(like: Tensor, seed: Tensor) -> Tensor:
    """U[0, 1) noise shaped like `like` from a counter-based hash (lowbias32) of the element
    index and `seed`: a compiler fuses it into the quantizer, where torch.rand is its own pass."""
    h = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    h = (h + seed) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h >> 8).to(like.dtype) * (1.0 / (1 << 24))


def _round_scaled(x: Tensor, scale: Tensor, noise: Tensor | None,
                  consume_noise: bool = False) -> Tensor:
    """x / s rounded to an integer (as float): nearest if noise is None, else floor(x/s + u)
    with noise = U[0,1) samples u, or an int64 seed for uniform_hash. u + x/s is one addcdiv
    (the same rounding as x/s, then + u); with consume_noise it is written over u."""
    # One new tensor, then in place: eager PyTorch on a CPU pays a page fault per 4 KiB of
    # every fresh activation-sized buffer, more than the arithmetic (compiled: the same graph).
    if noise is None:
        return (x / scale).round_()
    if noise.dtype == torch.int64:
        noise, consume_noise = uniform_hash(x, noise), True
    y = noise.addcdiv_(x, scale) if consume_noise else torch.addcdiv(noise, x, scale)
    return y.floor_()


def _clamp_shifted(y: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """clamp(y + z, 0, 2^B - 1) - z, in place, as clamp(y, -z, 2^B - 1 - z): the same to the
    bit for integer-valued y and z (y + z is exact below 2^24, and beyond that both clamp).
    Eager PyTorch on a CPU clamps by tensors ~15x slower than by numbers, so a single zero
    point is read out there."""
    top = 2**bits - 1
    if zero_point.numel() == 1 and _host_readable(zero_point):
        z = zero_point.item()
        return y.clamp_(-z, top - z)
    return torch.clamp(y, -zero_point, top - zero_point, out=y)


def round_to_grid(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
                  noise: Tensor | None) -> Tensor:
    """The integer code q of x (as float): nearest if noise is None, else stochastic with
    noise = U[0,1) samples, or an int64 seed for uniform_hash."""
    return _round_scaled(x, scale, noise).add_(zero_point).clamp_(0, 2**bits - 1)


def code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32


@fused
def quantize_codes(x: Tensor, lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, ...]:
    """Nearest rounding over [lo, hi]: (codes, x_hat, scale, zero_point) in one pass."""
    scale, zero_point = qparams(lo, hi, bits)
    q = round_to_grid(x, scale, zero_point, bits, None)
    # float -> int16 -> uint8 is exact here (integers in [0, 255]) and faster in eager PyTorch
    # on a CPU than the direct float -> uint8 conversion
    codes = q.to(torch.int16).to(torch.uint8) if bits <= 8 else q.to(code_dtype(bits))
    return codes, q.sub_(zero_point).mul_(scale), scale, zero_point


@fused
def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
               noise: Tensor | None = None, consume_noise: bool = False) -> Tensor:
    """x_hat = (q - z) * s for given (scale, zero point): (clamp(round(x/s) + z) - z) * s,
    computed as clamp(round(x/s), -z, 2^B - 1 - z) * s in four passes. `consume_noise`: the
    caller's U[0,1) samples may be overwritten."""
    y = _round_scaled(x, scale, noise, consume_noise)
    return _clamp_shifted(y, zero_point, bits).mul_(scale)


@fused
def fake_quant_own_range(x: Tensor, scale: Tensor) -> Tensor:
    """fake_quant(x, scale, zero_point, bits) with nearest rounding, for (scale, zero_point)
    from qparams of x's own [min, max] (per slice or not), in 3 passes instead of 6. Over its
    own range no code is clipped, so the zero point cancels exactly: (round(x/s) + z - z) * s.
    With lo0 = min(lo, 0) and hi0 = max(hi, 0): z = ceil(-lo0/s) >= -x/s, so round(x/s) + z
    >= 0; (hi0 - lo0)/s is 2^B - 2 up to float rounding (~2^-22 relative) and z < 1 - lo0/s,
    so round(x/s) + z <= 2^B - 1 with about half a code to spare (a constant slice: x/s = +-1,
    z = 0 or 1). tests/test_q8_quantizer.py checks the equality."""
    return (x / scale).round_().mul_(scale)


@fused
def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return codes.float().sub_(zero_point).mul_(scale)


def uniform16(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """U[0, 1) noise shaped like `like`, at 16-bit resolution: u = (k + 1/2) / 2^16 with k
    uniform on 0..2^16 - 1, four values from each 64-bit draw. A CPU draws random numbers
    serially (mt19937), and torch.rand spends one 32-bit draw per value: this takes half its
    time. For stochastic rounding, |E[floor(y + u)] - y| <= 2^-17 of a step."""
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits
    u = words.view(torch.int16)[:n].float()  # k - 2^15
    return u.add_(2**15 + 0.5).mul_(2**-16).view(like.shape).to(like.dtype)


def rounding_noise(x: Tensor, rounding: str,
                   generator: torch.Generator | None = None) -> Tensor | None:
    """What round_to_grid needs for `rounding`: None, U[0,1) samples (eager PyTorch ops) or a
    hash seed (fused kernels: compiled, or q8's CPU kernels); both drawn from `generator`
    (default: torch's), so seeding reproduces."""
    if rounding == "nearest":
        return None
    if compile_enabled() or cpu_kernels.usable(x):
        return torch.randint(0, 2**62, (), generator=generator, device=x.device)
    return uniform16(x, generator)


def quantize(
    x: Tensor,
    bits: int,
    scale: Tensor,
    zero_point: Tensor,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """x quantized with the given (scale, zero point) and dequantized: x_hat."""
    noise = rounding_noise(x, rounding, generator)
    return fake_quant(x, scale, zero_point, bits, noise, consume_noise=True)


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, rounding, dim, generator):  # noqa: ANN001, ANN205
        scale, zero_point = qparams(*aminmax(x, dim), bits)  # over x's own [min, max]
        return quantize(x, bits, scale, zero_point, rounding, generator)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad, None, None, None, None  # straight-through estimator


def fake_quantize(
    x: Tensor,
    bits: int,
    rounding: str = "nearest",
    dim: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """GEMMLOWP fake quantization to 2^bits levels over [min, max] of x (per slice along `dim`).

    Returns the dequantized tensor; the gradient passes straight through (STE).
    `rounding` is "nearest" or "stochastic"; `generator` seeds the stochastic draws.
    """
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding={rounding!r} is invalid: valid choices are nearest, stochastic")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is invalid: bits must be an integer in 2..16")
    return _FakeQuantizeSTE.apply(x, bits, rounding, dim, generator)
