"""Stop (or skip the step) on a non-finite loss or gradient, naming where it first appeared."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)
ACTIONS = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training met a NaN or inf; the message names the first layer and tensor."""


def first_non_finite(model: nn.Module, what: str) -> str | None:
    """'<layer>.<param>: <tensor>' for the first parameter (in model order) whose weights
    (`what="weights"`) or weight gradient (`what="g_W"`) hold a NaN or inf, else None."""
    for name, p in model.named_parameters():
        t = p if what == "weights" else p.grad
        if t is not None and not torch.isfinite(t).all():
            return f"{name}: {'weights' if what == 'weights' else 'g_W (its gradient)'}"
    return None


def first_non_finite_activation(model: nn.Module, batch_input: torch.Tensor) -> str | None:
    """Re-run the forward with hooks: the first leaf module whose input (activations) or output
    is non-finite. Only called after a failure, so normal steps pay nothing."""
    found: list[str] = []

    def hook(name: str):  # noqa: ANN202
        def check(module: nn.Module, inputs: tuple, output: Any) -> None:
            if found:
                return
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if x is not None and not torch.isfinite(x).all():
                found.append(f"{name}: activations (its input)")
            elif isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                found.append(f"{name}: its output")

        return check

    leaves = [(n, m) for n, m in model.named_modules() if not any(m.children())]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            model(batch_input)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class NanGuard(L.Callback):
    """After each backward: if the loss or any gradient is not finite, `stop` training with a
    message naming the first layer and tensor, or `skip` the optimizer step (and log it)."""

    def __init__(self, action: str = "stop") -> None:
        if action not in ACTIONS:
            raise ValueError(f"NanGuard action={action!r} is invalid: valid choices are "
                             f"{', '.join(ACTIONS)}")
        self.action = action
        self.skipped = 0
        self._loss: torch.Tensor | None = None
        self._input: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._input = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._input = batch[0] if isinstance(batch, (list, tuple)) else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # one device-to-host sync per step, not one per parameter: amax propagates NaN and inf
        if not grads or torch.isfinite(torch.stack([g.abs().amax() for g in grads])).all():
            return
        # the likeliest root cause first: a weight, then the forward, then the backward
        where = first_non_finite(pl_module, "weights")
        if where is None and self._input is not None:
            where = first_non_finite_activation(pl_module, self._input)
        where = where or first_non_finite(pl_module, "g_W") or "the loss"
        step = trainer.global_step
        if self.action == "skip":
            optimizer.zero_grad(set_to_none=True)  # params without .grad are left untouched
            self.skipped += 1
            log.warning("non-finite gradient at step %d (first at %s): step skipped", step, where)
            pl_module.log("train/skipped_steps", float(self.skipped))
            return
        raise NonFiniteError(
            f"non-finite value at step {step}, first at {where}; lower the learning rate, "
            "raise quant.grad_bits, or set callbacks.nan_guard.action=skip"
        )
