"""The `cuda` backend: the reference's quantizer passes as fused Triton kernels.

Each kernel does the reference's float operations in the same order (division by
`div_rn`, rounding half to even, no fused multiply-adds: `enable_fp_fusion=False`), so the
results equal the reference's bit for bit, Range BN's exact integer sums included.
Stochastic rounding's u is the reference's hash of each element's row-major index, whatever
the memory layout: NCHW and channels_last tensors are read and written in place, other
layouts are made contiguous first. Ranges and scales stay on the device: no op waits for the
GPU. Weights (small) and max-pool run as the reference's PyTorch ops.

TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly: how the tests check them on a
machine without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from q8.gemm import Operand
from q8.kernels import BackendUnavailable
from q8.kernels.fakes import out_like, register_fakes
from q8.kernels.interface import Fused, code_bits, holds_codes, seed_tensor
from q8.kernels.reference import Seed, centred_dtype, qparams

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024  # elements per program of the elementwise kernels
TILE_C, TILE_HW = 8, 128  # channels x positions per step of the per-plane kernels


# ---- device functions: the reference's arithmetic, element by element ----------------------


@triton.jit
def _grid(lo, hi, levels):
    """qparams: scale and zero point of [lo, hi]; levels = 2^B - 2."""
    lo0 = tl.where(lo > 0, 0.0, lo)  # clamp(max=0), keeping -0.0 and NaN
    hi0 = tl.where(hi < 0, 0.0, hi)
    span = hi0 - lo0
    constant = tl.where(span == 0, 1.0, span)
    scale = tl.where(hi > lo, tl.math.div_rn(span, levels), constant)
    return scale, tl.ceil(tl.math.div_rn(-lo0, scale))


@triton.jit
def _rint(y):
    """round half to even, as torch.round: (|y| + 2^23) - 2^23 below 2^23, with y's sign."""
    a = tl.abs(y)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _uniform(i, seed):
    """reference.uniform: lowbias32 of (i + seed) mod 2^32, at 24-bit resolution."""
    h = (i + seed).to(tl.uint32)
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _code(x, scale, zero_point, top, i, seed, STOCHASTIC: tl.constexpr):
    """reference.codes: q = clamp(round(x/s) + z, 0, top) or with floor(x/s + u)."""
    y = tl.math.div_rn(x, scale)
    if STOCHASTIC:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
        y = tl.floor(y + _uniform(i, seed))
    else:
        y = _rint(y)
    q = y + zero_point
    return tl.where(q < 0, 0.0, tl.where(q > top, top, q))  # clamp, NaN passes


