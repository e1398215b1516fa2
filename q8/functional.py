"""Autograd functions of q8: one per quantized op, each saving 8-bit codes for its backward.

Gradient bifurcation (Banner et al. 2018, sec. 5): the backward pass of a conv/linear layer
quantizes its layer gradient g_l twice, to `grad_bits` for dL/dx = g_l W (the data path, which
tolerates noise) and to `wgrad_bits` for dL/dW = x^T g_l (which accumulates over the batch).
The forward runs the GEMM once; the 2018 code ran every convolution twice instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from q8 import cpu_kernels
from q8.compile import fused
from q8.quantizer import (
    QTensor,
    aminmax,
    fake_quant,
    fake_quant_own_range,
    qparams,
    quantize_codes,
    rounding_noise,
)


@dataclass(frozen=True)
class GradSpec:
    """How a layer's backward quantizes g_l: data-path bits, weight-path bits, rounding."""

    bits: int | None
    wbits: int | None
    rounding: str = "stochastic"


@fused
def _grad_pair(g: Tensor, bits: int | None, wbits: int | None, noise: Tensor | None,
               need_data: bool, need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    lo, hi = torch.aminmax(g)

    def q(b: int | None, last: bool) -> Tensor:
        if b is None:
            return g
        scale, zero_point = qparams(lo, hi, b)
        return fake_quant(g, scale, zero_point, b, noise, consume_noise=last)

    if wbits == bits:  # one copy serves both paths
        g_q = q(bits, last=True)
        return g_q, g_q
    g_data = q(bits, last=not need_weight or wbits is None) if need_data else None
    return g_data, (q(wbits, last=True) if need_weight else None)


def quantize_grad(g: Tensor, spec: GradSpec, need_data: bool = True,
                  need_weight: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """g_l for dL/dx (grad_bits) and its copy for dL/dW (wgrad_bits), from one min/max pass;
    a copy the backward does not need is None (the stem's dL/dx, a frozen layer's dL/dW).
    Both copies round with the same noise draw; each is unbiased on its own."""
    if spec.bits is None and spec.wbits is None:
        return g, g
    noise = rounding_noise(g, spec.rounding)  # drawn even for one copy: the same stream
    if spec.bits is not None and spec.wbits is not None and cpu_kernels.usable(g):
        return cpu_kernels.ops().grad_pair(g.contiguous(), spec.bits, spec.wbits,
                                           *cpu_kernels.noise_args(noise), need_data, need_weight)
    return _grad_pair(g, spec.bits, spec.wbits, noise, need_data, need_weight)


def quantize_input(x: Tensor, bits: int | None, lo: Tensor, hi: Tensor) -> tuple[Tensor, tuple]:
    """x_hat for the forward and what backward must keep: 8-bit codes (or x itself if fp32)."""
    if bits is None:
        return x, (x,)
    if bits <= 8 and cpu_kernels.usable(x):
        codes, x_hat, scale, zero_point = cpu_kernels.ops().quantize_codes(x.contiguous(), lo,
                                                                           hi, bits)
    else:
        codes, x_hat, scale, zero_point = quantize_codes(x, lo, hi, bits)
    return x_hat, (codes, scale, zero_point)


def restore_input(saved: tuple) -> Tensor:
    if len(saved) == 1:
        return saved[0]
    if saved[0].dtype == torch.uint8 and cpu_kernels.usable(saved[0]):
        return cpu_kernels.ops().dequantize(*saved)
    return QTensor(*saved).dequantize()


def quantize_weight(w: Tensor, bits: int | None, per_channel: bool) -> tuple[Tensor, tuple]:
    """W_hat (nearest rounding over W's own range). Backward re-derives it from W and the
    scale rather than keeping a copy: W is alive anyway, so the weights cost no saved memory."""
    if bits is None:
        return w, ()
    if cpu_kernels.usable(w) and w.is_contiguous():
        w_hat, scale = cpu_kernels.ops().quantize_weight(w.detach(), bits, per_channel)
        return w_hat, (scale,)
    scale, _ = qparams(*aminmax(w.detach(), 0 if per_channel else None), bits)
    return fake_quant_own_range(w, scale), (scale,)


def requantize_weight(w: Tensor, bits: int | None, qp: tuple) -> Tensor:
    if bits is None:
        return w
    if cpu_kernels.usable(w) and w.is_contiguous():
        return cpu_kernels.ops().requantize_weight(w.detach(), *qp)
    return fake_quant_own_range(w, *qp)


@dataclass(frozen=True)
class LayerSpec:
    """Static description of a quantized conv/linear call."""

    act_bits: int | None
    weight_bits: int | None
    per_channel: bool
    grad: GradSpec
    # conv only (None for linear)
    stride: tuple | None = None
    padding: tuple | None = None
    dilation: tuple | None = None
    groups: int = 1


class BifurcatedLayerFn(torch.autograd.Function):
    """y = x_hat W_hat^T + b (linear) or conv(x_hat, W_hat) + b, with a bifurcated backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, spec: LayerSpec):  # noqa: ANN001, ANN205
        x_hat, saved_x = quantize_input(x, spec.act_bits, x_lo, x_hi)
        w_hat, w_qp = quantize_weight(weight, spec.weight_bits, spec.per_channel)
        if spec.stride is None:
            y = F.linear(x_hat, w_hat, bias)
        else:
            y = F.conv2d(x_hat, w_hat, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
        ctx.spec, ctx.n_x, ctx.has_bias = spec, len(saved_x), bias is not None
        ctx.save_for_backward(*saved_x, weight, *w_qp)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        spec: LayerSpec = ctx.spec
        saved = ctx.saved_tensors
        x_hat = restore_input(saved[: ctx.n_x])
        weight, w_qp = saved[ctx.n_x], saved[ctx.n_x + 1 :]
        w_hat = requantize_weight(weight, spec.weight_bits, w_qp)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g_data, g_w = quantize_grad(gy, spec.grad, need_x, need_w or need_b)
        gx = gw = gb = None
        if spec.stride is None:  # linear over any leading dims: (..., in) -> (..., out)
            if need_x:
                gx = g_data @ w_hat
            if need_w:
                gw = g_w.reshape(-1, g_w.shape[-1]).T @ x_hat.reshape(-1, x_hat.shape[-1])
            if need_b and ctx.has_bias:
                gb = g_w.reshape(-1, g_w.shape[-1]).sum(0)
        else:
            args = ([0] if ctx.has_bias else None, spec.stride, spec.padding, spec.dilation,
                    False, [0, 0], spec.groups)
            conv_bwd = torch.ops.aten.convolution_backward
            if g_data is g_w:  # no bifurcation: one call computes both
                gx, gw, gb = conv_bwd(g_data, x_hat, w_hat, *args, [need_x, need_w, need_b])
            else:
                if need_x:
                    gx = conv_bwd(g_data, x_hat, w_hat, *args, [True, False, False])[0]
                if need_w or need_b:
                    _, gw, gb = conv_bwd(g_w, x_hat, w_hat, *args, [False, need_w, need_b])
        if not ctx.has_bias:
            gb = None
        return gx, gw, gb, None, None, None


# ReLU and max-pool keep only what their backward needs, in 8 bits or less.

# A mask of 8 flags (bytes 0/1) <-> one byte, flag i = bit i, by int64 arithmetic on 8 flags at
# a time: eager PyTorch converts and reduces bool tensors, and mixes dtypes, many times slower
# than it does arithmetic on one dtype.
_GATHER = 0x0102040810204080  # (8 flag bytes as int64) * _GATHER: the 8 bits in the top byte
_SPREAD = 0x0101010101010101  # a byte copied into all 8 bytes
_BIT_I = 0x8040201008040201 - 2**64  # byte i keeps bit i (as a signed int64)
_LOW7 = 0x7F7F7F7F7F7F7F7F  # + byte: 0x80 set iff the byte was non-zero (no carry out)
_HIGH = 0x8080808080808080 - 2**64


@fused
def _pack_positive(y: Tensor) -> Tensor:
    """The mask y > 0 of y = relu(x) as uint8, 8 flags per byte (padded to a multiple of 8).
    It is taken as y != 0 by a cast to bool, which eager PyTorch on a CPU does 8x faster than
    a comparison: the same flags, but for NaN (whose gradient is NaN either way)."""
    flat = y.bool().reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    return ((flat.view(torch.int64) * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


@fused
def _mask_grad(gy: Tensor, packed: Tensor) -> Tensor:
    """gy where the packed mask is set, 0 elsewhere (gy * 1.0 or gy * 0.0, as before)."""
    spread = (packed.to(torch.int64) * _SPREAD).bitwise_and_(_BIT_I)
    flags = ((spread + _LOW7).bitwise_and_(_HIGH) >> 7).bitwise_and_(_SPREAD)
    mask = flags.view(torch.uint8)[: gy.numel()].view(gy.shape).to(gy.dtype)
    return mask.mul_(gy)


class ReLUFn(torch.autograd.Function):
    """ReLU that saves a bit-packed mask (1 bit per element) instead of its float output."""

    @staticmethod
    def forward(ctx, x, inplace: bool):  # noqa: ANN001, ANN205
        if inplace:
            ctx.mark_dirty(x)
        if cpu_kernels.usable(x) and x.is_contiguous():  # y and the mask in one pass
            y = x if inplace else torch.empty_like(x)
            ctx.save_for_backward(cpu_kernels.ops().relu_pack(x, y))
            return y
        y = x.clamp_(min=0) if inplace else x.clamp(min=0)
        ctx.save_for_backward(_pack_positive(y))
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        (packed,) = ctx.saved_tensors
        if cpu_kernels.usable(gy):
            return cpu_kernels.ops().relu_mask_grad(gy.contiguous(), packed), None
        return _mask_grad(gy.contiguous(), packed), None


class MaxPool2dFn(torch.autograd.Function):
    """Max-pool that saves the argmax as its position inside the window (uint8), not int64.

    The index arithmetic runs on floats, which eager PyTorch does several times faster than
    int64 division here; it is exact: every value is an integer below 2^23 (float64 for
    larger planes), and floor(i / W) of such integers is exact in float."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):  # noqa: ANN001, ANN205
        y, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        (_, kw), (dh, dw), W = kernel, dilation, x.shape[-1]
        oh, ow = _window_origins(y.shape, x.shape, stride, padding, x.device)
        i = idx.to(oh.dtype)
        ih = torch.div(i, W).floor_()  # row of the argmax in x
        iw = i.sub_(ih * W)  # column
        local = ih.sub_(oh).div_(dh).mul_(kw).add_(iw.sub_(ow).div_(dw))  # < kh*kw <= 255
        ctx.geometry = (x.shape, kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(local.to(torch.int16).to(torch.uint8))
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        (local,) = ctx.saved_tensors
        shape, kernel, stride, padding, dilation, ceil_mode = ctx.geometry
        (_, kw), (dh, dw), W = kernel, dilation, shape[-1]
        oh, ow = _window_origins(gy.shape, shape, stride, padding, gy.device)
        lf = local.to(oh.dtype)
        row = torch.div(lf, kw).floor_()
        col = lf.sub_(row * kw)
        idx = row.mul_(dh).add_(oh).mul_(W).add_(col.mul_(dw).add_(ow)).long()
        # PyTorch's own max-pool backward (it reads only the shape of its `self` argument)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            gy, gy.new_empty(shape), kernel, stride, padding, dilation, ceil_mode, idx)
        return gx, None, None, None, None, None


def _window_origins(out_shape: torch.Size, in_shape: torch.Size, stride: tuple,
                    padding: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    """The input row (column) of each output row's (column's) window origin, as floats:
    float32 if every index of an input plane is below 2^23, else float64."""
    H, W = in_shape[-2:]
    dtype = torch.float32 if H * W < 2**23 else torch.float64
    (sh, sw), (ph, pw) = stride, padding
    oh = torch.arange(out_shape[-2], device=device, dtype=dtype).view(-1, 1) * sh - ph
    ow = torch.arange(out_shape[-1], device=device, dtype=dtype).view(1, -1) * sw - pw
    return oh, ow
