"""The kernel interface of q8's autograd functions, and the one rule of its fused backends.

`Backend` is what q8.functional and q8.norm call: the elementwise and per-plane passes of the
paper's quantizers. `q8.kernels.reference.Reference` implements it in plain PyTorch and
specifies every op. A fused backend (`cpu`, `cuda`) subclasses `Fused`: its kernels run the
calls that `Fused.fuses` admits and the reference runs the rest, with the same maths.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from q8.gemm import Operand
from q8.kernels.reference import Reference, Seed

Saved = tuple[Tensor, ...]  # what a backward keeps of an input: (codes, scale, zero_point) or (x,)


@runtime_checkable
class Backend(Protocol):
    """The ops of a kernel backend; `q8.kernels.reference.Reference` documents each."""

    name: str

    def serves(self, x: Tensor) -> bool: ...
    def quantize_input(self, x: Tensor, lo: Tensor, hi: Tensor,
                       bits: int | None) -> tuple[Tensor, Saved]: ...
    def restore(self, saved: Saved) -> Tensor: ...
    def restore_codes(self, saved: Saved) -> Operand: ...
    def quantize_weight(self, w: Tensor, bits: int | None,
                        per_channel: bool) -> tuple[Tensor, Saved]: ...
    def requantize_weight(self, w: Tensor, bits: int | None, qp: Saved) -> Tensor: ...
    def weight_codes(self, w: Tensor, bits: int | None, qp: Saved) -> Operand: ...
    def grad_pair(self, g: Tensor, bits: int | None, wbits: int | None, seed: Seed | None,
                  need_data: bool = True, need_weight: bool = True
                  ) -> tuple[Tensor | None, Tensor | None]: ...
    def grad_pair_codes(self, g: Tensor, bits: int | None, wbits: int | None,
                        seed: Seed | None, need_data: bool = True, need_weight: bool = True
                        ) -> tuple[Operand | None, Operand | None]: ...
    def relu(self, x: Tensor, inplace: bool) -> tuple[Tensor, Tensor]: ...
    def relu_backward(self, gy: Tensor, packed: Tensor) -> Tensor: ...
    def max_pool(self, x: Tensor, geometry: tuple) -> tuple[Tensor, Tensor]: ...
    def max_pool_backward(self, gy: Tensor, local: Tensor, in_shape: torch.Size,
                          geometry: tuple) -> Tensor: ...
    def range_bn_stats(self, x: Tensor, lo: Tensor, hi: Tensor, bits: int | None
                       ) -> tuple[Saved, Tensor, Tensor, Tensor]: ...
    def range_bn_affine(self, saved: Saved, a: Tensor, b: Tensor) -> Tensor: ...
    def range_bn_grad_sums(self, saved: Saved, gy: Tensor, mean: Tensor, t_max: Tensor,
                           t_min: Tensor, bits: int | None, seed: Seed | None
                           ) -> tuple[Tensor, ...]: ...
    def range_bn_grad_input(self, saved: Saved, gy: Tensor, g_lo: Tensor, g_hi: Tensor,
                            bits: int | None, seed: Seed | None, a: Tensor, g_mean: Tensor,
                            t_max: Tensor, t_min: Tensor, w_max: Tensor,
                            w_min: Tensor) -> Tensor: ...


CODE_BITS = 8  # codes that a fused kernel saves or reads are bytes


def takes(*tensors: Tensor) -> bool:
    """float32 values or uint8 codes, the first non-empty."""
    return all(t.dtype in (torch.float32, torch.uint8) for t in tensors) and tensors[0].numel() > 0


def holds_codes(saved: Saved) -> bool:
    """Whether a saved input is 8-bit codes (codes, scale, zero point), not a float tensor."""
    return len(saved) == 3 and saved[0].dtype == torch.uint8


def code_bits(saved: Saved) -> int | None:
    """The bits of a saved input's codes, None for a full-precision one."""
    return CODE_BITS if holds_codes(saved) else None


def seed_tensor(seed: Seed | None) -> Tensor | None:
    """A seed as the custom ops take it: a 0-d int64 tensor on the CPU, or None (nearest)."""
    if seed is None or isinstance(seed, Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64)


