"""LightningModule: a timm classifier rewritten by q8.quantize_model, trained as the paper did."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from q8.config import QuantConfig
from q8.lit.errors import UsageError
from q8.lit.models import create_backbone
from q8.lit.optim import create_optimizer, create_scheduler


def _quantize_model(model: torch.nn.Module, config: QuantConfig) -> torch.nn.Module:
    try:
        from q8 import quantize_model
    except ImportError as ex:
        raise UsageError(
            "this q8 build has no q8.quantize_model yet: only quant=fp32 can run"
        ) from ex
    return quantize_model(model, config)


def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(keys.astype("int64")),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_state_from_plain(state: Mapping[str, Any]) -> tuple:
    import numpy as np

    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["gauss"])


class ClassifierModule(L.LightningModule):
    """Image classifier on a timm backbone; master weights and optimizer stay fp32.

    `quant` is a QuantConfig (or its dict); a full-precision config leaves the model untouched.
    `optimizer` and `scheduler` are the keyword settings of q8.lit.optim's factories.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        in_chans: int = 3,
        small_input: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        quant: QuantConfig | Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if quant is None:
            quant = QuantConfig(
                weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None, bn="batchnorm"
            )
        elif not isinstance(quant, QuantConfig):
            quant = QuantConfig.from_dict(dict(quant))
        self.quant_config = quant
        quant_dict = {**quant.to_dict(), "skip": list(quant.skip)}
        self.save_hyperparameters(
            {
                "model_name": model_name,
                "num_classes": num_classes,
                "in_chans": in_chans,
                "small_input": small_input,
                "model_kwargs": dict(model_kwargs or {}),
                "quant": quant_dict,
                "optimizer": dict(optimizer or {"name": "sgd", "lr": 0.1, "momentum": 0.9}),
                "scheduler": dict(scheduler or {"name": "constant"}),
                "label_smoothing": label_smoothing,
            },
            logger=False,  # train.py logs the whole resolved config instead
        )
        self.model = create_backbone(model_name, num_classes, in_chans, small_input, model_kwargs)
        if not quant.is_full_precision:
            self.model = _quantize_model(self.model, quant)  # logs what it replaced
        self.start_step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(dim=1) == y).float().mean()
        on_step = stage == "train"
        sync = stage != "train"
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=sync
        )
        self.log(f"{stage}/acc", acc, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=sync)
        return loss

    def on_train_start(self) -> None:
        self.start_step = self.global_step  # > 0 when resumed from a checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the RNG states (stochastic rounding, augmentation) for an identical resume."""
        import random

        import numpy as np

        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            # plain types and tensors only: loadable by torch.load(weights_only=True)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import random

        import numpy as np

        states = checkpoint.get("rng_states")
        if not states:
            return
        torch.set_rng_state(states["torch"])
        np.random.set_state(_numpy_state_from_plain(states["numpy"]))
        random.setstate(states["python"])
        cuda = states.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = create_optimizer(self.parameters(), **self.hparams.optimizer)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = (
            self.trainer.max_epochs
            if self.trainer.max_epochs and self.trainer.max_epochs > 0
            else 1
        )
        scheduler = create_scheduler(
            optimizer, total_steps, total_steps / epochs, **self.hparams.scheduler
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
