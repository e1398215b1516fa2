"""q8.coverage(model, example_input): the share of a training step's GEMM FLOPs on quantized
operands, measured.

`quantize_model` swaps classes; which GEMMs a forward calls only a run shows (a module may read
a converted layer's weight with its own F.linear, attention multiplies two activations). So
`coverage(model, example_input)` runs one forward and backward under a dispatch mode that sees
every GEMM (convolution and its backward, mm, addmm, bmm, baddbmm, _int_mm, attention), counts
its FLOPs with torch.utils.flop_counter's formulas and checks each operand it multiplies:

- an integer tensor (int8 codes) is quantized;
- a floating-point one is quantized when its values lie on the grid of q8's quantizer, integer
  multiples of a step s whose range holds 0 and spans 2^B - 2 steps, per tensor or per slice of
  its first dimension (per-channel weights), for some B <= 16: its bits. 8-bit operands and the
  16-bit weight-gradient copy of g_l pass; fp32 activations or gradients do not (a tensor of a
  few values can pass by chance: such GEMMs weigh nothing in the totals).

A GEMM counts as quantized when all its operands are. Each GEMM is attributed to a module: in
forward the innermost one running, in backward the one whose forward made the autograd node
being run.
A module whose class was swapped but whose GEMM ran outside its twin's quantized path is
reported with the operand that was not quantized.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
MAX_GRID_BITS = 16  # the weight-gradient copy of g_l: the most bits a quantized operand has


def grid_bits(t: Tensor) -> int | None:
    """The bits of the uniform grid that t's values lie on (per tensor, else per slice of dim 0
    or of dim 1, else per row or per column of its last two dimensions), or None for values on
    no grid of at most 2^16 levels (full precision)."""
    if not t.is_floating_point():
        return 8 * t.element_size()
    bits = _grid_bits(t.detach().flatten())
    # per output channel (a weight), or per channel of an activation (B, C, ...)
    for dim in (0, 1) if t.dim() >= 3 else (0,) if t.dim() == 2 else ():
        if bits is None and t.shape[dim] > 1:
            slices = [_grid_bits(s.flatten()) for s in t.detach().unbind(dim)]
            bits = None if any(b is None for b in slices) else max(slices)
    if bits is None and t.dim() >= 2:  # per row, or per column (a transposed operand)
        bits = _row_grid_bits(t.detach())
        bits = _row_grid_bits(t.detach().mT) if bits is None else bits
    return bits


MIN_ROW = 8  # a row of 1 or 2 values lies on a grid of its own: too short to tell


def _row_grid_bits(t: Tensor) -> int | None:
    """_grid_bits of every row of t (its last dimension) at once: the most bits any row needs,
    or None when a row lies on no grid."""
    v = t.reshape(-1, t.shape[-1]).double()
    if v.shape[1] < MIN_ROW or not torch.isfinite(v).all():
        return None
    span = (v.amax(1, keepdim=True).clamp(min=0) - v.amin(1, keepdim=True).clamp(max=0))
    flat = span[:, 0] == 0
    need = torch.full((v.shape[0],), -1, dtype=torch.long)
    need[flat] = 0
    for bits in range(1, MAX_GRID_BITS + 1):
        for steps in (2**bits - 2, 2**bits - 1, 2**bits - 3):
            k = v / (span.clamp(min=1e-300) / max(steps, 1))
            on = ((k - k.round()).abs() <= 0.05).all(1) & (need < 0)
            need[on] = bits
        if (need >= 0).all():
            return int(need.max())
    return None


def _grid_bits(v: Tensor) -> int | None:
    """The fewest bits B such that the values are integer multiples of one step s with
    span / s = 2^B - 2 (give or take one): q8's grid, whose range holds 0, of x_hat = (q - z) s
    (the values' own span: the quantizer's range rounded to the grid)."""
    u = torch.unique(v.float()).double()
    if u.numel() > 2**MAX_GRID_BITS or not torch.isfinite(u).all():
        return None
    if u.numel() <= 1:
        return 0
    span = u.max().clamp(min=0) - u.min().clamp(max=0)
    for bits in range(1, MAX_GRID_BITS + 1):
        if u.numel() > 2**bits:
            continue
        for steps in (2**bits - 2, 2**bits - 1, 2**bits - 3):
            k = u / (span / max(steps, 1))
            if (k - k.round()).abs().max() <= 0.05:  # fp32's rounding of x_hat: < 0.01
                return bits
    return None


def _sdpa_forward_flops(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)


def _sdpa_backward_flops(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    packet = func._overloadpacket
    if packet in _OWN_FLOPS:
        return _OWN_FLOPS[packet](*args, **kwargs)
    return flop_counter.flop_registry[packet](*args, **kwargs, out_val=out)


def _int_mm_flops(a: Tensor, b: Tensor) -> int:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _operands(func: Any, args: tuple) -> dict[str, Tensor]:
    """The tensors a GEMM multiplies, by name."""
    packet = func._overloadpacket
    if packet is aten.convolution:
        return {"input": args[0], "weight": args[1]}
    if packet is aten.convolution_backward:
        grad, x, w, mask = args[0], args[1], args[2], args[-1]
        used = {"grad_output": grad}
        if mask[0]:
            used["weight"] = w
        if mask[1]:
            used["input"] = x
        return used
    if packet in (aten.addmm, aten.baddbmm):
        return {"a": args[1], "b": args[2]}
    if packet in (aten.mm, aten.bmm, aten._int_mm):
        return {"a": args[0], "b": args[1]}
    if packet in _SDPA_BACKWARD:
        return {"grad_output": args[0], "query": args[1], "key": args[2], "value": args[3]}
    return {"query": args[0], "key": args[1], "value": args[2]}  # attention, forward


_SDPA_FORWARD = {aten._scaled_dot_product_flash_attention_for_cpu,
                 aten._scaled_dot_product_flash_attention,
                 aten._scaled_dot_product_efficient_attention,
                 aten._scaled_dot_product_cudnn_attention}
_SDPA_BACKWARD = {aten._scaled_dot_product_flash_attention_for_cpu_backward,
                  aten._scaled_dot_product_flash_attention_backward,
                  aten._scaled_dot_product_efficient_attention_backward,
                  aten._scaled_dot_product_cudnn_attention_backward}
_OWN_FLOPS: dict[Any, Callable[..., int]] = {
    aten._int_mm: _int_mm_flops,
    **dict.fromkeys(_SDPA_FORWARD, _sdpa_forward_flops),
    **dict.fromkeys(_SDPA_BACKWARD, _sdpa_backward_flops),
}
GEMMS = {aten.convolution, aten.convolution_backward, aten.mm, aten.addmm, aten.bmm,
         aten.baddbmm, aten._int_mm, *_SDPA_FORWARD, *_SDPA_BACKWARD}


@dataclass
class Gemm:
    """One GEMM of the step: where it ran, its FLOPs and its operands' bits (None: full
    precision)."""

    op: str
    module: str
    module_class: str
    phase: str  # "forward" or "backward"
    flops: int
    bits: dict[str, int | None]

    @property
    def quantized(self) -> bool:
        return all(b is not None for b in self.bits.values())

    def why(self) -> str:
        """Which operands ran in full precision."""
        return ", ".join(f"{name} in full precision" for name, b in self.bits.items()
                         if b is None)


@dataclass
class Coverage:
    """The GEMMs of one training step, and the share of their FLOPs on quantized operands."""

    gemms: list[Gemm] = field(default_factory=list)

    def share(self, phase: str | None = None) -> float:
        """Quantized FLOPs over all FLOPs, of `phase` ("forward", "backward") or both."""
        chosen = [g for g in self.gemms if phase in (None, g.phase)]
        total = sum(g.flops for g in chosen)
        return sum(g.flops for g in chosen if g.quantized) / total if total else 1.0

    def by_class(self) -> dict[str, dict[str, float]]:
        """Per module class and phase: FLOPs and the quantized share."""
        flops: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for g in self.gemms:
            cell = flops[g.module_class][g.phase]
            cell[0] += g.flops * g.quantized
            cell[1] += g.flops
        return {cls: {f"{phase}_{key}": value for phase, (q, total) in phases.items()
                      for key, value in (("flops", total), ("share", q / total if total else 1.0))}
                for cls, phases in sorted(flops.items())}

    def full_precision(self) -> list[Gemm]:
        """The GEMMs that ran on a full-precision operand, the largest first."""
        return sorted((g for g in self.gemms if not g.quantized), key=lambda g: -g.flops)

    def to_dict(self) -> dict[str, Any]:
        """Flat figures for metrics.json and loggers."""
        out = {"forward_share": self.share("forward"), "backward_share": self.share("backward"),
               "forward_gflops": sum(g.flops for g in self.gemms if g.phase == "forward") / 1e9,
               "backward_gflops": sum(g.flops for g in self.gemms if g.phase == "backward") / 1e9}
        for cls, figures in self.by_class().items():
            for key, value in figures.items():
                if key.endswith("share"):
                    out[f"{cls}/{key}"] = value
        return out

    def summary(self, rows: int = 10) -> str:
        total = sum(g.flops for g in self.gemms) or 1

        def weight(f: dict[str, float]) -> float:
            return 100 * (f.get("forward_flops", 0) + f.get("backward_flops", 0)) / total

        lines = [f"q8 coverage: {100 * self.share('forward'):.1f}% of forward and "
                 f"{100 * self.share('backward'):.1f}% of backward GEMM FLOPs on quantized "
                 "operands"]
        for cls, f in self.by_class().items():
            lines.append(f"  {cls:<28s} forward {100 * f.get('forward_share', 1):5.1f}% "
                         f"backward {100 * f.get('backward_share', 1):5.1f}% of "
                         f"{weight(f):5.1f}% of the FLOPs")
        worst = self.full_precision()
        if worst:
            lines.append(f"full precision: {len(worst)} GEMMs, the largest:")
            lines += [f"  {g.phase:<8s} {g.op:<40s} {g.module} ({g.module_class}): {g.why()}"
                      for g in worst[:rows]]
        return "\n".join(lines)

    __str__ = summary


class _RecordGemms(TorchDispatchMode):
    """Records every GEMM with the module it ran in: in forward the innermost module running
    (a stack kept by forward hooks); in backward the module whose forward made the autograd
    node being run (each module claims, when its forward ends, the nodes between its inputs and
    its outputs that no inner module claimed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.coverage = Coverage()
        self.stack: list[tuple[str, nn.Module]] = []
        self.claimed: dict[Any, tuple[str, nn.Module]] = {}
        root = type(model).__name__
        self.handles = []
        for name, module in model.named_modules():
            where = (f"{root}.{name}" if name else root, module)
            self.handles += [
                module.register_forward_pre_hook(lambda m, a, where=where: self.enter(where)),
                module.register_forward_hook(lambda m, a, out: self.leave(a, out))]

    def enter(self, where: tuple[str, nn.Module]) -> None:
        self.stack.append(where)

    def leave(self, args: tuple, out: Any) -> None:
        where = self.stack.pop()
        inputs = [t for t in tree_flatten(args)[0] if isinstance(t, Tensor)]
        made_before = {t.grad_fn for t in inputs}  # the graph up to the inputs is not this one's
        nodes = [t.grad_fn for t in tree_flatten(out)[0]
                 if isinstance(t, Tensor) and all(t is not i for i in inputs)]
        seen = set(made_before)
        while nodes:  # through the inner modules' nodes (claimed already) back to the inputs
            node = nodes.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            self.claimed.setdefault(node, where)
            nodes += [n for n, _ in node.next_functions]

    def __exit__(self, *args: Any) -> None:
        for h in self.handles:
            h.remove()
        super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in GEMMS:
            node = torch._C._current_autograd_node()
            if node is None:
                name, module = self.stack[-1] if self.stack else ("(outside the model)", None)
            else:
                name, module = self.claimed.get(node, ("(outside the model)", None))
            bits = {k: grid_bits(t) for k, t in _operands(func, args).items()}
            self.coverage.gemms.append(Gemm(
                str(func._overloadpacket.__name__), name,
                type(module).__name__ if module is not None else "-",
                "forward" if node is None else "backward",
                int(_flops(func, args, kwargs, out)), bits))
        return out


def coverage(model: nn.Module, example_input: Tensor | tuple,
             loss_fn: Callable[[Any], Tensor] | None = None) -> Coverage:
    """Run one training step of `model` on `example_input` (forward, and backward of
    loss_fn(output), by default the sum of the output) and report its GEMMs. The parameters'
    gradients are left as they were; running statistics and ranges are updated as in any step."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    grads = {p: p.grad for p in model.parameters()}
    with _RecordGemms(model) as record:
        out = model(*inputs)
        loss = loss_fn(out) if loss_fn is not None else _total(out)
        loss.backward()
    for p, g in grads.items():
        p.grad = g
    return record.coverage


def _total(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out.float().sum()
    tensors = [t for t in (out.values() if isinstance(out, dict) else out)
               if isinstance(t, Tensor) and t.is_floating_point()]
    return sum(t.float().sum() for t in tensors)
