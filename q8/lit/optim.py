"""The paper's learning-rate schedules: linear warm-up, then cosine or step decay, per step.

Banner et al. (2018) train ResNets with SGD (momentum 0.9, weight decay 1e-4), lr 0.1 per 256
images with a 5-epoch warm-up, divided by 10 at epochs 30, 60 and 80 of 90. conf/scheduler/
names one factory below with `_partial_: true`; the module calls it with the optimizer and the
run's step counts, which only the Trainer knows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(
    step: int,
    total_steps: int,
    steps_per_epoch: float,
    name: str = "cosine",
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.1,
    milestones: Iterable[float] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base lr at optimizer step `step` of schedule `name` (cosine, step or
    constant) after the warm-up (epochs may be fractional)."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    if name == "constant":
        return 1.0
    if name == "step":
        epoch = step / steps_per_epoch
        return gamma ** sum(epoch >= m for m in milestones)
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: float,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.1,
    min_factor: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from warmup_start * lr, then cosine decay to min_factor * lr at the last
    step; call scheduler.step() every step."""
    return LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, steps_per_epoch, "cosine", warmup_epochs, warmup_start,
        min_factor=min_factor))


def warmup_step(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: float,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.1,
) -> LambdaLR:
    """Linear warm-up, then lr x gamma at each epoch of `milestones`; call scheduler.step()
    every step."""
    return LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, steps_per_epoch, "step", warmup_epochs, warmup_start, milestones,
        gamma))


def warmup_constant(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: float,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.1,
) -> LambdaLR:
    """Linear warm-up (none by default), then the base lr; call scheduler.step() every step."""
    return LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps, steps_per_epoch, "constant", warmup_epochs, warmup_start))
