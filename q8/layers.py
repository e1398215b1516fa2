"""Quantized twins of nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.Linear, nn.ReLU,
nn.MaxPool2d and the elementwise activations (GELU, SiLU, Hardswish, Sigmoid, ...).

A twin subclasses the module it replaces (so `state_dict` keys and isinstance checks hold) and
keeps that module's own forward: it only reroutes the F.conv* / F.linear call inside it to the
bifurcated autograd function. So timm's Conv2dSame (dynamic padding), StdConv2d (weight
standardisation) and its own Linear keep their behaviour, quantized around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from q8.config import QuantConfig
from q8.functional import (
    ActivationFn,
    BifurcatedLayerFn,
    GradSpec,
    LayerSpec,
    MaxPool2dFn,
    ReLUFn,
)
from q8.kernels import Kernels
from q8.kernels.reference import minmax


class ActRangeMixin:
    """Running range (EMA of the batch min/max) of a layer's input, used in eval.

    Buffers `act_range` = [lo, hi] (shape (2,), or (2, C) with one range per input channel:
    `q8_act_channels`) and `act_range_steps` go into the state dict; a state dict without them
    (e.g. an fp32 checkpoint) still loads: the range is then learnt afresh. A range of the other
    shape loads too, spread over the channels or merged into one.
    Twins built directly take the original's arguments plus `q8_config`; `q8_kernels` is the
    backend they run on (q8.kernels.Kernels of the config's backend).
    """

    q8_act_channels: int | None = None  # a range per input channel (dim 1) when set

    def __init__(self, *args, q8_config: QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = q8_config or QuantConfig()
        self._q8_setup(config, Kernels(config.backend))

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        self._q8_init_range(config, kernels)

    def _q8_init_range(self, config: QuantConfig, kernels: Kernels) -> None:
        self.q8_config, self.q8_kernels = config, kernels
        w = next(iter(self._parameters.values()), None)
        device = w.device if w is not None else None
        shape = (2,) if self.q8_act_channels is None else (2, self.q8_act_channels)
        self.register_buffer("act_range", torch.zeros(shape, device=device))
        self.register_buffer("act_range_steps", torch.zeros((), dtype=torch.long, device=device))

    def _q8_input_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The [lo, hi] to quantize x with: the batch's in training, the running one in eval;
        0-d, or shaped (1, C, 1, ...) to broadcast against x with a range per channel. An empty
        batch leaves the running range as it is."""
        per_channel = self.q8_act_channels is not None
        with torch.no_grad():
            if x.numel() == 0:
                batch = torch.zeros_like(self.act_range)
            else:
                lo, hi = minmax(x.detach(), 1 if per_channel else None)
                batch = torch.stack([lo, hi]).float().reshape(self.act_range.shape)
            seen = self.act_range_steps > 0
            if self.training and x.numel() > 0:
                m = self.q8_config.act_momentum
                self.act_range.copy_(torch.where(seen, (1 - m) * self.act_range + m * batch, batch))
                self.act_range_steps += 1
                r = batch
            else:
                r = torch.where(seen, self.act_range, batch)
        if per_channel:
            shape = (1, -1, *[1] * (x.dim() - 2))
            return r[0].view(shape), r[1].view(shape)
        return r[0], r[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        for key in ("act_range", "act_range_steps"):
            state_dict.setdefault(prefix + key, getattr(self, key))
        r = state_dict[prefix + "act_range"]
        if r.shape != self.act_range.shape:  # saved with the other act_ranges
            state_dict[prefix + "act_range"] = (
                torch.stack([r[0].min(), r[1].max()]) if self.q8_act_channels is None
                else r.reshape(2, 1).expand(self.act_range.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def explicit_padding(x: Tensor, padding: int | tuple | str, dilation: tuple,
                     kernel_size: tuple) -> tuple[Tensor, int | tuple]:
    """A conv's padding as integers: "valid" is none, "same" pads x itself (as F.conv2d does,
    the odd pixel at the end); integer padding is returned as it is."""
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        x = F.pad(x, [p for t in reversed(total) for p in (t // 2, t - t // 2)])
    return x, ((0,) * len(kernel_size) if isinstance(padding, str) else padding)


def _ntuple(v: int | tuple, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _pair(v: int | tuple) -> tuple:
    return _ntuple(v, 2)


_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                "dilation")
# F.* GEMM: (the twin's method that runs it quantized, with the same arguments; their names)
_ROUTES = {
    F.linear: ("_q8_linear", _LINEAR_ARGS),
    F.conv1d: ("_q8_conv1d", _CONV_ARGS),
    F.conv2d: ("_q8_conv2d", _CONV_ARGS),
    F.conv3d: ("_q8_conv3d", _CONV_ARGS),
    F.conv_transpose1d: ("_q8_conv_transpose1d", _CONV_T_ARGS),
    F.conv_transpose2d: ("_q8_conv_transpose2d", _CONV_T_ARGS),
    F.conv_transpose3d: ("_q8_conv_transpose3d", _CONV_T_ARGS),
}


class _Reroute(TorchFunctionMode):
    """Inside a twin's forward, send F.conv* / F.linear to the quantized layer function."""

    def __init__(self, layer: QuantLayerMixin) -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            return getattr(self.layer, route[0])(*args, **kwargs)
        return func(*args, **kwargs)


def float32_under_autocast(forward: Callable) -> Callable:
    """A q8 layer quantizes and multiplies in float32 (its GEMM mode chooses its operands'
    types): under autocast it runs with autocast off, on its input widened to float32 (exact
    from bf16 or fp16). Autocast would run its GEMMs in bf16 on the dequantized values."""

    @functools.wraps(forward)
    def run(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
        if not (isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type)):
            return forward(self, x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, x.float() if x.is_floating_point() else x, *args, **kwargs)

    return run


_IN_Q8_GEMM = [0]  # q8 GEMM calls running: inside one, a weight-reading module routes nothing


@contextlib.contextmanager
def in_q8_gemm() -> Iterator[None]:
    """Marks a q8 GEMM running (_IN_Q8_GEMM): the GEMMs inside it are its own, not rerouted."""
    _IN_Q8_GEMM[0] += 1
    try:
        yield
    finally:
        _IN_Q8_GEMM[0] -= 1


class _RerouteWeights(TorchFunctionMode):
    """Inside the forward of a module whose own code reads a twin's weight, F.linear / F.conv*
    on that weight run the twin's quantized GEMM (timm's BEiT, EVA and SwinV2 attention call
    F.linear(x, self.qkv.weight, qkv_bias) to add their own q and v biases)."""

    def __init__(self, twins: list[QuantLayerMixin]) -> None:
        super().__init__()
        self.twins = twins

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None and not _IN_Q8_GEMM[0]:
            method, names = route
            call = dict(zip(names, args)) | kwargs
            for twin in self.twins:
                if call["weight"] is twin.weight:
                    x = call.pop("input")
                    return getattr(twin, method)(x, **call)
        return func(*args, **kwargs)


class WeightReaderMixin:
    """A module whose own forward reads a quantized child's weight (F.linear(x,
    self.qkv.weight, ...)): its forward runs those GEMMs through the child's twin."""

    twin_prefix = "Q8"

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        pass

    def forward(self, *args, **kwargs) -> object:
        twins = [m for m in self.children() if isinstance(m, QuantLayerMixin)]
        with _RerouteWeights(twins):
            return super().forward(*args, **kwargs)


def reads_child_weights(module: nn.Module) -> bool:
    """Whether `module` has a conv/linear twin among its children and its own forward reads an
    attribute named `weight`: it may hand that twin's weight to F.linear / F.conv* itself."""
    code = getattr(type(module).forward, "__code__", None)
    return (code is not None and "weight" in code.co_names
            and any(isinstance(m, QuantLayerMixin) for m in module.children()))


class QuantLayerMixin(ActRangeMixin):
    """Shared by the conv and linear twins: quantized input, weight and bifurcated gradients."""

    twin_prefix = "Quant"

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        conv = isinstance(self, nn.modules.conv._ConvNd)
        self.q8_act_channels = self.in_channels if conv and config.act_ranges == "channel" else None
        self._q8_init_range(config, kernels)
        grad = GradSpec(config.grad_bits, config.wgrad_bits, config.grad_rounding)
        self.q8_spec = LayerSpec(config.act_bits, config.weight_bits, config.per_channel_weights,
                                 grad, config.gemm)

    @float32_under_autocast
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:  # ConvTranspose: output_size
        with _Reroute(self):
            return super().forward(x, *args, **kwargs)

    def _q8_apply(self, x: Tensor, weight: Tensor, bias: Tensor | None, spec: LayerSpec) -> Tensor:
        lo, hi = self._q8_input_range(x) if spec.act_bits is not None else (None, None)
        with in_q8_gemm():
            return BifurcatedLayerFn.apply(x, weight, bias, lo, hi, spec, self.q8_kernels)

    def _q8_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return self._q8_apply(x, weight, bias, self.q8_spec)

    def _q8_conv(self, dims: int, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                 stride: int | tuple = 1, padding: int | tuple | str = 0,
                 dilation: int | tuple = 1, groups: int = 1) -> Tensor:
        """F.conv{dims}d(x, weight, ...), quantized."""
        dilation = _ntuple(dilation, dims)
        x, padding = explicit_padding(x, padding, dilation, weight.shape[2:])
        spec = dataclasses.replace(self.q8_spec, stride=_ntuple(stride, dims),
                                   padding=_ntuple(padding, dims), dilation=dilation,
                                   groups=groups)
        return self._q8_batched(dims, x, weight, bias, spec)

    def _q8_conv_transpose(self, dims: int, x: Tensor, weight: Tensor,
                           bias: Tensor | None = None, stride: int | tuple = 1,
                           padding: int | tuple = 0, output_padding: int | tuple = 0,
                           groups: int = 1, dilation: int | tuple = 1) -> Tensor:
        """F.conv_transpose{dims}d(x, weight, ...), quantized."""
        spec = dataclasses.replace(
            self.q8_spec, stride=_ntuple(stride, dims), padding=_ntuple(padding, dims),
            dilation=_ntuple(dilation, dims), groups=groups, transposed=True,
            output_padding=_ntuple(output_padding, dims))
        return self._q8_batched(dims, x, weight, bias, spec)

    def _q8_batched(self, dims: int, x: Tensor, weight: Tensor, bias: Tensor | None,
                    spec: LayerSpec) -> Tensor:
        if x.dim() == dims + 1:  # an unbatched input, which F.conv*d takes
            return self._q8_apply(x.unsqueeze(0), weight, bias, spec).squeeze(0)
        return self._q8_apply(x, weight, bias, spec)

    # one method per F.conv*: plain methods, which torch.compile traces (partialmethod not)

    def _q8_conv1d(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._q8_conv(1, x, *args, **kwargs)

    def _q8_conv2d(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._q8_conv(2, x, *args, **kwargs)

    def _q8_conv3d(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._q8_conv(3, x, *args, **kwargs)

    def _q8_conv_transpose1d(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._q8_conv_transpose(1, x, *args, **kwargs)

    def _q8_conv_transpose2d(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._q8_conv_transpose(2, x, *args, **kwargs)

    def _q8_conv_transpose3d(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._q8_conv_transpose(3, x, *args, **kwargs)


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    """nn.Conv1d with 8-bit weights and input, and a bifurcated 8/16-bit backward."""


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d with 8-bit weights and input, and a bifurcated 8/16-bit backward."""


class QuantConv3d(QuantLayerMixin, nn.Conv3d):
    """nn.Conv3d with 8-bit weights and input, and a bifurcated 8/16-bit backward."""


class QuantConvTranspose1d(QuantLayerMixin, nn.ConvTranspose1d):
    """nn.ConvTranspose1d with 8-bit weights and input, and a bifurcated 8/16-bit backward."""


class QuantConvTranspose2d(QuantLayerMixin, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with 8-bit weights and input, and a bifurcated 8/16-bit backward."""


class QuantConvTranspose3d(QuantLayerMixin, nn.ConvTranspose3d):
    """nn.ConvTranspose3d with 8-bit weights and input, and a bifurcated 8/16-bit backward."""


class QuantLinear(QuantLayerMixin, nn.Linear):
    """nn.Linear with 8-bit weights and input, and a bifurcated 8/16-bit backward."""


GEMM_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                nn.ConvTranspose2d, nn.ConvTranspose3d)  # the classes QuantLayerMixin twins


class _KernelsMixin:
    """A twin without quantized state: it only runs on its model's kernels."""

    q8_kernels = Kernels("auto")  # built directly; quantize_model sets the model's own

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        self.q8_kernels = kernels


class QuantReLU(_KernelsMixin, nn.ReLU):
    """ReLU whose backward keeps a 1-bit mask instead of a float32 copy of its output."""

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.relu(x, inplace=self.inplace)
        return ReLUFn.apply(x, self.inplace, self.q8_kernels)


class QuantMaxPool2d(_KernelsMixin, nn.MaxPool2d):
    """MaxPool2d whose backward keeps the argmax as a uint8 window offset, not int64 indices."""

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad) or self.return_indices:
            return super().forward(x)
        geometry = (_pair(self.kernel_size),
                    _pair(self.stride if self.stride is not None else self.kernel_size),
                    _pair(self.padding), _pair(self.dilation), self.ceil_mode)
        return MaxPool2dFn.apply(x, geometry, self.q8_kernels)


_ACTIVATIONS = {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                nn.Mish: "mish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_TIMM_ACTIVATIONS = {  # timm.layers.activations' plain wrappers, by class name
    "GELU": "gelu", "GELUTanh": "gelu_tanh", "Swish": "silu", "HardSwish": "hardswish",
    "HardSigmoid": "hardsigmoid", "Mish": "mish", "Sigmoid": "sigmoid", "Tanh": "tanh"}


def activation_kind(module: nn.Module) -> str | None:
    """The elementwise function `module` computes (a key of q8.functional.ACTIVATIONS), from
    its class exactly (a subclass may compute something else) or, for a twin, the class it was
    made from; None for any other module."""
    cls = next(c for c in type(module).__mro__ if c.__module__.split(".")[0] != "q8")
    if cls is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if cls.__module__ == "timm.layers.activations":
        return _TIMM_ACTIVATIONS.get(cls.__qualname__)
    return _ACTIVATIONS.get(cls)


class QuantActivationMixin(_KernelsMixin):
    """An elementwise activation whose backward keeps its input as codes of `act_bits` (one
    byte per element at 8 bits) instead of a float32 tensor. The forward is f(x) exactly,
    PyTorch's op of f (the native op for timm's wrappers, as timm's own factory picks); the
    backward is g f'(x_hat): q8.functional.ActivationFn says what that approximation costs.
    The in-place flag is kept."""

    twin_prefix = "Quant"

    def __init__(self, *args, q8_config: QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = q8_config or QuantConfig()
        self._q8_setup(config, Kernels(config.backend))

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        self.q8_kernels, self.q8_bits = kernels, config.act_bits
        self.q8_kind = activation_kind(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.q8_bits is None or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        inplace = bool(getattr(self, "inplace", False))
        return ActivationFn.apply(x, self.q8_kind, inplace, self.q8_bits, self.q8_kernels)


_TWINS: dict[tuple[type, type], type] = {}


def twin_class(mixin: type, base: type) -> type:
    """The quantized twin of `base`: a subclass of both `mixin` and `base` (cached)."""
    key = (mixin, base)
    if key not in _TWINS:
        name = getattr(mixin, "twin_prefix", "Quant") + base.__name__
        _TWINS[key] = type(name, (mixin, base), {"__module__": mixin.__module__})
    return _TWINS[key]


for _twin in (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d,
              QuantConvTranspose3d, QuantLinear):
    _TWINS[(QuantLayerMixin, _twin.__bases__[1])] = _twin
