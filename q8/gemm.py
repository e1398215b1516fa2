"""The three GEMMs of a quantized conv/linear layer, in the mode `QuantConfig.gemm` names.

    forward   y     = x_hat W_hat^T   (conv: conv(x_hat, W_hat))
    data path dL/dx = g_l W_hat       (the grad_bits copy of g_l)
    weights   dL/dW = g_l^T x_hat     (the wgrad_bits copy of g_l)

- `dequantized`: fp32 GEMMs on the dequantized values x_hat = (q - z) s.
- `codes`: GEMMs on the centred codes q - z, integers in [-255, 255] that bf16 holds exactly,
  accumulated in fp32 and scaled afterwards by s_a s_b: the paper's 8-bit GEMM at bf16's rate.
  The 16-bit copy of g_l (up to 65535 in magnitude) comes from its quantizer as two bytes,
  g = 256 hi + lo with hi in [-256, 255] and lo in [0, 255], for two exact GEMMs. The result
  differs from `dequantized` by fp32 accumulation and the rounding of the bf16 output (2^-8 of
  each output at most).
- `int8`: torch._int_mm (int8 x int8 -> int32, exact) for the forward and the data path where the
  GEMM is a plain matrix product (linear layers; 1x1, stride-1 convolutions of any dimension),
  with zero-point corrections from row and column sums; `codes` elsewhere.

Convolutions of 1, 2 or 3 spatial dimensions, plain or transposed, run as aten.convolution and
aten.convolution_backward on their `Geometry`.

A GEMM whose operands are not all codes of at most 8 bits (a full-precision tensor, more bits,
or per-channel weights inside the data path's sum, or inside a transposed convolution's forward
sum: its weight's first dimension is the input channels) runs `dequantized`; so do the forward
and the weight gradient of an input with one range per channel (QuantConfig.act_ranges).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("dequantized", "codes", "int8")
CODE_DTYPE = torch.bfloat16  # exact for the integers of codes of up to 8 bits, |q - z| <= 255


class Operand(NamedTuple):
    """One side of a GEMM: centred codes q - z with their scale and zero point (values =
    (q - z) * scale), or plain values (scale None). Codes of more than 8 bits may come as two
    bytes, q - z = 256 hi + lo with hi = `values` and lo = `low`, both bf16 (exact)."""

    values: Tensor
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    low: Tensor | None = None

    @property
    def is_codes(self) -> bool:
        return self.scale is not None

    def dequantized(self) -> Tensor:
        """x_hat = (q - z) s: the same floats the dequantized mode computes."""
        if self.scale is None:
            return self.values
        if self.low is None:
            return self.values.float() * self.scale
        return (self.values.float() * 256 + self.low.float()) * self.scale

    def narrow(self) -> bool:
        """Codes that bf16 holds exactly in one tensor (at most 8 bits)."""
        return self.is_codes and self.values.dtype == CODE_DTYPE and self.low is None


class Geometry(NamedTuple):
    """A convolution's stride, padding, dilation (one entry per spatial dimension) and groups;
    `transposed` with its output_padding for a transposed convolution (None for a linear
    layer)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    transposed: bool = False
    output_padding: tuple = ()

    def args(self) -> tuple:
        """What aten.convolution and aten.convolution_backward take after the tensors."""
        return (self.stride, self.padding, self.dilation, self.transposed,
                self.output_padding or (0,) * len(self.stride), self.groups)


def forward(x: Operand, w: Operand, bias: Tensor | None, geometry: Geometry | None,
            mode: str) -> Tensor:
    """y = x W^T (+ b), or conv(x, W) (+ b)."""
    if mode == "dequantized" or not (x.narrow() and w.narrow()) or x.scale.numel() > 1 or (
            geometry is not None and geometry.transposed and w.scale.numel() > 1):
        return _apply(x.dequantized(), w.dequantized(), bias, geometry)
    scale = x.scale * w.scale.reshape(-1)  # s_x s_w, per output channel for per-channel W
    if mode == "int8" and _is_matmul(geometry, w.values.shape):
        x2, restore = _rows(x.values, geometry)
        if _int_mm_fits(x2.shape[0], x2.shape[1], w.values.shape[0]):
            y = restore(_int8_product(x2, x.zero_point, w.values.reshape(w.values.shape[0], -1),
                                      w.zero_point.reshape(-1)) * scale)
            return y if bias is None else y + _per_channel(bias, geometry)
    y = _apply(x.values, w.values, None, geometry).float()  # a new tensor: scaled in place
    y.mul_(_per_channel(scale, geometry))
    return y if bias is None else y.add_(_per_channel(bias, geometry))


