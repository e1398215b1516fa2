"""Build timm backbones for the training application."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch.nn as nn

from q8.lit.errors import UsageError


def check_model_name(name: str) -> None:
    """Raise UsageError, with the closest timm names, if timm has no model called `name`."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise UsageError(f"model.name={name!r} is not a timm model{hint}")


def use_small_input_stem(model: nn.Module) -> nn.Module:
    """Replace a ResNet stem by a 3x3 stride-1 conv without max-pool (CIFAR-style ResNets).

    Keeps 32x32 inputs at full resolution into the first stage instead of 8x8.
    """
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UsageError(
            f"model.small_input=true needs a ResNet-style stem (a Conv2d `conv1` and a "
            f"`maxpool`); {type(model).__name__} has none: set model.small_input=false"
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    small_input: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A randomly initialised timm model; `kwargs` go to timm.create_model (e.g. zero_init_last)."""
    check_model_name(name)
    kwargs = dict(kwargs or {})
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except TypeError as ex:
        raise UsageError(f"timm model {name!r} rejects model.kwargs={kwargs}: {ex}") from ex
    if small_input:
        use_small_input_stem(model)
    return model
