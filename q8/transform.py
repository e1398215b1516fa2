"""quantize_model: rewrite a model in place so that it trains in 8 bits."""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from q8.config import QuantConfig
from q8.kernels import Kernels
from q8.layers import QuantLayerMixin, QuantMaxPool2d, QuantReLU, twin_class
from q8.norm import QuantNormMixin, RangeNormMixin

log = logging.getLogger("q8")


@dataclass
class QuantReport:
    """What quantize_model replaced, and what it left in full precision and why."""

    config: QuantConfig
    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # name, old, new
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # name, class, reason

    def summary(self) -> str:
        lines = [f"q8 {self.config.short_str()}: replaced {len(self.replaced)} modules"]
        for (old, new), n in sorted(Counter((o, w) for _, o, w in self.replaced).items()):
            lines.append(f"  {n:4d} x {old} -> {new}")
        if self.kept:
            lines.append(f"left in full precision: {len(self.kept)} modules")
            for (cls, why), n in sorted(Counter((c, r) for _, c, r in self.kept).items()):
                lines.append(f"  {n:4d} x {cls}: {why}")
        return "\n".join(lines)

    __str__ = summary


def _twin_mixin(module: nn.Module, cfg: QuantConfig) -> type | None:
    """The mixin that quantizes `module`, or None when q8 has no twin for it."""
    if isinstance(module, (QuantLayerMixin, QuantNormMixin, QuantReLU, QuantMaxPool2d)):
        return None  # already quantized
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return QuantLayerMixin
    if isinstance(module, nn.BatchNorm2d):
        if cfg.bn == "range":
            return RangeNormMixin
        if cfg.act_bits is not None or cfg.grad_bits is not None or cfg.bn_param_bits:
            return QuantNormMixin
    return None


def _swap(module: nn.Module, cfg: QuantConfig, kernels: Kernels) -> str | None:
    """Turn `module` into its quantized twin in place; returns the new class name."""
    if type(module) is nn.ReLU:  # numerically identical; keeps a 1-bit mask for backward
        module.__class__ = QuantReLU
    elif type(module) is nn.MaxPool2d and not module.return_indices:
        module.__class__ = QuantMaxPool2d
    else:
        mixin = _twin_mixin(module, cfg)
        if mixin is None:
            return None
        module.__class__ = twin_class(mixin, type(module))
    module._q8_setup(cfg, kernels)
    return type(module).__name__


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Rewrite `model` in place for 8-bit training as `config` says, and return it.

    Every nn.Conv2d and nn.Linear (subclasses too) becomes its quantized twin, every
    BatchNorm2d (timm's BatchNormAct2d too) Range BN or quantized BN, ReLU and MaxPool2d twins
    that keep 1-bit / 8-bit state for backward. Modules whose name matches a `config.skip`
    pattern stay as they are. The report is `model.q8_report` and is logged.

    Every twin runs on the kernels of `config.backend` (q8.kernels), resolved here: a backend
    named explicitly that cannot run here raises q8.kernels.BackendUnavailable.
    """
    report = QuantReport(config)
    if not config.is_full_precision:
        _convert(model, "", config, Kernels(config.backend), report)
    model.q8_report = report
    log.info("%s", report.summary())
    return model


def _convert(module: nn.Module, name: str, cfg: QuantConfig, kernels: Kernels,
             report: QuantReport) -> None:
    if name and any(fnmatch.fnmatchcase(name, p) for p in cfg.skip):
        report.kept.append((name, type(module).__name__, "skipped by config.skip"))
        return
    if isinstance(module, nn.MultiheadAttention):  # its forward reads out_proj.weight directly
        report.kept.append((name, "MultiheadAttention", "its forward bypasses nn.Linear"))
        return
    old = type(module).__name__
    new = _swap(module, cfg, kernels)
    if new is not None:
        report.replaced.append((name, old, new))
    elif _has_own_params(module):
        report.kept.append((name, old, "no quantized twin in q8"))
    for child_name, child in module.named_children():
        _convert(child, f"{name}.{child_name}" if name else child_name, cfg, kernels, report)
