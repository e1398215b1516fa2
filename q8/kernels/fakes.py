"""The fake implementations of the fused backends' custom ops: each op's output shapes and
dtypes, computed without running it, which is how torch.compile traces an op it cannot see
into. `q8_cpu` (C++) and `q8_cuda` (Triton) ops of one name take the same arguments."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def _scalar(like: Tensor) -> Tensor:
    return like.new_empty((), dtype=torch.float32)


def _planes(x: Tensor) -> Tensor:  # one value per (sample, channel)
    return x.new_empty(x.shape[:2], dtype=torch.float32)


def out_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An op's output of x's shape: channels_last where x is (and is not also contiguous),
    else contiguous, as the kernels write it (the real ops allocate with this too)."""
    channels_last = (x.dim() == 4 and not x.is_contiguous()
                     and x.is_contiguous(memory_format=torch.channels_last))
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last
                       else torch.contiguous_format)


def _mask(x: Tensor) -> Tensor:  # ReLU's mask: one bit per element
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def grad_pair(g, bits, wbits, seed, need_data, need_weight):
    shared = bits == wbits
    return (out_like(g) if need_data or shared else None,
            out_like(g) if need_weight and not shared else None)


def quantize_input(x, lo, hi, bits):  # scale and zero point: one, or one per channel, as lo
    qp = () if lo.numel() == 1 else lo.shape
    return (out_like(x, torch.uint8), out_like(x, torch.float32),
            x.new_empty(qp, dtype=torch.float32), x.new_empty(qp, dtype=torch.float32))


def dequantize(codes, scale, zero_point):
    return out_like(codes, torch.float32)


def quantize_weight(w, bits, per_channel):
    shape = (w.shape[0],) + (1,) * (w.dim() - 1) if per_channel else ()
    return out_like(w), w.new_empty(shape), w.new_empty(shape)


def requantize_weight(w, bits, scale, zero_point):
    return out_like(w)


def relu(x):
    return out_like(x), _mask(x)


def relu_(x):
    return _mask(x)


def relu_backward(gy, packed):
    return out_like(gy)


def range_bn_stats(x, lo, hi, bits):
    return (out_like(x, torch.uint8), _scalar(x), _scalar(x), _planes(x), _planes(x),
            _planes(x))


def range_bn_affine(codes, scale, zero_point, a, b):
    return out_like(codes, torch.float32)


def range_bn_grad_sums(codes, scale, zero_point, gy, mean, t_max, t_min, bits,
                       seed):
    return _planes(gy), _planes(gy), _planes(gy), _planes(gy), _scalar(gy), _scalar(gy)


def range_bn_grad_input(codes, scale, zero_point, gy, g_lo, g_hi, bits, seed,
                        *stats):
    return out_like(gy)


def register_fakes(namespace: str, names: Iterable[str],
                   own: dict[str, Callable] | None = None) -> None:
    """Register the fake of each op `namespace::name` (`own` for an op of that backend alone)."""
    fakes = {**{name: globals()[name] for name in names}, **(own or {})}
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
