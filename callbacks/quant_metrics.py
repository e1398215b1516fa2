"""What one quantization does to one tensor, on q8's own grid (q8.kernels.reference).

All functions return 0-d tensors (no host sync); the callback turns a whole step's worth into
floats at once. SQNR = 10 log10(E[x^2] / E[(x_hat - x)^2]), NaN when either side is zero
(an all-zero gradient, or a tensor that the grid represents exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from q8.kernels.reference import codes, draw_seed, minmax, qparams


def quant_error(
    x: Tensor, bits: int, rounding: str = "nearest", dim: int | None = None,
    lo: Tensor | None = None, hi: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """MSE, SQNR (dB), clipped fraction and mean scale of quantizing x to `bits` over [lo, hi]
    (default: x's own min/max, per slice along `dim`), as q8's layers do.

    clip_frac: fraction of the non-zero values whose code is 0 or 2^B - 1, the range ends:
    values clipped, or rounded onto an end (small ReLU outputs lost to zero). Exact zeros are
    left out: q8 nudges the zero point so that 0.0 is a code and costs nothing.
    """
    x = x.detach().float()
    if lo is None or hi is None:
        lo, hi = minmax(x, dim)
    scale, zero_point = qparams(lo, hi, bits)
    codes = _codes(x, bits, scale, zero_point, rounding, generator)
    n = x.numel()
    err = (codes - zero_point).mul_(scale).sub_(x).flatten()  # x_hat - x
    mse = torch.dot(err, err) / n
    flat = x.flatten()
    power = torch.dot(flat, flat) / n
    half = (2**bits - 1) / 2
    at_end = codes.sub_(half).abs_() > half - 0.25  # code 0 or 2^B - 1
    clip_frac = torch.count_nonzero(at_end.logical_and_(x != 0)).float() / n
    return {"mse": mse, "sqnr_db": sqnr_db(power, mse), "clip_frac": clip_frac,
            "scale": scale.float().mean()}


def _codes(x: Tensor, bits: int, scale: Tensor, zero_point: Tensor, rounding: str,
           generator: torch.Generator | None) -> Tensor:
    """q8's codes of x (as float), by the reference kernels and with the callback's own random
    stream, so that measuring does not move training's random numbers."""
    seed = draw_seed(generator) if rounding == "stochastic" else None
    return codes(x, scale, zero_point, bits, seed)


def sqnr_db(power: Tensor, noise: Tensor) -> Tensor:
    """10 log10(power / noise); NaN when either is zero (nothing to measure)."""
    ok = (power > 0) & (noise > 0)
    return torch.where(ok, 10 * torch.log10(power / noise.clamp(min=1e-45)),
                       torch.full_like(power, float("nan")))


def tensor_stats(x: Tensor) -> dict[str, Tensor]:
    """L2 norm, mean, std, max |x| and fraction of exact zeros."""
    x = x.detach().float()
    std, mean = torch.std_mean(x) if x.numel() > 1 else (torch.zeros_like(x.sum()), x.mean())
    lo, hi = torch.aminmax(x)
    return {"norm": torch.linalg.vector_norm(x), "mean": mean, "std": std,
            "max_abs": torch.maximum(-lo, hi),
            "zero_frac": torch.count_nonzero(x == 0).float() / x.numel()}


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of the angle between two tensors seen as vectors, in float64 (the quantity of
    interest is 1 - cos, often below fp32's resolution); NaN if either is zero."""
    dtype = torch.float32 if a.device.type == "mps" else torch.float64
    a, b = a.detach().to(dtype).flatten(), b.detach().to(dtype).flatten()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    ok = (na > 0) & (nb > 0)
    cos = ((a @ b) / (na * nb).clamp(min=1e-300)).clamp(-1, 1)
    return torch.where(ok, cos, torch.full_like(na, float("nan"))).float()


def act_outside_frac(x: Tensor, running: Tensor) -> Tensor:
    """Fraction of x outside the running [lo, hi] range that eval would quantize x with: one
    range, shape (2,), or one per channel (dim 1 of x), shape (2, C)."""
    x = x.detach()
    lo, hi = running.reshape(2, -1, *[1] * (x.dim() - 2)) if running.dim() == 2 else running
    return ((x < lo) | (x > hi)).float().mean()
