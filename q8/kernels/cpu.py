"""The `cpu` backend: q8's fused C++ kernels (q8/kernels/cpu.cpp), each layer's quantizer chain
in one or two passes over memory, in every core, with the rounding noise hashed in place.

Eager PyTorch runs each step of a quantizer as its own pass and its own dispatcher call; these
kernels run the chain per element. They are compiled on first use by torch.utils.cpp_extension
(a C++ compiler and ninja; about 15 s) and cached under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions). Float32 tensors go to the kernels; other dtypes, codes of more than
8 bits and empty tensors take the reference's ops, which the kernels equal.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch
from torch import Tensor

from q8.kernels.fakes import register_fakes
from q8.kernels.interface import Fused, code_bits, holds_codes, seed_tensor
from q8.kernels.reference import Seed, _window_origins

log = logging.getLogger("q8")
SOURCE = Path(__file__).with_name("cpu.cpp")
CPU_OPS = ("grad_pair", "quantize_input", "dequantize", "quantize_weight", "requantize_weight",
           "relu", "relu_", "relu_backward", "range_bn_stats", "range_bn_affine",
           "range_bn_grad_sums", "range_bn_grad_input")


@functools.cache
def build() -> object:
    """torch.ops.q8_cpu, compiled on the first call; raises where it cannot be built."""
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    name = "q8_cpu_backend"
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
            "AVX2", "AVX512"):
        flags, name = [*flags, "-mavx2"], name + "_avx2"
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level, path = cpp_log.level, os.environ.get("PATH", "")
    cpp_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant to CPU code
    try:
        try:  # cpp_extension runs `ninja` from PATH: the pip package's, if the venv is not on it
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        except ImportError:
            pass
        from torch.utils import cpp_extension

        log.info("q8: loading the CPU kernels (compiled on first use, then cached)")
        try:  # OpenMP, as PyTorch's own parallel_for on Linux; a compiler without it: 1 core
            cpp_extension.load(name=name, sources=[str(SOURCE)], is_python_module=False,
                               extra_cflags=[*flags, "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception:
            cpp_extension.load(name=name + "_serial", sources=[str(SOURCE)],
                               is_python_module=False, extra_cflags=flags)
        register_fakes("q8_cpu", CPU_OPS)
        return torch.ops.q8_cpu
    finally:
        cpp_log.setLevel(level)
        os.environ["PATH"] = path


class Cpu(Fused):
    """The reference's ops on CPU tensors, through the C++ kernels (`Fused.fuses` says which
    calls)."""

    name = "cpu"
    channel_ranges = True

    def __init__(self) -> None:
        self.ops = build()

    def serves(self, x: Tensor) -> bool:
        return x.device.type == "cpu"

    def quantize_input(self, x: Tensor, lo: Tensor, hi: Tensor,
                       bits: int | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        if not self.fuses(x, bits=bits, makes_codes=True, ranges=(lo, hi)):
            return self.reference.quantize_input(x, lo, hi, bits)
        codes, x_hat, scale, zero_point = self.ops.quantize_input(
            x.contiguous(), lo.contiguous(), hi.contiguous(), bits)
        return x_hat, (codes, scale, zero_point)

    def restore(self, saved: tuple[Tensor, ...]) -> Tensor:
        if not self.fuses(*saved, bits=code_bits(saved), ranges=saved[1:]):
            return self.reference.restore(saved)
        return self.ops.dequantize(*saved)

    def quantize_weight(self, w: Tensor, bits: int | None,
                        per_channel: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        if not self.fuses(w, bits=bits):
            return self.reference.quantize_weight(w, bits, per_channel)
        w_hat, scale, zero_point = self.ops.quantize_weight(w.detach().contiguous(), bits,
                                                            per_channel)
        return w_hat, (scale, zero_point)

    def requantize_weight(self, w: Tensor, bits: int | None, qp: tuple[Tensor, ...]) -> Tensor:
        if not self.fuses(w, bits=bits):
            return self.reference.requantize_weight(w, bits, qp)
        return self.ops.requantize_weight(w.detach().contiguous(), bits, *qp)

    def grad_pair(self, g: Tensor, bits: int | None, wbits: int | None, seed: Seed | None,
                  need_data: bool = True, need_weight: bool = True
                  ) -> tuple[Tensor | None, Tensor | None]:
        if not self.fuses(g, bits=bits):
            return self.reference.grad_pair(g, bits, wbits, seed, need_data, need_weight)
        seed = seed_tensor(seed)
        if wbits is None:  # the weight path keeps g itself
            data = self.ops.grad_pair(g.contiguous(), bits, bits, seed, True, False)[0] \
                if need_data else None
            return data, (g if need_weight else None)
        if wbits == bits:  # one tensor serves both paths
            both = self.ops.grad_pair(g.contiguous(), bits, bits, seed, True, False)[0]
            return both, both
        return self.ops.grad_pair(g.contiguous(), bits, wbits, seed, need_data, need_weight)

    def relu(self, x: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        if not (self.fuses(x) and x.is_contiguous()):
            return self.reference.relu(x, inplace)
        if inplace:
            return x, self.ops.relu_(x)
        return self.ops.relu(x)

    def relu_backward(self, gy: Tensor, packed: Tensor) -> Tensor:
        if not self.fuses(gy):
            return self.reference.relu_backward(gy, packed)
        return self.ops.relu_backward(gy.contiguous(), packed)

    # Max-pool's index arithmetic on floats, which eager PyTorch on a CPU does several times
    # faster than int64 division: exact, as every value is an integer below 2^23 (float64 for
    # larger planes) and floor(i / W) of such integers is exact in float.

    def max_pool(self, x: Tensor, geometry: tuple) -> tuple[Tensor, Tensor]:
        kernel, stride, padding, dilation, ceil_mode = geometry
        y, idx = torch.nn.functional.max_pool2d(x, kernel, stride, padding, dilation,
                                                ceil_mode, return_indices=True)
        oh, ow = _float_origins(y.shape, x.shape, stride, padding, x.device)
        W = x.shape[-1]
        i = idx.to(oh.dtype)
        ih = torch.div(i, W).floor_()  # row of the argmax in x
        iw = i.sub_(ih * W)  # column
        local = ih.sub_(oh).div_(dilation[0]).mul_(kernel[1]).add_(
            iw.sub_(ow).div_(dilation[1]))
        return y, local.to(torch.int16).to(torch.uint8)  # via int16: faster, and exact here

    def max_pool_backward(self, gy: Tensor, local: Tensor, in_shape: torch.Size,
                          geometry: tuple) -> Tensor:
        kernel, stride, padding, dilation, ceil_mode = geometry
        oh, ow = _float_origins(gy.shape, in_shape, stride, padding, gy.device)
        lf = local.to(oh.dtype)
        row = torch.div(lf, kernel[1]).floor_()
        col = lf.sub_(row * kernel[1])
        idx = row.mul_(dilation[0]).add_(oh).mul_(in_shape[-1]).add_(
            col.mul_(dilation[1]).add_(ow)).long()
        return torch.ops.aten.max_pool2d_with_indices_backward(
            gy, gy.new_empty(in_shape), kernel, stride, padding, dilation, ceil_mode, idx)

    # Range BN

    def range_bn_stats(self, x: Tensor, lo: Tensor, hi: Tensor, bits: int | None
                       ) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor]:
        if not self.fuses(x, bits=bits, makes_codes=True):
            return self.reference.range_bn_stats(x, lo, hi, bits)
        codes, scale, zero_point, s, mn, mx = self.ops.range_bn_stats(x.contiguous(), lo, hi,
                                                                       bits)
        return (codes, scale, zero_point), s, mn, mx

    def range_bn_affine(self, saved: tuple[Tensor, ...], a: Tensor, b: Tensor) -> Tensor:
        if not self.fuses(*saved, a, b, bits=code_bits(saved)):
            return self.reference.range_bn_affine(saved, a, b)
        return self.ops.range_bn_affine(*saved, a.contiguous(), b.contiguous())

    def range_bn_grad_sums(self, saved: tuple[Tensor, ...], gy: Tensor, mean: Tensor,
                           t_max: Tensor, t_min: Tensor, bits: int | None, seed: Seed | None
                           ) -> tuple[Tensor, ...]:
        if not (self.fuses(gy, mean, t_max, t_min, bits=bits) and holds_codes(saved)):
            return self.reference.range_bn_grad_sums(saved, gy, mean, t_max, t_min, bits, seed)
        return self.ops.range_bn_grad_sums(*saved, gy.contiguous(), mean, t_max.contiguous(),
                                           t_min.contiguous(), bits, seed_tensor(seed))

    def range_bn_grad_input(self, saved: tuple[Tensor, ...], gy: Tensor, g_lo: Tensor,
                            g_hi: Tensor, bits: int | None, seed: Seed | None, a: Tensor,
                            g_mean: Tensor, t_max: Tensor, t_min: Tensor, w_max: Tensor,
                            w_min: Tensor) -> Tensor:
        stats = (a, g_mean, t_max, t_min, w_max, w_min)
        if not (self.fuses(gy, *stats, bits=bits) and holds_codes(saved)):
            return self.reference.range_bn_grad_input(saved, gy, g_lo, g_hi, bits, seed, *stats)
        return self.ops.range_bn_grad_input(*saved, gy.contiguous(), g_lo, g_hi, bits,
                                            seed_tensor(seed), *(t.contiguous() for t in stats))


def _float_origins(out_shape: torch.Size, in_shape: torch.Size, stride: tuple,
                   padding: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    """_window_origins as floats: float32 if every index of an input plane is below 2^23,
    else float64."""
    H, W = in_shape[-2:]
    oh, ow = _window_origins(out_shape, stride, padding, device)
    dtype = torch.float32 if H * W < 2**23 else torch.float64
    return oh.to(dtype), ow.to(dtype)