def weight_grads(g: Operand, x: Operand | None, w: Operand, x_shape: torch.Size,
                 w_shape: torch.Size, geometry: Geometry | None, mode: str, need_bias: bool
                 ) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dW, dL/db) from the weight path's copy g of g_l; dL/dW None where x is None (not
    needed). w is read for its shape alone."""
    if mode == "dequantized" and geometry is not None:  # one convolution backward call
        g_hat, x_hat = g.dequantized(), None if x is None else x.dequantized()
        _, gw, gb = torch.ops.aten.convolution_backward(
            g_hat, _like(x_hat, x_shape, g_hat), _like(w.values, w_shape, g_hat),
            [g_hat.shape[1]] if need_bias else None, *geometry.args(),
            [False, x is not None, need_bias])
        return gw, gb
    gw = None if x is None else _grad_weight(g, x, w, w_shape, geometry, mode)
    gb = None
    if need_bias:
        values = g.dequantized()
        gb = values.reshape(-1, values.shape[-1]).sum(0) if geometry is None else values.sum(
            [0, *range(2, values.dim())])
    return gw, gb


def input_grad(g: Operand, w: Operand, x_shape: torch.Size, geometry: Geometry | None,
               mode: str) -> Tensor:
    """dL/dx = g W (linear) or conv's input gradient, from the data path's copy g of g_l.
    Per-channel weight scales vary along the summed output channels: that GEMM runs
    dequantized."""
    codes = mode != "dequantized" and g.narrow() and w.narrow() and w.scale.numel() == 1
    if not codes:
        return _input_product(g.dequantized(), w.dequantized(), x_shape, geometry)
    scale = g.scale * w.scale
    if mode == "int8" and _is_matmul(geometry, w.values.shape):
        g2, restore = _rows(g.values, geometry)
        w2 = w.values.reshape(w.values.shape[0], -1)
        if _int_mm_fits(g2.shape[0], g2.shape[1], w2.shape[1]):
            return restore(_int8_product(g2, g.zero_point, w2.t(), w.zero_point) * scale)
    return _input_product(g.values, w.values, x_shape, geometry).float().mul_(scale)


def _grad_weight(g: Operand, x: Operand, w: Operand, w_shape: torch.Size,
                 geometry: Geometry | None, mode: str) -> Tensor:
    """dL/dW = g^T x (linear) or conv's weight gradient; a g of two bytes in two GEMMs."""
    split = g.is_codes and g.low is not None
    if mode == "dequantized" or not (x.narrow() and (g.narrow() or split)) or (
            x.scale.numel() > 1):
        return _weight_product(g.dequantized(), x.dequantized(), w.values, w_shape, geometry)
    scale = g.scale * x.scale
    y = _weight_product(g.values, x.values, w.values, w_shape, geometry).float()
    if split:  # 256 hi + lo
        low = _weight_product(g.low, x.values, w.values, w_shape, geometry)
        y.mul_(256).add_(low.float())
    return y.mul_(scale)


def _like(t: Tensor | None, shape: torch.Size, like: Tensor) -> Tensor:
    """t where it has like's dtype, else a tensor of `shape` that holds no memory: the
    convolution backward reads only the shape of the operand it does not differentiate by."""
    if t is not None and t.dtype == like.dtype:
        return t
    return like.new_empty(()).expand(shape)


# ---- the products ---------------------------------------------------------------------------


