"""q8 in any Lightning project: `Trainer(plugins=[Q8Precision(QuantConfig())])`, or
`Fabric(plugins=[Q8FabricPrecision(QuantConfig())])`.

Both are Lightning Precision plugins. Their `convert_module` runs `q8.quantize_model` on the
LightningModule (under Fabric, on the module given to `fabric.setup`), in place, once: every
conv and linear layer becomes its bifurcated 8-bit twin, BatchNorm a twin that keeps 8-bit
codes (or the paper's Range BN), and so on, as `config` says. Master weights and the optimizer
stay fp32.

Checkpoints. A q8 twin holds two buffers that its float original lacks (each layer's running
input range `act_range` and its step count). Lightning loads a checkpoint's weights into the
model before the strategy converts it, so `on_save_checkpoint` moves those buffers out of the
checkpoint's `state_dict` into the plugin's own entry, together with the config; after the
conversion `load_state_dict` puts them back. The checkpoint's `state_dict` is then the float
model's: `MyModule.load_from_checkpoint(path)` works without q8, and
`Trainer(plugins=[Q8Precision.from_checkpoint(path)])` tests or resumes it in 8 bits. Under
Fabric, where the model is converted before anything is loaded, `fabric.save`/`fabric.load`
keep the buffers in the model's own state.

Hyper-parameters. A module saved with `save_hyperparameters` (`__init__(self, net: nn.Module)`)
is the converted module itself: the checkpoint's `hyper_parameters` hold a float copy of it
instead (q8.dequantize_model of a copy that shares the tensors), so that `load_from_checkpoint`
works where q8 is not installed and rebuilds the float model. Lightning writes them after the
plugin's own hook: a callback that Q8Precision adds to the Trainer does it.

`sync_range_bn=True` makes every Range BN layer (`bn="range"`) all-reduce its batch mean and
chunk ranges across the ranks while training (q8.norm.set_range_bn_sync): Range BN of the global
batch, for DDP runs with few images per GPU. Lightning's `sync_batchnorm=True` makes every
BatchNorm a SyncBatchNorm (timm's BatchNormAct2d loses its activation in that conversion, which
is torch's): with the default BN in full precision q8 leaves those to torch, which synchronises
them; with Range BN q8 turns each into synchronised Range BN.

Precision. Lightning refuses a `precision` given beside the plugin
(`Trainer(precision="bf16-mixed", plugins=[Q8Precision()])` raises "Received both ... Choose
one"): give it to the plugin, `Q8Precision(config, precision="bf16-mixed")`. With "bf16-mixed"
the steps run under bf16 autocast, as Lightning's MixedPrecision runs them; q8's quantized
layers (conv, linear, BN) leave autocast and quantize their float32 inputs, as they do under
any autocast (q8.layers.float32_under_autocast): what q8 leaves alone (attention's products,
layers in `config.skip`, ...) runs in bf16. The default,
"32-true", runs everything in float32. Master weights and the optimizer stay fp32 either way.

Works with the Trainer and Fabric on one device and under DDP; not with strategies that shard
the model (FSDP, DeepSpeed), which q8 does not support. The rounding noise comes from torch's
default generator: seed it (`L.seed_everything`) for a reproducible run.

Imports Lightning: the rest of q8 does not need it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from q8.config import QuantConfig
from q8.norm import set_range_bn_sync
from q8.transform import dequantize_model, holds_q8_state, quantize_model

log = logging.getLogger("q8")

PRECISIONS = ("32-true", "bf16-mixed")  # what the plugins take as `precision`


def _as_config(config: QuantConfig | Mapping[str, Any] | None) -> QuantConfig:
    """A QuantConfig from itself, its dict (a Hydra config's `quant` node), or None (the
    default, q8_bifurcated)."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    return QuantConfig.from_dict(dict(config))