class Fused:
    """A backend of fused kernels. The one rule (`fuses`): a kernel runs an op when the op has
    something to quantize (bits not None; at most 8 where it makes codes) over ranges it takes
    (one per tensor; one per channel where `channel_ranges`), every tensor it reads is float32
    values or uint8 codes, and the first is not empty.
    Everything else, and every op a backend does not fuse, runs the reference's op."""

    name = "fused"
    reference = Reference()
    channel_ranges = False  # whether quantize_input and restore take a range per channel

    def fuses(self, *tensors: Tensor, bits: int | None = CODE_BITS,
              makes_codes: bool = False, ranges: tuple[Tensor, ...] = ()) -> bool:
        """Whether the kernel runs an op on `tensors` that quantizes to `bits` (an op with no
        bit-width, such as ReLU, passes none) over `ranges` (lo and hi, or scale and zero
        point): one per tensor, or one per channel where `channel_ranges`."""
        if bits is None or (makes_codes and bits > CODE_BITS):
            return False
        return takes(*tensors) and (self.channel_ranges or all(r.numel() == 1 for r in ranges))

    def serves(self, x: Tensor) -> bool:
        raise NotImplementedError

    # the ops a fused backend may leave to the reference

    def quantize_input(self, x: Tensor, lo: Tensor, hi: Tensor,
                       bits: int | None) -> tuple[Tensor, Saved]:
        return self.reference.quantize_input(x, lo, hi, bits)

    def restore(self, saved: Saved) -> Tensor:
        return self.reference.restore(saved)

    def restore_codes(self, saved: Saved) -> Operand:
        return self.reference.restore_codes(saved)

    def quantize_weight(self, w: Tensor, bits: int | None,
                        per_channel: bool) -> tuple[Tensor, Saved]:
        return self.reference.quantize_weight(w, bits, per_channel)

    def requantize_weight(self, w: Tensor, bits: int | None, qp: Saved) -> Tensor:
        return self.reference.requantize_weight(w, bits, qp)

    def weight_codes(self, w: Tensor, bits: int | None, qp: Saved) -> Operand:
        return self.reference.weight_codes(w, bits, qp)

    def grad_pair(self, g: Tensor, bits: int | None, wbits: int | None, seed: Seed | None,
                  need_data: bool = True, need_weight: bool = True
                  ) -> tuple[Tensor | None, Tensor | None]:
        return self.reference.grad_pair(g, bits, wbits, seed, need_data, need_weight)

    def grad_pair_codes(self, g: Tensor, bits: int | None, wbits: int | None,
                        seed: Seed | None, need_data: bool = True, need_weight: bool = True
                        ) -> tuple[Operand | None, Operand | None]:
        return self.reference.grad_pair_codes(g, bits, wbits, seed, need_data, need_weight)

    def relu(self, x: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        return self.reference.relu(x, inplace)

    def relu_backward(self, gy: Tensor, packed: Tensor) -> Tensor:
        return self.reference.relu_backward(gy, packed)

    def max_pool(self, x: Tensor, geometry: tuple) -> tuple[Tensor, Tensor]:
        return self.reference.max_pool(x, geometry)

    def max_pool_backward(self, gy: Tensor, local: Tensor, in_shape: torch.Size,
                          geometry: tuple) -> Tensor:
        return self.reference.max_pool_backward(gy, local, in_shape, geometry)

    def range_bn_stats(self, x: Tensor, lo: Tensor, hi: Tensor, bits: int | None
                       ) -> tuple[Saved, Tensor, Tensor, Tensor]:
        return self.reference.range_bn_stats(x, lo, hi, bits)

    def range_bn_affine(self, saved: Saved, a: Tensor, b: Tensor) -> Tensor:
        return self.reference.range_bn_affine(saved, a, b)

    def range_bn_grad_sums(self, saved: Saved, gy: Tensor, mean: Tensor, t_max: Tensor,
                           t_min: Tensor, bits: int | None, seed: Seed | None
                           ) -> tuple[Tensor, ...]:
        return self.reference.range_bn_grad_sums(saved, gy, mean, t_max, t_min, bits, seed)

    def range_bn_grad_input(self, saved: Saved, gy: Tensor, g_lo: Tensor, g_hi: Tensor,
                            bits: int | None, seed: Seed | None, a: Tensor, g_mean: Tensor,
                            t_max: Tensor, t_min: Tensor, w_max: Tensor,
                            w_min: Tensor) -> Tensor:
        return self.reference.range_bn_grad_input(saved, gy, g_lo, g_hi, bits, seed, a,
                                                  g_mean, t_max, t_min, w_max, w_min)