def _as_on_a_gpu(product: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """On a CPU, a product of bf16 codes runs in fp32 on the same integers and rounds to bf16:
    what a GPU's bf16 GEMM computes (fp32 accumulation, a bf16 output), on every CPU alike.
    PyTorch's CPU bf16 convolutions (oneDNN) do not: on AVX2-only CPUs the input gradient
    sums a kernel's taps in bf16, and with padding the weight gradient is partly left
    uninitialised (torch 2.14)."""

    @functools.wraps(product)
    def run(*args: Any) -> Tensor:
        first = args[0]
        if first.dtype != CODE_DTYPE or first.device.type != "cpu":
            return product(*args)
        widened = [a.float() if isinstance(a, Tensor) else a for a in args]
        return product(*widened).to(CODE_DTYPE)

    return run


@_as_on_a_gpu
def _apply(x: Tensor, w: Tensor, bias: Tensor | None, geometry: Geometry | None) -> Tensor:
    if geometry is None:
        return F.linear(x, w, bias)
    return torch.ops.aten.convolution(x, w, bias, *geometry.args())


@_as_on_a_gpu
def _input_product(g: Tensor, w: Tensor, x_shape: torch.Size, geometry: Geometry | None
                   ) -> Tensor:
    if geometry is None:  # linear over any leading dims: (..., out) -> (..., in)
        return g @ w
    return torch.ops.aten.convolution_backward(
        g, _like(None, x_shape, g), w, None, *geometry.args(), [True, False, False])[0]


@_as_on_a_gpu
def _weight_product(g: Tensor, x: Tensor, w_like: Tensor, w_shape: torch.Size,
                    geometry: Geometry | None) -> Tensor:
    if geometry is None:
        return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return torch.ops.aten.convolution_backward(
        g, x, _like(w_like, w_shape, x), None, *geometry.args(), [False, True, False])[1]


def _per_channel(v: Tensor, geometry: Geometry | None) -> Tensor:
    """A per-output-channel v (bias, scale) shaped to broadcast against the layer's output."""
    return v if geometry is None else v.view(1, -1, *[1] * len(geometry.stride))


def _is_matmul(geometry: Geometry | None, w_shape: torch.Size) -> bool:
    """A linear layer, or a 1x1 (1x1x1...) stride-1 unpadded ungrouped convolution, not
    transposed: a plain product."""
    if geometry is None:
        return True
    return (all(k == 1 for k in w_shape[2:]) and all(s == 1 for s in geometry.stride) and
            all(p == 0 for p in geometry.padding) and geometry.groups == 1
            and not geometry.transposed)


def _int_mm_fits(m: int, k: int, n: int) -> bool:
    """The shapes torch._int_mm takes on a GPU (cuBLASLt: m > 16, k and n multiples of 8),
    required everywhere so that a CPU run takes the same path; and int32 holds every sum
    (K products of at most 2^14)."""
    return m > 16 and k >= 16 and k % 8 == 0 and n % 8 == 0 and k <= 2**31 // 2**14


def _rows(t: Tensor, geometry: Geometry | None):  # noqa: ANN202
    """t as a (rows, k) matrix of a plain product, and the map of a (rows, n) result back to
    the layer's output layout."""
    if geometry is None:
        lead = t.shape[:-1]
        return t.reshape(-1, t.shape[-1]), lambda y: y.reshape(*lead, y.shape[-1])
    lead = (t.shape[0], *t.shape[2:])  # 1x1 convolution: channels are the product's k
    rows = t.movedim(1, -1).reshape(-1, t.shape[1])
    return rows, lambda y: y.reshape(*lead, -1).movedim(-1, 1)


def _int8_product(a: Tensor, a_zero: Tensor, b: Tensor, b_zero: Tensor) -> Tensor:
    """a b^T for centred codes a (m, k) and b (n, k) with zero points (scalar for a, scalar or
    per row of b), exactly, by an int8 GEMM: with a = a8 + c_a, a8 = q_a - 128 in int8 and
    c_a = 128 - z_a (likewise b), a b^T = a8 b8^T + c_b rowsum(a8) + c_a colsum(b8) + k c_a c_b."""
    c_a, c_b = 128 - a_zero, 128 - b_zero
    a8 = (a.float() - c_a).to(torch.int8)
    b8 = (b.float() - c_b.reshape(-1, 1)).to(torch.int8)
    k = a.shape[1]
    prod = torch._int_mm(a8.contiguous(), b8.contiguous().t()).double()  # exact int32
    rows = a8.sum(1, dtype=torch.int64).double().unsqueeze(1)
    cols = b8.sum(1, dtype=torch.int64).double().unsqueeze(0)
    c_a, c_b = c_a.double(), c_b.double().reshape(1, -1)
    return (prod + c_b * rows + c_a * cols + k * c_a * c_b).float()
