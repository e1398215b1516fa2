"""Autograd functions of q8: one per quantized op, each saving 8-bit codes for its backward.

Gradient bifurcation (Banner et al. 2018, sec. 5): the backward pass of a conv/linear layer
quantizes its layer gradient g_l twice, to `grad_bits` for dL/dx = g_l W (the data path, which
tolerates noise) and to `wgrad_bits` for dL/dW = x^T g_l (which accumulates over the batch).
The forward runs the GEMM once; the 2018 code ran every convolution twice instead.

The elementwise work is the layer's `Kernels` (q8.kernels): these functions hold the structure
of the method, the backends the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from q8 import gemm
from q8.config import check_bits
from q8.gemm import Geometry, Operand
from q8.kernels import Kernels
from q8.kernels.interface import Backend
from q8.kernels.reference import draw_seed, fake_quant, minmax


@dataclass(frozen=True)
class GradSpec:
    """How a layer's backward quantizes g_l: data-path bits, weight-path bits, rounding."""

    bits: int | None
    wbits: int | None
    rounding: str = "stochastic"

    def seed(self) -> Tensor | None:
        """The noise seed of one backward: drawn from torch's generator when g_l is rounded
        stochastically, None for rounding to nearest or nothing to round."""
        quantized = self.bits is not None or self.wbits is not None
        return draw_seed() if quantized and self.rounding == "stochastic" else None

    def data_copy(self, k: Backend, g: Tensor) -> Tensor:
        """g quantized once, to the data path's bits, for a backward with no weight gradient
        (a norm's, a product of two activations'): `k` is the backend serving g."""
        return k.grad_pair(g, self.bits, self.bits, self.seed(), True, False)[0]


@dataclass(frozen=True)
class LayerSpec:
    """Static description of a quantized conv/linear call."""

    act_bits: int | None
    weight_bits: int | None
    per_channel: bool
    grad: GradSpec
    gemm: str = "dequantized"  # q8.gemm.MODES
    # conv only (None for linear): one entry per spatial dimension
    stride: tuple | None = None
    padding: tuple | None = None
    dilation: tuple | None = None
    groups: int = 1
    transposed: bool = False
    output_padding: tuple = ()

    @property
    def geometry(self) -> Geometry | None:
        if self.stride is None:
            return None
        return Geometry(self.stride, self.padding, self.dilation, self.groups, self.transposed,
                        self.output_padding)


