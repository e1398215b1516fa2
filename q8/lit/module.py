"""LightningModule: a timm classifier rewritten by q8.quantize_model, trained as the paper did."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from q8.config import QuantConfig
from q8.lit.checkpoint import batches_into_epoch
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
        self._epoch_sums: dict[str, list[torch.Tensor]] | None = None  # to restore on resume

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the configured label smoothing (NanGuard's re-run uses it too)."""
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
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

        states = {
            "torch": torch.get_rng_state(),
            # plain types and tensors only: loadable by torch.load(weights_only=True)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["rng_states"] = states
        if self.trainer.world_size > 1:  # every rank's own stream (distributed.PerRankRNG)
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states_per_rank"] = gathered
        if batches_into_epoch(self.trainer) is not None:
            checkpoint["epoch_metric_sums"] = self._logged_epoch_sums()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import random

        import numpy as np

        if self._trainer is not None and self._trainer.state.fn == "fit":
            self._epoch_sums = checkpoint.get("epoch_metric_sums")
        states = checkpoint.get("rng_states")
        per_rank = checkpoint.get("rng_states_per_rank")
        trainer = self._trainer
        if per_rank and trainer is not None and len(per_rank) == trainer.world_size:
            states = per_rank[trainer.global_rank]
            self.rng_restored_per_rank = True  # distributed.PerRankRNG: do not fork again
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
        if self._epoch_sums:
            self._restore_logged_epoch_sums(self._epoch_sums)
            self._epoch_sums = None
        return loss

    # Lightning does not checkpoint the running sums behind an epoch mean (`train/loss_epoch`),
    # so after a mid-epoch resume that mean would cover only the resumed part of the epoch.
    # These two save and restore them; they read Lightning's result collection (internal API):
    # if it changes, the epoch means of a resumed epoch fall back to the resumed part only.

    def _train_results(self) -> dict[str, Any]:
        results = getattr(self.trainer.fit_loop.epoch_loop, "_results", None) or {}
        return {
            key: m
            for key, m in results.items()
            if key.startswith("training_step.")
            and getattr(m, "is_tensor", False)
            and m.meta.on_epoch
            and m.meta.is_mean_reduction
        }

    def _logged_epoch_sums(self) -> dict[str, list[torch.Tensor]]:
        return {
            key: [m.value.detach().cpu().clone(), m.cumulated_batch_size.detach().cpu().clone()]
            for key, m in self._train_results().items()
        }

    def _restore_logged_epoch_sums(self, sums: Mapping[str, list[torch.Tensor]]) -> None:
        """Called right after the resumed epoch's first self.log: value = batch's share only, so
        saved + value is the sum the uninterrupted run computes, to the last bit."""
        for key, m in self._train_results().items():
            if key in sums:
                value, size = sums[key]
                m.value = value.to(m.value) + m.value
                m.cumulated_batch_size = size.to(m.cumulated_batch_size) + m.cumulated_batch_size

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