@triton.jit
def _offset(i, C, HW, sB, sC, sHW):
    """Memory offset of row-major element i of a (B, C, HW) tensor with strides sB, sC, sHW."""
    bc = i // HW
    return (bc // C) * sB + (bc % C) * sC + (i % HW) * sHW


# ---- elementwise kernels ----------------------------------------------------------------------


@triton.jit
def _quantize_input(x_ptr, codes_ptr, xhat_ptr, lo_ptr, hi_ptr, scale_ptr, zp_ptr, n, C, HW,
                    sB, sC, sHW, levels, top, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    at = _offset(i, C, HW, sB, sC, sHW)
    scale, zero_point = _grid(tl.load(lo_ptr), tl.load(hi_ptr), levels)
    q = _code(tl.load(x_ptr + at, mask=mask), scale, zero_point, top, i, 0, False)
    tl.store(codes_ptr + at, tl.where(q == q, q, 0.0).to(tl.uint8), mask=mask)
    tl.store(xhat_ptr + at, (q - zero_point) * scale, mask=mask)
    if tl.program_id(0) == 0:
        tl.store(scale_ptr, scale)
        tl.store(zp_ptr, zero_point)


@triton.jit
def _dequantize(codes_ptr, out_ptr, scale_ptr, zp_ptr, n, C, HW, sB, sC, sHW,
                CENTRED: tl.constexpr, BLOCK: tl.constexpr):
    """x_hat = (q - z) s, or with CENTRED q - z (in out's dtype: a GEMM operand)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    at = _offset(i, C, HW, sB, sC, sHW)
    v = tl.load(codes_ptr + at, mask=mask).to(tl.float32) - tl.load(zp_ptr)
    if not CENTRED:
        v = v * tl.load(scale_ptr)
    tl.store(out_ptr + at, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy(g, lo, hi, levels, top, i, seed, STOCHASTIC: tl.constexpr, CENTRED: tl.constexpr):
    """One copy of g_l over [lo, hi]: x_hat = (q - z) s, or q - z."""
    scale, zero_point = _grid(lo, hi, levels)
    v = _code(g, scale, zero_point, top, i, seed, STOCHASTIC) - zero_point
    if not CENTRED:
        v = v * scale
    return v


@triton.jit
def _store(ptr, low_ptr, at, v, mask, SPLIT: tl.constexpr):
    """v in ptr's dtype, or with SPLIT as two bytes v = 256 hi + lo: hi to ptr, lo to low_ptr
    (both exact: v * 2^-8 and its floor are)."""
    if SPLIT:
        high = tl.floor(v * 0.00390625)
        tl.store(ptr + at, high.to(ptr.dtype.element_ty), mask=mask)
        tl.store(low_ptr + at, (v - 256.0 * high).to(low_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + at, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pair(g_ptr, data_ptr, data_low_ptr, weight_ptr, weight_low_ptr, lo_ptr, hi_ptr, n, C,
               HW, sB, sC, sHW, seed, levels, top, wlevels, wtop, STOCHASTIC: tl.constexpr,
               DATA: tl.constexpr, WEIGHT: tl.constexpr, CENTRED: tl.constexpr,
               DATA_SPLIT: tl.constexpr, WEIGHT_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """Both copies of g_l as x_hat, or with CENTRED as q - z (in each output's dtype; with
    *_SPLIT in two bytes)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    at = _offset(i, C, HW, sB, sC, sHW)
    lo, hi = tl.load(lo_ptr), tl.load(hi_ptr)
    g = tl.load(g_ptr + at, mask=mask)
    if DATA:
        v = _copy(g, lo, hi, levels, top, i, seed, STOCHASTIC, CENTRED)
        _store(data_ptr, data_low_ptr, at, v, mask, DATA_SPLIT)
    if WEIGHT:
        v = _copy(g, lo, hi, wlevels, wtop, i, seed, STOCHASTIC, CENTRED)
        _store(weight_ptr, weight_low_ptr, at, v, mask, WEIGHT_SPLIT)


@triton.jit
def _mask_bytes(n, C, HW, sB, sC, sHW, BYTES: tl.constexpr):
    """This program's mask bytes k, and per (byte, bit) its element's offset and validity:
    flag j of byte k is element 8k + j."""
    k = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    i = k[:, None] * 8 + bit[None, :]
    return k, bit, _offset(i, C, HW, sB, sC, sHW), i < n


@triton.jit
def _relu(x_ptr, y_ptr, packed_ptr, n, C, HW, sB, sC, sHW, BYTES: tl.constexpr):
    """y = relu(x) and the mask of y > 0, 8 flags (elements 8k..8k+7) per byte k."""
    k, bit, at, mask = _mask_bytes(n, C, HW, sB, sC, sHW, BYTES)
    x = tl.load(x_ptr + at, mask=mask)
    y = tl.where(x < 0, 0.0, x)  # NaN passes
    tl.store(y_ptr + at, y, mask=mask)
    flags = tl.where(mask & (y > 0), 1, 0) << bit[None, :]
    tl.store(packed_ptr + k, tl.sum(flags, axis=1).to(tl.uint8), mask=k * 8 < n)


@triton.jit
def _relu_backward(gy_ptr, packed_ptr, gx_ptr, n, C, HW, sB, sC, sHW, BYTES: tl.constexpr):
    k, bit, at, mask = _mask_bytes(n, C, HW, sB, sC, sHW, BYTES)
    flags = tl.load(packed_ptr + k, mask=k * 8 < n, other=0).to(tl.int32)
    on = ((flags[:, None] >> bit[None, :]) & 1) != 0
    gy = tl.load(gy_ptr + at, mask=mask)
    tl.store(gx_ptr + at, tl.where(on, gy, 0.0), mask=mask)


# ---- Range BN: per-plane kernels over tiles of TILE_C channels x TILE_HW positions ------------


@triton.jit
def _range_bn_stats(x_ptr, codes_ptr, lo_ptr, hi_ptr, scale_ptr, zp_ptr, sum_ptr, min_ptr,
                    max_ptr, C, HW, sB, sC, sHW, levels, top, TC: tl.constexpr,
                    THW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * TC + tl.arange(0, TC)
    scale, zero_point = _grid(tl.load(lo_ptr), tl.load(hi_ptr), levels)
    acc = tl.zeros((TC, THW), tl.float64)  # sum of q - z: integers, exact in float64
    lo = tl.full((TC, THW), float("inf"), tl.float32)
    hi = tl.full((TC, THW), float("-inf"), tl.float32)
    bad = tl.zeros((TC, THW), tl.int32)
    for start in range(0, HW, THW):
        hw = start + tl.arange(0, THW)
        mask = (c[:, None] < C) & (hw[None, :] < HW)
        at = b * sB + c[:, None] * sC + hw[None, :] * sHW
        q = _code(tl.load(x_ptr + at, mask=mask), scale, zero_point, top, 0, 0, False)
        tl.store(codes_ptr + at, tl.where(q == q, q, 0.0).to(tl.uint8), mask=mask)
        x_hat = (q - zero_point) * scale
        acc += tl.where(mask, q - zero_point, 0.0).to(tl.float64)
        lo = tl.minimum(lo, tl.where(mask, x_hat, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, x_hat, float("-inf")))
        bad = tl.maximum(bad, tl.where(mask & (x_hat != x_hat), 1, 0))
    nan = tl.max(bad, axis=1) > 0
    out = b * C + c
    cm = c < C
    tl.store(sum_ptr + out, (tl.sum(acc, axis=1) * scale.to(tl.float64)).to(tl.float32),
             mask=cm)
    tl.store(min_ptr + out, tl.where(nan, float("nan"), tl.min(lo, axis=1)), mask=cm)
    tl.store(max_ptr + out, tl.where(nan, float("nan"), tl.max(hi, axis=1)), mask=cm)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_ptr, scale)
        tl.store(zp_ptr, zero_point)


@triton.jit
def _range_bn_affine(codes_ptr, y_ptr, scale_ptr, zp_ptr, a_ptr, b_ptr, n, C, HW, sB, sC, sHW,
                     BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    at = _offset(i, C, HW, sB, sC, sHW)
    c = (i // HW) % C
    q = tl.load(codes_ptr + at, mask=mask).to(tl.float32)
    x_hat = (q - tl.load(zp_ptr)) * tl.load(scale_ptr)
    a = tl.load(a_ptr + c, mask=mask)
    tl.store(y_ptr + at, x_hat * a + tl.load(b_ptr + c, mask=mask), mask=mask)


@triton.jit
def _range_bn_grad_sums(codes_ptr, gy_ptr, scale_ptr, zp_ptr, lo_ptr, hi_ptr, mean_ptr,
                        tmax_ptr, tmin_ptr, sg_ptr, sgx_ptr, nmax_ptr, nmin_ptr, C, HW, sB, sC,
                        sHW, cB, cC, cHW, seed, levels, top, STOCHASTIC: tl.constexpr,
                        TC: tl.constexpr, THW: tl.constexpr):
    """(sB, sC, sHW): gy's strides; (cB, cC, cHW): the codes'."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * TC + tl.arange(0, TC)
    cm = c < C
    plane = b * C + c
    s, z = tl.load(scale_ptr), tl.load(zp_ptr)
    g_scale, g_zero = _grid(tl.load(lo_ptr), tl.load(hi_ptr), levels)
    mean = tl.load(mean_ptr + c, mask=cm)
    t_max = tl.load(tmax_ptr + plane, mask=cm)[:, None]
    t_min = tl.load(tmin_ptr + plane, mask=cm)[:, None]
    sg = tl.zeros((TC, THW), tl.float64)  # sums of q_g - z_g and (q_g - z_g)(q - z): exact
    sgx = tl.zeros((TC, THW), tl.float64)
    nmax = tl.zeros((TC, THW), tl.float32)
    nmin = tl.zeros((TC, THW), tl.float32)
    for start in range(0, HW, THW):
        hw = start + tl.arange(0, THW)
        mask = cm[:, None] & (hw[None, :] < HW)
        at = b * sB + c[:, None] * sC + hw[None, :] * sHW
        at_codes = b * cB + c[:, None] * cC + hw[None, :] * cHW
        i = plane[:, None] * HW + hw[None, :]
        q = _code(tl.load(gy_ptr + at, mask=mask), g_scale, g_zero, top, i, seed, STOCHASTIC)
        dg = tl.where(mask, q - g_zero, 0.0)
        dx = tl.load(codes_ptr + at_codes, mask=mask).to(tl.float32) - z
        x_hat = dx * s
        sg += dg.to(tl.float64)
        sgx += (dg * dx).to(tl.float64)
        nmax += tl.where(mask & (x_hat == t_max), 1.0, 0.0)
        nmin += tl.where(mask & (x_hat == t_min), 1.0, 0.0)
    sum_g, sum_gx = tl.sum(sg, axis=1), tl.sum(sgx, axis=1)
    gs = g_scale.to(tl.float64)
    s_gx = gs * (s.to(tl.float64) * sum_gx - mean.to(tl.float64) * sum_g)
    tl.store(sg_ptr + plane, (gs * sum_g).to(tl.float32), mask=cm)
    tl.store(sgx_ptr + plane, s_gx.to(tl.float32), mask=cm)
    tl.store(nmax_ptr + plane, tl.sum(nmax, axis=1), mask=cm)
    tl.store(nmin_ptr + plane, tl.sum(nmin, axis=1), mask=cm)


@triton.jit
def _range_bn_grad_input(codes_ptr, gy_ptr, gx_ptr, scale_ptr, zp_ptr, lo_ptr, hi_ptr, a_ptr,
                         gmean_ptr, tmax_ptr, tmin_ptr, wmax_ptr, wmin_ptr, n, C, HW, sB, sC,
                         sHW, cB, cC, cHW, seed, levels, top, STOCHASTIC: tl.constexpr,
                         BLOCK: tl.constexpr):
    """(sB, sC, sHW): the strides of gy and gx; (cB, cC, cHW): the codes'."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    at = _offset(i, C, HW, sB, sC, sHW)
    plane = i // HW
    c = plane % C
    g_scale, g_zero = _grid(tl.load(lo_ptr), tl.load(hi_ptr), levels)
    q = _code(tl.load(gy_ptr + at, mask=mask), g_scale, g_zero, top, i, seed, STOCHASTIC)
    g = (q - g_zero) * g_scale
    x_hat = (tl.load(codes_ptr + _offset(i, C, HW, cB, cC, cHW), mask=mask).to(tl.float32)
             - tl.load(zp_ptr)) * tl.load(scale_ptr)
    at_max = tl.where(x_hat == tl.load(tmax_ptr + plane, mask=mask),
                      tl.load(wmax_ptr + plane, mask=mask), 0.0)
    at_min = tl.where(x_hat == tl.load(tmin_ptr + plane, mask=mask),
                      tl.load(wmin_ptr + plane, mask=mask), 0.0)
    gx = (g - tl.load(gmean_ptr + c, mask=mask)) * tl.load(a_ptr + c, mask=mask) + at_max - at_min
    tl.store(gx_ptr + at, gx, mask=mask)


# ---- the backend ------------------------------------------------------------------------------


def _geometry(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """t as a (B, C, HW) tensor for the kernels, and its (C, HW, sB, sC, sHW): row-major
    element i = (b, c, hw) is at b sB + c sC + hw sHW. A channels_last t is read in place;
    any other layout is made contiguous."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not t.is_contiguous():
        return t, (t.shape[1], t.shape[2] * t.shape[3], t.stride(0), t.stride(1), t.stride(3))
    t = t.contiguous()
    C = t.shape[1] if t.dim() >= 2 else 1
    HW = t.numel() // (t.shape[0] * C) if t.dim() >= 2 else t.numel()
    return t, (C, HW, C * HW, HW, 1)


def _levels(bits: int) -> tuple[float, float]:
    """(2^B - 2, 2^B - 1) as the kernels take them."""
    return float(2**bits - 2), float(2**bits - 1)


def _seed(seed: Seed | None) -> int:
    """The seed's low 32 bits (all the hash reads) plus 2^32, so that Triton always passes it
    as an int64. A seed tensor lives on the CPU: reading it waits for no GPU work."""
    return (0 if seed is None else int(seed)) % 2**32 + 2**32




def _check(t: Tensor, numel: int, name: str) -> None:
    """The kernels index t by the sizes of their main tensor: a size that does not fit is an
    error here, never a read out of bounds."""
    if t.numel() != numel:
        raise ValueError(f"q8 cuda kernel: {name} must have {numel} elements, has {t.numel()}")


def _check_codes(codes: Tensor, like: Tensor) -> None:
    if codes.shape != like.shape:
        raise ValueError(f"q8 cuda kernel: codes {tuple(codes.shape)} must have the shape of "
                         f"{tuple(like.shape)}")


def _blocks(n: int, size: int = BLOCK) -> tuple[int]:
    return (triton.cdiv(n, size),)


_OPTS = {"enable_fp_fusion": False}  # no fused multiply-adds: the reference's roundings


# ---- the kernels as custom ops (torch.compile traces them by their fakes) --------------------

_lib = torch.library.Library("q8_cuda", "DEF")
_KEY = "CPU" if INTERPRET else "CUDA"  # the interpreter runs the kernels on CPU tensors


def _op(schema: str):
    """Define q8_cuda::<schema> and register the decorated function as its kernel."""
    _lib.define(schema)

    def register(fn):
        _lib.impl(schema.split("(")[0], fn, _KEY)
        return fn

    return register


@_op("quantize_input(Tensor x, Tensor lo, Tensor hi, int bits) -> "
     "(Tensor, Tensor, Tensor, Tensor)")
def _quantize_input_op(x, lo, hi, bits):
    _check(lo, 1, "lo")
    _check(hi, 1, "hi")
    x, geometry = _geometry(x)
    codes, x_hat = out_like(x, torch.uint8), out_like(x)
    scale, zero_point = x.new_empty(()), x.new_empty(())
    _quantize_input[_blocks(x.numel())](x, codes, x_hat, lo.float(), hi.float(), scale,
                                        zero_point, x.numel(), *geometry, *_levels(bits),
                                        BLOCK=BLOCK, **_OPTS)
    return codes, x_hat, scale, zero_point


def _restore(codes, scale, zero_point, centred):
    codes, geometry = _geometry(codes)
    out = out_like(codes, centred_dtype(8) if centred else torch.float32)
    _dequantize[_blocks(codes.numel())](codes, out, scale, zero_point, codes.numel(),
                                        *geometry, CENTRED=centred, BLOCK=BLOCK, **_OPTS)
    return out


@_op("dequantize(Tensor codes, Tensor scale, Tensor zero_point) -> Tensor")
def _dequantize_op(codes, scale, zero_point):
    return _restore(codes, scale, zero_point, False)


@_op("centred_codes(Tensor codes, Tensor scale, Tensor zero_point) -> Tensor")
def _centred_codes_op(codes, scale, zero_point):
    """q - z as a bf16 GEMM operand (exact for codes of at most 8 bits)."""
    return _restore(codes, scale, zero_point, True)


@_op("grad_pair(Tensor g, int bits, int? wbits, Tensor? seed, bool need_data, "
     "bool need_weight, bool centred) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor, Tensor)")
def _grad_pair_op(g, bits, wbits, seed, need_data, need_weight, centred):
    """The g_l pair from one kernel: the data copy, the weight copy (each x_hat, or with
    `centred` hi and lo of q - z = 256 hi + lo, lo None for at most 8 bits), and g's range. A
    copy not needed, or of wbits None, is None; with wbits == bits the data copy serves both."""
    g, geometry = _geometry(g)
    lo, hi = torch.aminmax(g)
    shared = wbits == bits
    dtype = centred_dtype(8) if centred else torch.float32

    def split(b: int | None) -> bool:  # centred codes of more than 8 bits: two bytes
        return centred and b is not None and b > 8

    def out(b: int, wanted: bool) -> tuple:
        if not wanted:
            return None, None
        return out_like(g, dtype), (out_like(g, dtype) if split(b) else None)

    data = out(bits, need_data or shared)
    weight = out(wbits, need_weight and not shared and wbits is not None)
    _grad_pair[_blocks(g.numel())](
        g, *(g if t is None else t for t in (*data, *weight)), lo, hi, g.numel(), *geometry,
        _seed(seed), *_levels(bits), *_levels(wbits or bits), STOCHASTIC=seed is not None,
        DATA=data[0] is not None, WEIGHT=weight[0] is not None, CENTRED=centred,
        DATA_SPLIT=split(bits), WEIGHT_SPLIT=split(wbits), BLOCK=BLOCK, **_OPTS)
    return *data, *weight, lo, hi


@_op("relu(Tensor x) -> (Tensor, Tensor)")
def _relu_op(x):
    x, geometry = _geometry(x)
    y = out_like(x)
    return y, _relu_into(x, y, geometry)


@_op("relu_(Tensor(a!) x) -> Tensor")
def _relu_inplace_op(x):
    """In place: x is NCHW or channels_last (Cuda.relu checks), which the kernel indexes."""
    return _relu_into(x, x, _geometry(x)[1])


def _relu_into(x, y, geometry):
    packed = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
    _relu[_blocks(packed.numel(), BLOCK // 8)](x, y, packed, x.numel(), *geometry,
                                               BYTES=BLOCK // 8, **_OPTS)
    return packed


@_op("relu_backward(Tensor gy, Tensor packed) -> Tensor")
def _relu_backward_op(gy, packed):
    _check(packed, (gy.numel() + 7) // 8, "packed")
    gy, geometry = _geometry(gy)
    gx = out_like(gy)
    _relu_backward[_blocks(packed.numel(), BLOCK // 8)](gy, packed, gx, gy.numel(), *geometry,
                                                        BYTES=BLOCK // 8, **_OPTS)
    return gx


@_op("range_bn_stats(Tensor x, Tensor lo, Tensor hi, int bits) -> "
     "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _range_bn_stats_op(x, lo, hi, bits):
    _check(lo, 1, "lo")
    _check(hi, 1, "hi")
    x, geometry = _geometry(x)
    B, C = x.shape[:2]
    codes = out_like(x, torch.uint8)
    scale, zero_point = x.new_empty(()), x.new_empty(())
    s, mn, mx = (x.new_empty((B, C)) for _ in range(3))
    _range_bn_stats[(B, triton.cdiv(C, TILE_C))](
        x, codes, lo.float(), hi.float(), scale, zero_point, s, mn, mx, *geometry,
        *_levels(bits), TC=TILE_C, THW=TILE_HW, **_OPTS)
    return codes, scale, zero_point, s, mn, mx


@_op("range_bn_affine(Tensor codes, Tensor scale, Tensor zero_point, Tensor a, Tensor b) -> "
     "Tensor")
def _range_bn_affine_op(codes, scale, zero_point, a, b):
    _check(a, codes.shape[1], "a")
    _check(b, codes.shape[1], "b")
    codes, geometry = _geometry(codes)
    y = out_like(codes, torch.float32)
    _range_bn_affine[_blocks(codes.numel())](codes, y, scale, zero_point, a.contiguous(),
                                             b.contiguous(), codes.numel(), *geometry,
                                             BLOCK=BLOCK, **_OPTS)
    return y


@_op("range_bn_grad_sums(Tensor codes, Tensor scale, Tensor zero_point, Tensor gy, "
     "Tensor mean, Tensor t_max, Tensor t_min, int bits, Tensor? seed) -> "
     "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _range_bn_grad_sums_op(codes, scale, zero_point, gy, mean, t_max, t_min, bits, seed):
    B, C = gy.shape[:2]
    _check_codes(codes, gy)
    _check(mean, C, "mean")
    _check(t_max, B * C, "t_max")
    _check(t_min, B * C, "t_min")
    gy, geometry = _geometry(gy)
    codes, (_, _, *code_strides) = _geometry(codes)
    g_lo, g_hi = torch.aminmax(gy)
    s_g, s_gx, n_max, n_min = (gy.new_empty((B, C)) for _ in range(4))
    _range_bn_grad_sums[(B, triton.cdiv(C, TILE_C))](
        codes, gy, scale, zero_point, g_lo, g_hi, mean.contiguous(), t_max.contiguous(),
        t_min.contiguous(), s_g, s_gx, n_max, n_min, *geometry, *code_strides, _seed(seed),
        *_levels(bits), STOCHASTIC=seed is not None, TC=TILE_C, THW=TILE_HW, **_OPTS)
    return s_g, s_gx, n_max, n_min, g_lo, g_hi


@_op("range_bn_grad_input(Tensor codes, Tensor scale, Tensor zero_point, Tensor gy, "
     "Tensor g_lo, Tensor g_hi, int bits, Tensor? seed, Tensor a, Tensor g_mean, "
     "Tensor t_max, Tensor t_min, Tensor w_max, Tensor w_min) -> Tensor")
def _range_bn_grad_input_op(codes, scale, zero_point, gy, g_lo, g_hi, bits, seed, *stats):
    B, C = gy.shape[:2]
    _check_codes(codes, gy)
    for t, numel, name in zip(stats, (C, C, *[B * C] * 4),
                              ("a", "g_mean", "t_max", "t_min", "w_max", "w_min")):
        _check(t, numel, name)
    gy, geometry = _geometry(gy)
    codes, (_, _, *code_strides) = _geometry(codes)
    gx = out_like(gy)
    _range_bn_grad_input[_blocks(gy.numel())](
        codes, gy, gx, scale, zero_point, g_lo, g_hi, *(t.contiguous() for t in stats),
        gy.numel(), *geometry, *code_strides, _seed(seed), *_levels(bits),
        STOCHASTIC=seed is not None, BLOCK=BLOCK, **_OPTS)
    return gx


def _fake_grad_pair(g, bits, wbits, seed, need_data, need_weight, centred):
    shared = wbits == bits
    dtype = centred_dtype(8) if centred else torch.float32

    def out(b: int | None, wanted: bool) -> tuple:
        if not wanted:
            return None, None
        return out_like(g, dtype), (out_like(g, dtype) if centred and b > 8 else None)

    lo = g.new_empty(())
    weight = out(wbits, need_weight and not shared and wbits is not None)
    return *out(bits, need_data or shared), *weight, lo, g.new_empty(())


register_fakes("q8_cuda", ("quantize_input", "dequantize", "relu", "relu_", "relu_backward",
                           "range_bn_stats", "range_bn_affine", "range_bn_grad_sums",
                           "range_bn_grad_input"),
               {"centred_codes": lambda codes, scale, zero_point: out_like(codes,
                                                                           centred_dtype(8)),
                "grad_pair": _fake_grad_pair})


class Cuda(Fused):
    """The reference's ops on CUDA tensors, through Triton kernels (`Fused.fuses` says which
    calls)."""

    name = "cuda"

    def __init__(self) -> None:
        if not (INTERPRET or torch.cuda.is_available()):
            raise BackendUnavailable("backend 'cuda' needs a CUDA GPU (torch.cuda.is_available() "
                                     "is False)")
        self.ops = torch.ops.q8_cuda

    def serves(self, x: Tensor) -> bool:
        return x.device.type == ("cpu" if INTERPRET else "cuda")

    def quantize_input(self, x: Tensor, lo: Tensor, hi: Tensor,
                       bits: int | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        if not self.fuses(x, bits=bits, makes_codes=True, ranges=(lo, hi)):
            return self.reference.quantize_input(x, lo, hi, bits)
        codes, x_hat, scale, zero_point = self.ops.quantize_input(x, lo, hi, bits)
        return x_hat, (codes, scale, zero_point)

    def restore(self, saved: tuple[Tensor, ...]) -> Tensor:
        if not self.fuses(*saved, bits=code_bits(saved), ranges=saved[1:]):
            return self.reference.restore(saved)
        return self.ops.dequantize(*saved)

    def restore_codes(self, saved: tuple[Tensor, ...]) -> Operand:
        if not self.fuses(*saved, bits=code_bits(saved), ranges=saved[1:]):
            return self.reference.restore_codes(saved)
        return Operand(self.ops.centred_codes(*saved), saved[1], saved[2])

    def grad_pair(self, g: Tensor, bits: int | None, wbits: int | None, seed: Seed | None,
                  need_data: bool = True, need_weight: bool = True
                  ) -> tuple[Tensor | None, Tensor | None]:
        if not self.fuses(g, bits=bits):
            return self.reference.grad_pair(g, bits, wbits, seed, need_data, need_weight)
        data, _, weight, _, _, _ = self.ops.grad_pair(g, bits, wbits, seed_tensor(seed),
                                                      need_data, need_weight, False)
        return self._pair(g, bits, wbits, need_data, need_weight, data, weight)

    def grad_pair_codes(self, g: Tensor, bits: int | None, wbits: int | None,
                        seed: Seed | None, need_data: bool = True, need_weight: bool = True
                        ) -> tuple[Operand | None, Operand | None]:
        if not self.fuses(g, bits=bits):
            return self.reference.grad_pair_codes(g, bits, wbits, seed, need_data, need_weight)
        d_hi, d_lo, w_hi, w_lo, lo, hi = self.ops.grad_pair(g, bits, wbits, seed_tensor(seed),
                                                            need_data, need_weight, True)
        # the kernel's scale and zero point, from the same range
        data = None if d_hi is None else Operand(d_hi, *qparams(lo, hi, bits), d_lo)
        weight = None if w_hi is None or wbits is None else Operand(
            w_hi, *qparams(lo, hi, wbits), w_lo)
        if wbits is None and need_weight:
            weight = Operand(g)
        return self._pair(g, bits, wbits, need_data, need_weight, data, weight)

    @staticmethod
    def _pair(g, bits, wbits, need_data, need_weight, data, weight):  # noqa: ANN001, ANN205
        """(data, weight) as grad_pair returns them: one copy for both when wbits == bits; g
        itself as the weight copy when wbits is None; None for a copy not needed."""
        if wbits == bits:
            return data, data
        if wbits is None:
            weight = weight if isinstance(weight, Operand) else g
        return (data if need_data else None), (weight if need_weight else None)

    def relu(self, x: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        if not self.fuses(x):
            return self.reference.relu(x, inplace)
        if not inplace:
            return self.ops.relu(x)
        if _geometry(x)[0] is not x:  # in place, on a layout the kernel does not index
            return self.reference.relu(x, inplace)
        return x, self.ops.relu_(x)

    def relu_backward(self, gy: Tensor, packed: Tensor) -> Tensor:
        if not self.fuses(gy):
            return self.reference.relu_backward(gy, packed)
        return self.ops.relu_backward(gy, packed)

    def range_bn_stats(self, x: Tensor, lo: Tensor, hi: Tensor, bits: int | None
                       ) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor]:
        if not self.fuses(x, bits=bits, makes_codes=True):
            return self.reference.range_bn_stats(x, lo, hi, bits)
        codes, scale, zero_point, s, mn, mx = self.ops.range_bn_stats(x, lo, hi, bits)
        return (codes, scale, zero_point), s, mn, mx

    def range_bn_affine(self, saved: tuple[Tensor, ...], a: Tensor, b: Tensor) -> Tensor:
        if not self.fuses(*saved, a, b, bits=code_bits(saved)):
            return self.reference.range_bn_affine(saved, a, b)
        return self.ops.range_bn_affine(*saved, a, b)

    def range_bn_grad_sums(self, saved: tuple[Tensor, ...], gy: Tensor, mean: Tensor,
                           t_max: Tensor, t_min: Tensor, bits: int | None, seed: Seed | None
                           ) -> tuple[Tensor, ...]:
        if not (self.fuses(gy, mean, t_max, t_min, bits=bits) and holds_codes(saved)):
            return self.reference.range_bn_grad_sums(saved, gy, mean, t_max, t_min, bits, seed)
        return self.ops.range_bn_grad_sums(*saved, gy, mean, t_max, t_min, bits,
                                           seed_tensor(seed))

    def range_bn_grad_input(self, saved: tuple[Tensor, ...], gy: Tensor, g_lo: Tensor,
                            g_hi: Tensor, bits: int | None, seed: Seed | None, a: Tensor,
                            g_mean: Tensor, t_max: Tensor, t_min: Tensor, w_max: Tensor,
                            w_min: Tensor) -> Tensor:
        stats = (a, g_mean, t_max, t_min, w_max, w_min)
        if not (self.fuses(gy, *stats, bits=bits) and holds_codes(saved)):
            return self.reference.range_bn_grad_input(saved, gy, g_lo, g_hi, bits, seed, *stats)
        return self.ops.range_bn_grad_input(*saved, gy, g_lo, g_hi, bits, seed_tensor(seed),
                                            *stats)
