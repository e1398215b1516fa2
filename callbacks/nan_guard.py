"""Stop (or skip the step) on a non-finite loss or gradient, naming where it first appeared."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import nn

from q8.lit.errors import NonFiniteError

log = logging.getLogger(__name__)
ACTIONS = ("stop", "skip")
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def first_non_finite(model: nn.Module, what: str) -> str | None:
    """'<layer>.<param>: <tensor>' for the first parameter (in model order) whose weights
    (`what="weights"`) or weight gradient (`what="g_W"`) hold a NaN or inf, else None."""
    for name, p in model.named_parameters():
        t = p if what == "weights" else p.grad
        if t is not None and not torch.isfinite(t).all():
            return f"{name}: {'weights' if what == 'weights' else 'g_W (its gradient)'}"
    return None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not any(m.children())]


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

    handles = [m.register_forward_hook(hook(n)) for n, m in _leaves(model)]
    try:
        with torch.no_grad():
            model(batch_input)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def first_non_finite_g_l(
    model: nn.Module, batch_input: torch.Tensor, target: Any = None, loss_fn: LossFn | None = None
) -> str | None:
    """Re-run forward and backward with tensor hooks: in backward order, the first leaf module
    whose layer gradient is non-finite, either g_l = dL/dy arriving at its output or the g_l it
    passes back, dL/dx (then its own backward made it). `loss_fn(output, target)` gives the loss
    (default: the output's sum); "the loss" if the loss itself is non-finite."""
    found: list[str] = []

    def watch(t: torch.Tensor, where: str) -> None:
        def check(g: torch.Tensor) -> None:
            if not found and not torch.isfinite(g).all():
                found.append(where)

        t.register_hook(check)

    def before(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not (args and isinstance(args[0], torch.Tensor) and args[0].requires_grad):
                return None
            # a copy of the input that only this module reads: its gradient is this module's dL/dx
            x = args[0].clone()
            watch(x, f"{name}: g_l it passes back (dL/dx), made non-finite by its backward")
            return (x, *args[1:])

        return hook

    def after(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                watch(output, f"{name}: g_l (dL/dy at its output)")

        return hook

    handles = []
    for name, m in _leaves(model):
        handles += [m.register_forward_pre_hook(before(name)), m.register_forward_hook(after(name))]
    try:
        with torch.enable_grad():
            x = batch_input.detach().requires_grad_(True)
            out = model(x)
            loss = loss_fn(out, target) if loss_fn is not None else out.float().sum()
            if not torch.isfinite(loss).all():
                return "the loss"
            torch.autograd.grad(loss, x, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


@contextlib.contextmanager
def replaying(model: nn.Module, rng_state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Re-run a step as it ran: the RNG as at its start (stochastic rounding draws the same
    noise), then the RNG and the buffers (BN statistics, activation ranges) as they were."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = rng_state.get("cuda_device") if rng_state else None
    with torch.random.fork_rng(devices=[] if cuda is None else [int(cuda)]):
        if rng_state:
            torch.set_rng_state(rng_state["cpu"])
            if cuda is not None:
                torch.cuda.set_rng_state(rng_state["cuda"], int(cuda))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


class NanGuard(L.Callback):
    """After each backward: if the loss or any gradient is not finite, `stop` training with a
    message naming the first layer and tensor (weights, activations, g_l, g_W), or `skip` the
    optimizer step (and log it). The module's `loss(output, target)` method, if it has one,
    gives the loss of the backward re-run that looks for g_l."""

    def __init__(self, action: str = "stop") -> None:
        if action not in ACTIONS:
            raise ValueError(f"NanGuard action={action!r} is invalid: valid choices are "
                             f"{', '.join(ACTIONS)}")
        self.action = action
        self.skipped = 0
        self._batch: tuple[torch.Tensor, Any] | None = None
        self._rng: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch = self._rng = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not (isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor)):
            self._batch = self._rng = None
            return
        x = batch[0]
        self._batch = (x, batch[1] if len(batch) > 1 else None)
        # the state the step's stochastic rounding starts from, to replay it on a failure
        self._rng = {"cpu": torch.get_rng_state()}
        if x.is_cuda:
            self._rng.update(cuda=torch.cuda.get_rng_state(x.device), cuda_device=x.device.index)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # one device-to-host sync per step, not one per parameter: amax propagates NaN and inf
        if not grads or torch.isfinite(torch.stack([g.abs().amax() for g in grads])).all():
            return
        where = self.locate(pl_module)
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

    def locate(self, pl_module: L.LightningModule) -> str:
        """Where the failing step first went non-finite: the likeliest root cause first, a
        weight, then the forward (activations), then the backward (g_l), then g_W."""
        where = first_non_finite(pl_module, "weights")
        if where is None and self._batch is not None:
            x, target = self._batch
            loss_fn = getattr(pl_module, "loss", None)
            with replaying(pl_module, self._rng):
                where = first_non_finite_activation(pl_module, x)
            if where is None:
                with replaying(pl_module, self._rng):
                    where = first_non_finite_g_l(
                        pl_module, x, target, loss_fn if callable(loss_fn) else None
                    )
        return where or first_non_finite(pl_module, "g_W") or "the loss"
