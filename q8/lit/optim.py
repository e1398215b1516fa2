"""The paper's optimisation recipe: SGD with momentum, linear warm-up, then cosine or step decay.

Banner et al. (2018) train ResNets with SGD (momentum 0.9, weight decay 1e-4), lr 0.1 per 256
images with a 5-epoch warm-up, divided by 10 at epochs 30, 60 and 80 of 90.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from q8.lit.errors import UsageError

SCHEDULES = ("cosine", "step", "constant")


def create_optimizer(
    params: Iterable[Any], name: str = "sgd", **kwargs: Any
) -> torch.optim.Optimizer:
    """`name` is sgd, adamw or adam; kwargs (lr, momentum, weight_decay, ...) go to torch.optim."""
    classes = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    if name not in classes:
        raise UsageError(
            f"optimizer.name={name!r} is invalid: valid choices are {', '.join(classes)}"
        )
    try:
        return classes[name](params, **kwargs)
    except (TypeError, ValueError) as ex:
        raise UsageError(f"optimizer {name!r} rejects its settings {kwargs}: {ex}") from ex


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
    """Multiplier of the base lr at optimizer step `step` (epochs may be fractional)."""
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


def create_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: float, **settings: Any
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following lr_factor(settings); call scheduler.step() every step."""
    name = settings.get("name", "cosine")
    if name not in SCHEDULES:
        raise UsageError(
            f"scheduler.name={name!r} is invalid: valid choices are {', '.join(SCHEDULES)}"
        )
    try:
        lr_factor(0, total_steps, steps_per_epoch, **settings)
    except TypeError as ex:
        raise UsageError(f"scheduler settings {settings} are invalid: {ex}") from ex
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, **settings)
    )
