"""Where a quantized model first went non-finite: `check_finite(model)` names the layer.

No layer pays a host sync for it. Each twin keeps a running range of its input (`act_range`,
an EMA of the batches' [min, max]): once one batch's range is NaN or inf, so is the running
range, for good. A NaN or inf in forward reaches every layer after the one that made it, so the
first twin in model order whose running range is non-finite is the first that received one.
Backward runs the other way: the last module in model order whose weight gradient is non-finite
is where backward first made one. One call reads every flag in one transfer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NonFiniteError(FloatingPointError):
    """A NaN or inf in a quantized model; the message names the first layer and tensor."""


def find_non_finite(model: nn.Module) -> str | None:
    """'<layer> (<class>): <what>' for where `model` first went non-finite, else None: the first
    twin whose input range is non-finite (forward), else the last module whose parameters'
    gradient is (backward), else the first whose parameters are (an optimizer step)."""
    ranges = [(n, m) for n, m in model.named_modules()
              if isinstance(getattr(m, "act_range", None), Tensor)]
    params = [(n, m, p) for n, m in model.named_modules()
              for p in m.parameters(recurse=False)]
    grads = [(n, m, p.grad) for n, m, p in params if p.grad is not None]
    flags = [~torch.isfinite(m.act_range).all() for _, m in ranges]
    flags += [~torch.isfinite(g).all() for _, _, g in grads]
    flags += [~torch.isfinite(p).all() for _, _, p in params]
    if not flags:
        return None
    bad = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # one transfer
    bad_ranges, rest = bad[: len(ranges)], bad[len(ranges) :]
    bad_grads, bad_params = rest[: len(grads)], rest[len(grads) :]
    for (name, m), b in zip(ranges, bad_ranges):
        if b:
            lo, hi = m.act_range.reshape(2, -1)  # the widest, of a range per channel
            return (f"{_where(name, m)}: its input range [{lo.min().item()}, "
                    f"{hi.max().item()}] in forward")
    for (name, m, _), b in reversed(list(zip(grads, bad_grads))):
        if b:
            return f"{_where(name, m)}: its weight gradient, in backward"
    for (name, m, _), b in zip(params, bad_params):
        if b:
            return f"{_where(name, m)}: its parameters"
    return None


def check_finite(model: nn.Module) -> None:
    """Raise NonFiniteError naming where `model` first went non-finite (find_non_finite);
    return quietly while everything is finite. Call it after a step, or when the loss is NaN."""
    where = find_non_finite(model)
    if where is not None:
        raise NonFiniteError(f"q8: non-finite values first at {where}")


def _where(name: str, module: nn.Module) -> str:
    return f"{name or '(the model)'} ({type(module).__name__})"
