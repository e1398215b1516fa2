"""quantize_model: rewrite a model in place so that it trains in 8 bits; dequantize_model:
undo it."""

from __future__ import annotations

import copy
import fnmatch
import functools
import logging
import types
from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor, nn

from q8.attention import (
    MultiheadAttentionMixin,
    ProductMixin,
    ProductWeightReaderMixin,
    is_gate,
    multiplies_activations,
    supports_mha,
)
from q8.config import QuantConfig
from q8.kernels import Kernels
from q8.layers import (
    GEMM_MODULES,
    ActRangeMixin,
    QuantActivationMixin,
    QuantLayerMixin,
    QuantMaxPool2d,
    QuantReLU,
    WeightReaderMixin,
    activation_kind,
    reads_child_weights,
    twin_class,
)
from q8.norm import QuantNormMixin, QuantSampleNormMixin, RangeNormMixin, RangeSampleNormMixin

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
        bns = sum(w.startswith("QuantBatchNorm") for _, _, w in self.replaced)
        if bns and self.config.float_bn:
            lines.append(f"the {bns} BatchNorm layers compute in full precision and keep 8-bit "
                         "codes of their normalised input (bn_compute='float'; the paper's Range "
                         "BN on an 8-bit input: bn='range')")
        convs = sum(w.startswith("QuantConv") for _, _, w in self.replaced)
        if convs and self.config.act_ranges == "channel" and self.config.act_bits is not None:
            lines.append(f"the {convs} convolutions quantize their input with one range per "
                         "channel, their forward and weight-gradient GEMMs on the dequantized "
                         "values (act_ranges='channel'; one range per tensor: 'tensor')")
        if self.kept:
            lines.append(f"left in full precision: {len(self.kept)} modules")
            for (cls, why), n in sorted(Counter((c, r) for _, c, r in self.kept).items()):
                lines.append(f"  {n:4d} x {cls}: {why}")
        return "\n".join(lines)

    __str__ = summary


