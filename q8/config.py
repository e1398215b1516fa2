"""QuantConfig: which tensors are quantized, to how many bits, and how (Banner et al. 2018)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from q8.gemm import MODES as GEMM_MODES
from q8.kernels import BACKENDS

ROUNDINGS = ("stochastic", "nearest")
BN_TYPES = ("batchnorm", "range")
BN_COMPUTES = ("float", "8bit")
GATE_MODES = ("float", "8bit")
ACT_RANGES = ("channel", "tensor")
NORM_TYPES = ("standard", "range")
RANGE_BN_SCALES = ("exact", "paper", "hoffer2018")
MIN_BITS, MAX_BITS = 2, 16


def check_bits(name: str, value: Any, optional: bool = True) -> None:
    """Raise ValueError naming `name` unless value is an integer in MIN_BITS..MAX_BITS (or None
    where `optional`: that tensor stays in full precision)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        none = ", or None to keep that tensor in full precision" if optional else ""
        raise ValueError(
            f"{name}={value!r} is invalid: bits must be an integer in {MIN_BITS}..{MAX_BITS}{none}"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"QuantConfig.{name}={value!r} is invalid: valid choices are {', '.join(choices)}"
        )


@dataclass(frozen=True)
class QuantConfig:
    """What q8 quantizes. Any `*_bits` set to None leaves that tensor in full precision.

    The defaults: 8-bit weights and activations at every GEMM, an 8-bit layer gradient g_l
    and a 16-bit copy of it for the weight gradient (bifurcation), stochastic gradient
    rounding; BatchNorm computes in full precision on the conv's output and keeps its
    normalised input as 8-bit codes for backward (`bn_compute="float"`, docs/MOBILE_NETS.md:
    depthwise and mobile nets do not train with an 8-bit grid ahead of BN's per-channel
    division); the branch of a squeeze-excitation gate stays in full precision
    (`gates="float"`: MobileNetV3 trains closer to fp32 with it, docs/MOBILE_NETS.md); a
    convolution's input is quantized with one range per channel (`act_ranges="channel"`:
    EfficientNet-B0 trains closer to fp32 with it, docs/MOBILE_NETS.md). The paper's exact
    setting, Range BN on an 8-bit input with an 8-bit output gradient, one range per tensor and
    every layer in 8 bits, is conf/quant/q8_paper.yaml. LayerNorm and GroupNorm (`norm`) stay
    standard by default, quantized in and out (`bn_param_bits` covers their gamma/beta too);
    `norm="range"` normalises them by the scaled range of each token / group instead.
    """

    weight_bits: int | None = 8  # W of every conv/linear, nearest rounding
    act_bits: int | None = 8  # inputs of every conv/linear/BN, nearest rounding
    grad_bits: int | None = 8  # g_l used for dL/dx (the data path)
    wgrad_bits: int | None = 16  # copy of g_l used for dL/dW; None = fp32 copy
    grad_rounding: str = "stochastic"  # rounding of g_l (both copies)
    bn: str = "batchnorm"  # "batchnorm" (standard BN) or "range" (Range BN)
    # standard BN: "float": statistics and backward on the full-precision input and g_l, the
    # normalised input saved as 8-bit codes; "8bit": on the 8-bit input and g_l, as the paper.
    # Range BN always computes on the 8-bit input and g_l (it is the paper's BN for that).
    bn_compute: str = "float"
    # bits of the codes that BN in full precision keeps of x_tilde for backward; None: act_bits
    bn_save_bits: int | None = None
    norm: str = "standard"  # LayerNorm/GroupNorm: "standard" (quantized in/out) or "range"
    # squeeze-excitation gates, x * gate(f(pool(x))) (q8.attention.is_gate): "float" keeps the
    # branch f on the pooled features (convs, activations) in full precision, about 0.6% of
    # EfficientNet-B0's GEMM FLOPs; "8bit" quantizes it like every other layer. Either way the
    # product keeps x as 8-bit codes for backward.
    gates: str = "float"
    per_channel_weights: bool = False  # one range per output channel instead of per tensor
    # the input of a convolution: "channel", one [min, max] per input channel (a scale that
    # varies along the GEMM's sum: those GEMMs run on the dequantized values, q8.gemm);
    # "tensor", one per tensor (the paper). Linear layers and norms take one per tensor.
    act_ranges: str = "channel"
    act_momentum: float = 0.1  # EMA momentum of the activations' running range (used in eval)
    bn_param_bits: int | None = None  # quantize BN gamma/beta too (None: fp32, as the paper)
    range_bn_chunks: int = 16  # Range BN: mean range over this many chunks of the batch
    range_bn_scale: str = "exact"  # "exact": d2(n); "paper": 1/sqrt(2 ln n); "hoffer2018"
    skip: tuple[str, ...] = field(default_factory=tuple)  # fnmatch patterns of module names
    backend: str = "auto"  # kernels (q8.kernels): auto | reference | cpu | cuda
    gemm: str = "dequantized"  # GEMMs (q8.gemm): on dequantized fp32 values, codes in bf16, int8

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "grad_bits", "wgrad_bits", "bn_param_bits",
                     "bn_save_bits"):
            check_bits(f"QuantConfig.{name}", getattr(self, name))
        _check_choice("grad_rounding", self.grad_rounding, ROUNDINGS)
        _check_choice("bn", self.bn, BN_TYPES)
        _check_choice("bn_compute", self.bn_compute, BN_COMPUTES)
        _check_choice("norm", self.norm, NORM_TYPES)
        _check_choice("gates", self.gates, GATE_MODES)
        _check_choice("act_ranges", self.act_ranges, ACT_RANGES)
        _check_choice("range_bn_scale", self.range_bn_scale, RANGE_BN_SCALES)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("gemm", self.gemm, GEMM_MODES)
        if self.wgrad_bits is not None and (
            self.grad_bits is None or self.wgrad_bits < self.grad_bits
        ):
            raise ValueError(
                f"QuantConfig.wgrad_bits={self.wgrad_bits!r} is inconsistent with "
                f"grad_bits={self.grad_bits!r}: the weight-gradient copy of g_l must be at least "
                "as precise as the data-path copy (wgrad_bits >= grad_bits, or None for fp32)"
            )
        if isinstance(self.act_momentum, bool) or not (
            isinstance(self.act_momentum, (int, float)) and 0.0 < self.act_momentum <= 1.0
        ):
            raise ValueError(
                f"QuantConfig.act_momentum={self.act_momentum!r} is invalid: it must be a "
                "number in (0, 1]"
            )
        if isinstance(self.range_bn_chunks, bool) or not (
            isinstance(self.range_bn_chunks, int) and self.range_bn_chunks >= 1
        ):
            raise ValueError(
                f"QuantConfig.range_bn_chunks={self.range_bn_chunks!r} is invalid: it must be "
                "an integer >= 1"
            )
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(
                f"QuantConfig.skip={self.skip!r} is invalid: it must be a list of module-name "
                "patterns (fnmatch), e.g. ['conv1', 'fc']"
            )
        object.__setattr__(self, "skip", tuple(self.skip))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Build from a plain mapping (e.g. a Hydra node); unknown keys raise ValueError."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"QuantConfig has no field {', '.join(map(repr, unknown))}: valid fields are "
                f"{', '.join(sorted(known))}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (`skip` a list): JSON, YAML and from_dict take it."""
        return {**asdict(self), "skip": list(self.skip)}

    @property
    def is_full_precision(self) -> bool:
        """True when nothing is quantized and every norm stays standard: quantize_model is a
        no-op."""
        bits = (self.weight_bits, self.act_bits, self.grad_bits, self.wgrad_bits)
        return all(b is None for b in bits) and self.bn == "batchnorm" and self.norm == "standard"

    @property
    def float_bn(self) -> bool:
        """Standard BN computing in full precision (bn_compute="float"), 8-bit codes saved."""
        return self.bn == "batchnorm" and self.bn_compute == "float"

    @property
    def bifurcated(self) -> bool:
        """g_W is computed from a different copy of g_l than dL/dx (the paper's bifurcation)."""
        return self.wgrad_bits != self.grad_bits

    def short_str(self) -> str:
        """A compact label, e.g. 'w8a8g8/16-sr-batchnorm32' or 'w8a8g8/16-sr-rangebn' (the BN,
        with 32 when it computes in full precision, then s<bits> for bn_save_bits; '-rangenorm'
        added for norm="range", '-gates8' for gates="8bit", '-acttensor' for
        act_ranges="tensor")."""
        def b(v: int | None) -> str:
            return "32" if v is None else str(v)

        g = b(self.grad_bits) + ("/" + b(self.wgrad_bits) if self.bifurcated else "")
        r = "sr" if self.grad_rounding == "stochastic" else "rn"
        norm = "-rangenorm" if self.norm == "range" else ""
        bn = "batchnorm32" if self.float_bn else f"{self.bn}bn"
        if self.float_bn and self.bn_save_bits is not None:
            bn += f"s{self.bn_save_bits}"  # the bits of its saved codes
        gates = "-gates8" if self.gates == "8bit" else ""
        ranges = "-acttensor" if self.act_ranges == "tensor" and self.act_bits else ""
        return f"w{b(self.weight_bits)}a{b(self.act_bits)}g{g}-{r}-{bn}{norm}{gates}{ranges}"
