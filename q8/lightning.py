"""q8 in any Lightning project: `Trainer(plugins=[Q8Precision(QuantConfig())])`, or
`Fabric(plugins=[Q8FabricPrecision(QuantConfig())])`.

Both are Lightning Precision plugins. Their `convert_module` runs `q8.quantize_model` on the
LightningModule (under Fabric, on the module given to `fabric.setup`), in place, once: every
conv and linear layer becomes its bifurcated 8-bit twin, BatchNorm Range BN, and so on, as
`config` says. Master weights and the optimizer stay fp32.

Checkpoints. A q8 twin holds two buffers that its float original lacks (each layer's running
input range `act_range` and its step count). Lightning loads a checkpoint's weights into the
model before the strategy converts it, so `on_save_checkpoint` moves those buffers out of the
checkpoint's `state_dict` into the plugin's own entry, together with the config; after the
conversion `load_state_dict` puts them back. The checkpoint's `state_dict` is then the float
model's: `MyModule.load_from_checkpoint(path)` works without q8, and
`Trainer(plugins=[Q8Precision.from_checkpoint(path)])` tests or resumes it in 8 bits. Under
Fabric, where the model is converted before anything is loaded, `fabric.save`/`fabric.load`
keep the buffers in the model's own state.

`sync_range_bn=True` makes every Range BN layer all-reduce its batch mean and chunk ranges across
the ranks while training (q8.norm.set_range_bn_sync): Range BN of the global batch, for DDP runs
with few images per GPU. Lightning's `sync_batchnorm=True` would replace q8's norms by
SyncBatchNorm instead.

Works with the Trainer and Fabric on one device and under DDP; not with strategies that shard
the model (FSDP, DeepSpeed), which q8 does not support. The rounding noise comes from torch's
default generator: seed it (`L.seed_everything`) for a reproducible run.

Imports Lightning: the rest of q8 does not need it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.pytorch.plugins.precision import Precision

from q8.config import QuantConfig
from q8.norm import set_range_bn_sync
from q8.transform import quantize_model

log = logging.getLogger("q8")


def _config_dict(config: QuantConfig) -> dict[str, Any]:
    return {**config.to_dict(), "skip": list(config.skip)}


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


class Q8FabricPrecision(FabricPrecision):
    """8-bit training by Banner et al. (2018) as `config` says, for Lightning Fabric."""

    precision = "32-true"  # the master weights, the optimizer and the loss stay fp32

    def __init__(self, config: QuantConfig | Mapping[str, Any] | None = None,
                 sync_range_bn: bool = False) -> None:
        self.config = _as_config(config)
        self.sync_range_bn = sync_range_bn

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _convert(module, self.config, self.sync_range_bn)


class Q8Precision(Precision):
    """8-bit training by Banner et al. (2018) as `config` says, for the Lightning Trainer."""

    precision = "32-true"

    def __init__(self, config: QuantConfig | Mapping[str, Any] | None = None,
                 sync_range_bn: bool = False) -> None:
        super().__init__()
        self.config = _as_config(config)
        self.sync_range_bn = sync_range_bn
        self._module: torch.nn.Module | None = None  # the converted module

    @classmethod
    def from_checkpoint(cls, path: str) -> Q8Precision:
        """The plugin with the QuantConfig a checkpoint was trained with."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if cls.__qualname__ not in ckpt:
            raise ValueError(f"{path} was not saved with {cls.__qualname__}")
        return cls(QuantConfig.from_dict(dict(ckpt[cls.__qualname__]["config"])))

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self._module = _convert(module, self.config, self.sync_range_bn)
        return module

    def state_dict(self) -> dict[str, Any]:
        return {"config": _config_dict(self.config)}

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
        if saved and saved != _config_dict(self.config):
            changed = sorted(k for k in saved.keys() | _config_dict(self.config).keys()
                             if saved.get(k) != _config_dict(self.config).get(k))
            log.warning("q8: this checkpoint was trained with another QuantConfig (%s differ)",
                        ", ".join(changed))
        buffers = state_dict.get("buffers", {})
        if buffers and self._module is not None:
            result = self._module.load_state_dict(buffers, strict=False)
            if result.unexpected_keys:
                raise RuntimeError("q8: checkpoint buffers this model does not have: "
                                   + ", ".join(result.unexpected_keys[:5]))