def _twin_mixin(module: nn.Module, cfg: QuantConfig) -> type | None:
    """The mixin that quantizes `module`, or None when q8 has no twin for it."""
    if isinstance(module, nn.MultiheadAttention) and not isinstance(module, ProductMixin):
        return MultiheadAttentionMixin  # quantize_model leaves the unsupported ones alone
    if isinstance(module, (QuantLayerMixin, QuantNormMixin, QuantSampleNormMixin, QuantReLU,
                           QuantMaxPool2d, QuantActivationMixin)):
        return None  # already quantized
    if isinstance(module, GEMM_MODULES):  # conv 1d/2d/3d, transposed too, and linear
        return QuantLayerMixin
    if cfg.act_bits is not None and activation_kind(module) is not None:  # GELU, SiLU...
        return QuantActivationMixin
    quantized = cfg.act_bits is not None or cfg.grad_bits is not None or cfg.bn_param_bits
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
        if cfg.bn == "range":
            return RangeNormMixin
        if quantized:
            return QuantNormMixin
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):  # timm's LayerNorm2d, GroupNormAct...
        if cfg.norm == "range":
            return RangeSampleNormMixin
        if quantized:
            return QuantSampleNormMixin
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
        base = type(module)
        if isinstance(module, nn.SyncBatchNorm):
            # a twin of BatchNorm2d, which q8 synchronises itself: when fit ends, Lightning's
            # sync_batchnorm=True turns every SyncBatchNorm back into a new float BatchNorm
            module.q8_original_class = base  # for dequantize_model
            base = nn.BatchNorm2d
        module.__class__ = twin_class(mixin, base)
    module._q8_setup(cfg, kernels)
    if isinstance(module, RangeNormMixin) and "q8_original_class" in vars(module):
        # SyncBatchNorm asked for the global batch's statistics: Range BN synced in its group
        group = module.process_group
        module.q8_sync = group if group is not None else "world"
    return type(module).__name__


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Rewrite `model` in place for 8-bit training as `config` says, and return it.

    Each module becomes its quantized twin, a subclass of its class that keeps its forward:
    - every convolution (1d, 2d, 3d, transposed too) and nn.Linear, subclasses included: 8-bit
      weights and input, a bifurcated 8/16-bit backward (q8.layers);
    - every BatchNorm1d/2d/3d (timm's BatchNormAct2d too): BN in full precision keeping 8-bit
      codes for backward, or the paper's Range BN / BN on an 8-bit input (`bn_compute`); every
      LayerNorm and GroupNorm (timm's LayerNorm2d, LayerNormAct, GroupNormAct...): quantized,
      or range-normalised with `norm="range"` (q8.norm);
    - ReLU and MaxPool2d keep 1-bit / 8-bit state for backward; GELU, SiLU, Hardswish, Sigmoid,
      Tanh... keep their input as 8-bit codes (q8.layers);
    - a module whose own forward multiplies activations (attention: SDPA, matmul, `@`) becomes
      a Q8 twin running those products in 8 bits (q8.attention); one that hands a twin's weight
      to F.linear / F.conv2d (timm's BEiT, EVA and SwinV2 attention with its qkv) sends that call
      to the twin's 8-bit GEMM.
    A squeeze-excitation gate (x * gate(f(pool(x))), q8.attention.is_gate) becomes a gate twin
    whose product keeps x as 8-bit codes; with `gates="float"`, the default, the branch f that
    computes the gate from pooled features (its convolutions and activations) stays in full
    precision, with "8bit" it is quantized like any other layer.
    Modules whose name matches a `config.skip` pattern, and everything inside them, stay as they
    are. The report is `model.q8_report` and is logged.

    nn.SyncBatchNorm (Lightning's `sync_batchnorm=True` makes every BatchNorm one) stays torch's
    under the default BN, which computes in full precision as torch's does; with the paper's
    Range BN it becomes a RangeBatchNorm2d synchronised across the ranks of its process group
    (q8.norm.set_range_bn_sync); with `bn_compute="8bit"` a
    QuantBatchNorm2d with per-replica statistics, and a warning: q8's quantized BN does not
    synchronise. dequantize_model gives the SyncBatchNorm back.

    Every twin runs on the kernels of `config.backend` (q8.kernels), resolved here: a backend
    named explicitly that cannot run here raises q8.kernels.BackendUnavailable.
    """
    report = QuantReport(config)
    if not config.is_full_precision:
        kernels = Kernels(config.backend)
        whole: set[str] = set()  # modules left as they are, everything inside them too
        _convert(model, "", config, kernels, report, whole)
        for name, module in model.named_modules():
            mixin = _functional_mixin(module, config)
            if mixin is not None and not _inside(name, whole):
                old = type(module).__name__
                module.__class__ = twin_class(mixin, type(module))
                module._q8_setup(config, kernels)
                report.replaced.append((name, old, type(module).__name__))
                report.kept = [k for k in report.kept if k[0] != name]
    modules = dict(model.named_modules())
    unsynced = [name for name, _, _ in report.replaced
                if "q8_original_class" in vars(modules[name])
                and not isinstance(modules[name], RangeNormMixin)]
    if unsynced:
        log.warning("q8: %d SyncBatchNorm layers became quantized BN with per-replica statistics "
                    "(%s): q8's quantized BN does not synchronise across ranks; bn='range' does",
                    len(unsynced), ", ".join(unsynced[:3]) + (", ..." if len(unsynced) > 3 else ""))
    model.q8_report = report
    log.info("%s", report.summary())
    return model


def _functional_mixin(module: nn.Module, cfg: QuantConfig) -> type | None:
    """The mixin of a module whose own forward runs GEMMs outside nn.Conv2d / nn.Linear: it
    hands a twin's weight to F.linear (timm's BEiT/EVA qkv), or multiplies activations
    (attention); None for any other module."""
    if isinstance(module, _TWIN_TYPES):
        return None
    reads = reads_child_weights(module)
    products = (cfg.act_bits is not None or cfg.grad_bits is not None) and (
        multiplies_activations(module))
    if reads and products:
        return ProductWeightReaderMixin
    return ProductMixin if products else WeightReaderMixin if reads else None


def _inside(name: str, whole: set[str]) -> bool:
    """Whether `name` is one of the modules in `whole` or inside one."""
    return any(name == w or name.startswith(w + ".") for w in whole)


GATE_BRANCH = "squeeze-excitation branch, in full precision (gates='float')"


def _keep_whole(name: str, module: nn.Module, why: str, report: QuantReport,
                whole: set[str]) -> None:
    report.kept.append((name, type(module).__name__, why))
    whole.add(name)


def _convert(module: nn.Module, name: str, cfg: QuantConfig, kernels: Kernels,
             report: QuantReport, whole: set[str]) -> None:
    if name and any(fnmatch.fnmatchcase(name, p) for p in cfg.skip):
        _keep_whole(name, module, "skipped by config.skip", report, whole)
        return
    if cfg.gates == "float" and is_gate(module):
        # the branch that computes the gate from pooled features stays as it is; x * gate
        # becomes a gate twin below (quantize_model), which keeps x as 8-bit codes
        for child_name, child in module.named_children():
            _keep_whole(f"{name}.{child_name}" if name else child_name, child, GATE_BRANCH,
                        report, whole)
        return
    if isinstance(module, nn.MultiheadAttention) and not supports_mha(module):
        report.kept.append((name, "MultiheadAttention", "add_bias_kv or add_zero_attn: no twin"))
        return
    if isinstance(module, nn.SyncBatchNorm) and cfg.float_bn:
        report.kept.append((name, "SyncBatchNorm", "synchronised by torch, in full precision "
                            "(bn_compute='float'; its input is kept in fp32)"))
        return
    old = type(module).__name__
    new = _swap(module, cfg, kernels)
    if new is not None:
        report.replaced.append((name, old, new))
    elif _has_own_params(module):
        report.kept.append((name, old, "no quantized twin in q8"))
    for child_name, child in module.named_children():
        _convert(child, f"{name}.{child_name}" if name else child_name, cfg, kernels, report,
                 whole)


# ---- back to float ------------------------------------------------------------------------

_TWIN_TYPES = (ActRangeMixin, QuantReLU, QuantMaxPool2d, WeightReaderMixin,  # every twin
               ProductMixin, QuantActivationMixin)
_Q8_BUFFERS = ("act_range", "act_range_steps")  # ActRangeMixin's


def dequantize_model(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Undo quantize_model, and return the float model: every q8 twin becomes its original
    class again and loses q8's buffers (the running input ranges); q8's attributes and hooks
    go from every module. It pickles and loads where q8 is not installed. `inplace=False`:
    a copy sharing `model`'s parameters and buffers (no memory), `model` left quantized."""
    if not inplace:
        model = _shared_copy(model)
    for module in model.modules():
        twin = isinstance(module, _TWIN_TYPES)
        original = vars(module).get("q8_original_class") or type(module)
        for name in [k for k, v in vars(module).items() if _is_q8_attribute(twin, k, v)]:
            del module.__dict__[name]
        if twin:
            for name in _Q8_BUFFERS:
                module._buffers.pop(name, None)
                module._non_persistent_buffers_set.discard(name)
            module.__class__ = _float_class(original)
        _drop_q8_hooks(module)
    return model


def holds_q8_state(model: nn.Module) -> bool:
    """Whether any module of `model` is a q8 twin or holds q8's attributes or hooks (what
    dequantize_model removes)."""
    return any(isinstance(m, _TWIN_TYPES) or _q8_hooks(m)
               or any(_is_q8_attribute(False, k, v) for k, v in vars(m).items())
               for m in model.modules())


def _shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that shares its tensors, and the q8 objects that
    dequantize_model drops (a twin's kernels, a process group)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        twin = isinstance(m, _TWIN_TYPES)
        for t in [*m._parameters.values(), *m._buffers.values()]:
            memo[id(t)] = t
        for k, v in vars(m).items():
            if isinstance(v, Tensor) or _is_q8_attribute(twin, k, v):
                memo[id(v)] = v
    return copy.deepcopy(model, memo)


def _float_class(twin: type) -> type:
    """The class a twin was made from: the first of its bases that is not q8's (a subclass of
    a twin, e.g. QuantConv2d, or one of q8's mixins)."""
    return next(c for c in twin.__mro__ if not issubclass(c, _TWIN_TYPES) and not _from_q8(c))


def _from_q8(obj: object) -> bool:
    """Whether obj is a class or function of q8's code, or an instance of one (unwrapping
    partials, bound methods and torch's hook wrappers)."""
    while True:
        if isinstance(obj, functools.partial):
            obj = obj.func
        elif isinstance(obj, types.MethodType):
            obj = obj.__func__
        elif callable(getattr(obj, "hook", None)) and type(obj).__module__.startswith("torch"):
            obj = obj.hook  # torch.nn.Module's _WrappedHook of a state-dict hook
        else:
            break
    owner = obj if isinstance(obj, (type, types.FunctionType)) else type(obj)
    name = getattr(owner, "__module__", None) or ""
    return name == "q8" or name.startswith("q8.")


def _is_q8_attribute(twin: bool, name: str, value: object) -> bool:
    """q8's attributes: named q8_* (quantize_model's report, a twin's config...) and, on a
    twin, any value of q8's code (its kernels, its specs). Another module keeps the q8 objects
    its own code holds."""
    return name.startswith(("q8_", "_q8_")) or (twin and _from_q8(value))


def _q8_hooks(module: nn.Module) -> dict[str, list[int]]:
    """The handles of q8's hooks on `module`, per hook dict (`_forward_hooks`, ...)."""
    found: dict[str, list[int]] = {}
    for name, hooks in vars(module).items():
        if name.endswith("hooks") and isinstance(hooks, dict):
            ids = [k for k, hook in hooks.items() if _from_q8(hook)]
            if ids:
                found[name] = ids
    return found


def _drop_q8_hooks(module: nn.Module) -> None:
    dropped = {k for ids in _q8_hooks(module).values() for k in ids}
    if dropped:  # from the hook dicts and their flag dicts (_forward_hooks_with_kwargs, ...)
        for name, value in vars(module).items():
            if "hooks" in name and isinstance(value, dict):
                for k in dropped & value.keys():
                    del value[k]