class BifurcatedLayerFn(torch.autograd.Function):
    """y = x_hat W_hat^T + b (linear) or conv(x_hat, W_hat) + b, with a bifurcated backward;
    the GEMMs in the spec's mode (q8.gemm)."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_lo, x_hi, spec: LayerSpec,  # noqa: ANN001, ANN205
                kernels: Kernels):
        k = kernels.on(x)
        x_hat, saved_x = k.quantize_input(x, x_lo, x_hi, spec.act_bits)
        # W_hat is rebuilt in backward from W and its (scale, zero point): W is alive anyway,
        # so the weights cost no saved memory
        w_hat, w_qp = k.quantize_weight(weight, spec.weight_bits, spec.per_channel)
        if spec.gemm == "dequantized":
            x_op, w_op = Operand(x_hat), Operand(w_hat)
        else:
            x_op, w_op = k.restore_codes(saved_x), k.weight_codes(weight, spec.weight_bits, w_qp)
        y = gemm.forward(x_op, w_op, bias, spec.geometry, spec.gemm)
        ctx.spec, ctx.kernels, ctx.n_x, ctx.has_bias = spec, kernels, len(saved_x), bias is not None
        ctx.shapes = x.shape, weight.shape
        ctx.save_for_backward(*saved_x, weight, *w_qp)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        spec: LayerSpec = ctx.spec
        k = ctx.kernels.on(gy)
        saved = ctx.saved_tensors
        saved_x, weight, w_qp = saved[: ctx.n_x], saved[ctx.n_x], saved[ctx.n_x + 1 :]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        grads = (gy, spec.grad.bits, spec.grad.wbits, spec.grad.seed(), need_x, need_w or need_b)
        if spec.gemm == "dequantized":
            w_op = Operand(k.requantize_weight(weight, spec.weight_bits, w_qp))
            g_data, g_w = (None if g is None else Operand(g) for g in k.grad_pair(*grads))
            x_op = Operand(k.restore(saved_x)) if need_w else None
        else:
            w_op = k.weight_codes(weight, spec.weight_bits, w_qp)
            g_data, g_w = k.grad_pair_codes(*grads)
            x_op = k.restore_codes(saved_x) if need_w else None
        # dL/dW first, so that x_hat, the largest tensor of this backward, and the weight copy
        # of g_l are freed before dL/dx is made: they set the peak memory of a step
        gw = gb = gx = None
        if need_w or need_b:
            gw, gb = gemm.weight_grads(g_w, x_op, w_op, *ctx.shapes, spec.geometry, spec.gemm,
                                       need_b)
        del x_op, g_w
        if need_x:
            gx = gemm.input_grad(g_data, w_op, ctx.shapes[0], spec.geometry, spec.gemm)
        return gx, gw, gb, None, None, None, None


class ReLUFn(torch.autograd.Function):
    """ReLU that saves a bit-packed mask (1 bit per element) instead of its float output."""

    @staticmethod
    def forward(ctx, x, inplace: bool, kernels: Kernels):  # noqa: ANN001, ANN205
        if inplace:
            ctx.mark_dirty(x)
        y, packed = kernels.on(x).relu(x, inplace)
        ctx.kernels = kernels
        ctx.save_for_backward(packed)
        return x if inplace else y  # x itself: what torch.compile requires of a dirty input

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        (packed,) = ctx.saved_tensors
        return ctx.kernels.on(gy).relu_backward(gy, packed), None, None


def _out_of_place(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor, bool], Tensor]:
    return lambda x, inplace: x.copy_(f(x)) if inplace else f(x)


_aten = torch.ops.aten
# kind: (f(x, inplace), (g, x) -> g f'(x)), PyTorch's own ops for both
ACTIVATIONS: dict[str, tuple[Callable[[Tensor, bool], Tensor],
                             Callable[[Tensor, Tensor], Tensor]]] = {
    "gelu": (_out_of_place(F.gelu), lambda g, x: _aten.gelu_backward(g, x)),
    "gelu_tanh": (_out_of_place(lambda x: F.gelu(x, approximate="tanh")),
                  lambda g, x: _aten.gelu_backward(g, x, approximate="tanh")),
    "silu": (F.silu, _aten.silu_backward),
    "hardswish": (F.hardswish, _aten.hardswish_backward),
    "hardsigmoid": (F.hardsigmoid, _aten.hardsigmoid_backward),
    "mish": (F.mish, _aten.mish_backward),
    "sigmoid": (lambda x, inplace: x.sigmoid_() if inplace else x.sigmoid(),
                lambda g, x: _aten.sigmoid_backward(g, x.sigmoid())),
    "tanh": (lambda x, inplace: x.tanh_() if inplace else x.tanh(),
             lambda g, x: _aten.tanh_backward(g, x.tanh())),
}


class ActivationFn(torch.autograd.Function):
    """y = f(x) exactly, for an elementwise f (a kind of ACTIVATIONS); its backward keeps x as
    codes of `bits` over x's own [min, max] (nearest rounding, the layer inputs' quantizer) and
    returns g f'(x_hat).

    The cost of that: |x_hat - x| <= s/2, s = (max(hi, 0) - min(lo, 0)) / (2^B - 2), so
    |f'(x_hat) - f'(x)| <= max|f''| s/2 (mean value theorem), where max|f''| over the reals is
    sqrt(2/pi) = 0.80 for GELU (both approximations), 0.5 for SiLU, 0.64 for Mish,
    1/(6 sqrt 3) = 0.096 for Sigmoid, 4/(3 sqrt 3) = 0.77 for Tanh, 1/3 for Hardswish and 0 for
    Hardsigmoid. Those two have kinks at +-3 where f' jumps (by 1/2 and 1/6): for x within
    s/2 of a kink, f'(x_hat) may be the other side's slope.
    """

    @staticmethod
    def forward(ctx, x, kind: str, inplace: bool, bits: int,  # noqa: ANN001, ANN205
                kernels: Kernels):
        lo, hi = minmax(x.detach())
        wide = x if x.dtype == torch.float32 else x.float()
        # the codes are taken before f may overwrite x
        _, saved = kernels.on(x).quantize_input(wide, lo.float(), hi.float(), bits)
        del wide
        if inplace:
            ctx.mark_dirty(x)
        y = ACTIVATIONS[kind][0](x, inplace)
        ctx.kind, ctx.kernels = kind, kernels
        ctx.save_for_backward(*saved)
        return x if inplace else y  # x itself: what torch.compile requires of a dirty input

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x_hat = ctx.kernels.on(gy).restore(ctx.saved_tensors).to(gy.dtype)
        return ACTIVATIONS[ctx.kind][1](gy, x_hat), None, None, None, None


class MaxPool2dFn(torch.autograd.Function):
    """Max-pool that saves the argmax as its position inside the window (uint8), not int64."""

    @staticmethod
    def forward(ctx, x, geometry: tuple, kernels: Kernels):  # noqa: ANN001, ANN205
        y, local = kernels.on(x).max_pool(x, geometry)
        ctx.geometry, ctx.in_shape, ctx.kernels = geometry, x.shape, kernels
        ctx.save_for_backward(local)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        (local,) = ctx.saved_tensors
        k = ctx.kernels.on(gy)
        return k.max_pool_backward(gy, local, ctx.in_shape, ctx.geometry), None, None


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, rounding, dim, generator):  # noqa: ANN001, ANN205
        seed = draw_seed(generator) if rounding == "stochastic" else None
        return fake_quant(x, *minmax(x, dim), bits, seed)  # over x's own [min, max]

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
    check_bits("bits", bits, optional=False)
    return _FakeQuantizeSTE.apply(x, bits, rounding, dim, generator)