def _convert(module: torch.nn.Module, config: QuantConfig, sync_range_bn: bool = False
             ) -> torch.nn.Module:
    """quantize_model(module, config) in place, unless it ran on this module already; the
    state_dict keys it added are kept as `module.q8_added_state`.

    A converted module also loads the float state_dict of a checkpoint (Lightning loads a
    checkpoint into the already converted model when `trainer.test(ckpt_path=...)` follows
    `fit`): its q8 buffers are not reported missing, and the plugin's `load_state_dict` sets
    them from the checkpoint's own entry right after."""
    if getattr(module, "q8_report", None) is None:
        before = set(module.state_dict())
        quantize_model(module, config)
        module.q8_added_state = [k for k in module.state_dict() if k not in before]
        if module.q8_added_state:
            module.register_load_state_dict_post_hook(_allow_missing_q8_buffers)
        if sync_range_bn:
            layers = set_range_bn_sync(module, enabled=True)
            if layers == 0:
                log.warning("q8: sync_range_bn: the model has no Range BN layer to synchronise")
            else:
                log.info("q8: sync_range_bn: %d Range BN layers synchronised", layers)
    return module


def _allow_missing_q8_buffers(module: torch.nn.Module, incompatible: Any) -> None:
    added = set(getattr(module, "q8_added_state", ()))
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in added]


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"q8: precision={precision!r} is invalid: valid choices are "
                         f"{', '.join(PRECISIONS)}")
    return precision


# ---- bf16 autocast for what q8 leaves alone (q8's layers leave autocast themselves) --------


class _Autocast:
    """Lightning's MixedPrecision plugin of `precision`, for the device type of the module's
    tensors at each step (the module moves to its device after the conversion)."""

    def __init__(self, precision: str, mixed: type) -> None:
        self.precision, self.mixed = precision, mixed
        self.plugins: dict[str, Any] = {}
        self.module: torch.nn.Module | None = None

    def plugin(self) -> Any:
        tensor = next(iter(self.module.parameters()), None) if self.module is not None else None
        device = tensor.device.type if tensor is not None else "cpu"
        if device not in self.plugins:
            self.plugins[device] = self.mixed(self.precision, device)
        return self.plugins[device]

    def convert(self, module: torch.nn.Module) -> None:
        self.module = module

    def forward_context(self) -> AbstractContextManager:
        return nullcontext() if self.precision == "32-true" else self.plugin().forward_context()


# ---- float hyper-parameters in checkpoints ---------------------------------------------------


