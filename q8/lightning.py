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

Works with the Trainer and Fabric on one device and under DDP; not with strategies that shard
the model (FSDP, DeepSpeed), which q8 does not support. The rounding noise comes from torch's
default generator: seed it (`L.seed_everything`) for a reproducible run.

Imports Lightning: the rest of q8 does not need it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.fabric.plugins.precision import Precision as FabricPrecision
from lightning.pytorch.plugins.precision import Precision

from q8.config import QuantConfig
from q8.transform import quantize_model

log = logging.getLogger("q8")


def _config_dict(config: QuantConfig) -> dict[str, Any]:
    return {**config.to_dict(), "skip": list(config.skip)}


def _convert(module: torch.nn.Module, config: QuantConfig) -> torch.nn.Module:
    """quantize_model(module, config) in place, unless it ran on this module already; the
    state_dict keys it added are kept as `module.q8_added_state`."""
    if getattr(module, "q8_report", None) is None:
        before = set(module.state_dict())
        quantize_model(module, config)
        module.q8_added_state = [k for k in module.state_dict() if k not in before]
    return module


class Q8FabricPrecision(FabricPrecision):
    """8-bit training by Banner et al. (2018) as `config` says, for Lightning Fabric."""

    precision = "32-true"  # the master weights, the optimizer and the loss stay fp32

    def __init__(self, config: QuantConfig | None = None) -> None:
        self.config = config if config is not None else QuantConfig()

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _convert(module, self.config)


class Q8Precision(Precision):
    """8-bit training by Banner et al. (2018) as `config` says, for the Lightning Trainer."""

    precision = "32-true"

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else QuantConfig()
        self._module: torch.nn.Module | None = None  # the converted module

    @classmethod
    def from_checkpoint(cls, path: str) -> Q8Precision:
        """The plugin with the QuantConfig a checkpoint was trained with."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if cls.__qualname__ not in ckpt:
            raise ValueError(f"{path} was not saved with {cls.__qualname__}")
        return cls(QuantConfig.from_dict(dict(ckpt[cls.__qualname__]["config"])))

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self._module = _convert(module, self.config)
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