def _float_values(value: Any, copies: dict[int, torch.nn.Module]) -> Any:
    """`value` with each nn.Module inside it (through dicts, lists and tuples) that holds q8
    state replaced by its float copy; containers are copied where something inside changed,
    never changed in place (they are the LightningModule's own hparams)."""
    if isinstance(value, torch.nn.Module):
        if id(value) not in copies:
            copies[id(value)] = (dequantize_model(value, inplace=False)
                                 if holds_q8_state(value) else value)
        return copies[id(value)]
    if isinstance(value, dict):
        new = {k: _float_values(v, copies) for k, v in value.items()}
        if all(new[k] is value[k] for k in value):
            return value
        out = copy.copy(value)
        out.update(new)
        return out
    if isinstance(value, (list, tuple)):
        items = [_float_values(v, copies) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


class _FloatHyperParameters(Callback):
    """The checkpoint's hyper-parameters with float modules (Lightning dumps them after the
    precision plugin's on_save_checkpoint, before the callbacks')."""

    def on_save_checkpoint(self, trainer: Any, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        copies: dict[int, torch.nn.Module] = {}
        for key in (LightningModule.CHECKPOINT_HYPER_PARAMS_KEY,
                    LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY):
            if key in checkpoint:
                checkpoint[key] = _float_values(checkpoint[key], copies)


def _trainer_of(module: torch.nn.Module) -> Any:
    if not isinstance(module, LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None


class Q8FabricPrecision(FabricPrecision):
    """8-bit training by Banner et al. (2018) as `config` says, for Lightning Fabric;
    `precision="bf16-mixed"` runs the layers q8 leaves alone under bf16 autocast."""

    precision = "32-true"  # the master weights, the optimizer and the loss stay fp32

    def __init__(self, config: QuantConfig | Mapping[str, Any] | None = None,
                 sync_range_bn: bool = False, precision: str = "32-true") -> None:
        self.config = _as_config(config)
        self.sync_range_bn = sync_range_bn
        self.precision = _check_precision(precision)
        self._autocast = _Autocast(self.precision, FabricMixedPrecision)

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        _convert(module, self.config, self.sync_range_bn)
        self._autocast.convert(module)
        return module

    def forward_context(self) -> AbstractContextManager:
        return self._autocast.forward_context()

    # convert_input stays the identity (MixedPrecision casts inputs to bf16): q8 quantizes
    # them from float32, and autocast casts them where it computes in bf16

    def convert_output(self, data: Any) -> Any:
        """Floating-point outputs of an autocast forward back to float32, as MixedPrecision."""
        if self.precision == "32-true":
            return data
        return self._autocast.plugin().convert_output(data)


class Q8Precision(Precision):
    """8-bit training by Banner et al. (2018) as `config` says, for the Lightning Trainer;
    `precision="bf16-mixed"` runs the layers q8 leaves alone under bf16 autocast."""

    precision = "32-true"

    def __init__(self, config: QuantConfig | Mapping[str, Any] | None = None,
                 sync_range_bn: bool = False, precision: str = "32-true") -> None:
        super().__init__()
        self.config = _as_config(config)
        self.sync_range_bn = sync_range_bn
        self.precision = _check_precision(precision)
        self._autocast = _Autocast(self.precision, MixedPrecision)
        self._module: torch.nn.Module | None = None  # the converted module

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> Q8Precision:
        """The plugin with the QuantConfig a checkpoint was trained with (`kwargs`: the other
        arguments, e.g. precision="bf16-mixed")."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if cls.__qualname__ not in ckpt:
            raise ValueError(f"{path} was not saved with {cls.__qualname__}")
        return cls(QuantConfig.from_dict(dict(ckpt[cls.__qualname__]["config"])), **kwargs)

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Quantize the LightningModule, and add to its Trainer the callback that keeps its
        checkpoints' hyper-parameters float."""
        self._module = _convert(module, self.config, self.sync_range_bn)
        self._autocast.convert(module)
        trainer = _trainer_of(module)
        if trainer is not None and not any(isinstance(c, _FloatHyperParameters)
                                           for c in trainer.callbacks):
            trainer.callbacks.append(_FloatHyperParameters())
        return module

    def forward_context(self) -> AbstractContextManager:
        return self._autocast.forward_context()

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Move the q8 buffers out of the model's state into this plugin's entry."""
        weights = checkpoint.get("state_dict", {})
        entry = checkpoint.setdefault(type(self).__qualname__, self.state_dict())
        added = getattr(self._module, "q8_added_state", [])  # keys quantize_model added
        entry["buffers"] = {k: weights.pop(k) for k in added if k in weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """After the conversion: the q8 buffers back into the model; a config that differs
        from the one trained with is reported (the plugin's own config is used)."""
        saved = dict(state_dict.get("config", {}))
        if saved and saved != self.config.to_dict():
            changed = sorted(k for k in saved.keys() | self.config.to_dict().keys()
                             if saved.get(k) != self.config.to_dict().get(k))
            log.warning("q8: this checkpoint was trained with another QuantConfig (%s differ)",
                        ", ".join(changed))
        buffers = state_dict.get("buffers", {})
        if buffers and self._module is not None:
            result = self._module.load_state_dict(buffers, strict=False)
            if result.unexpected_keys:
                raise RuntimeError("q8: checkpoint buffers this model does not have: "
                                   + ", ".join(result.unexpected_keys[:5]))
