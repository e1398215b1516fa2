"""LightningModule: a timm classifier, trained as the paper did. It holds the float model:
the Trainer's q8.lightning.Q8Precision plugin (conf/trainer/default.yaml) rewrites it in 8 bits."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from q8.lit.errors import UsageError
from q8.lit.models import create_backbone

# conf/optimizer and conf/scheduler, built with `_partial_: true`: optimizer(params) and
# scheduler(optimizer, total_steps=, steps_per_epoch=) (q8.lit.optim's factories)
OptimizerFactory = Callable[[Iterator[torch.nn.Parameter]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def _settings(factory: Any) -> dict[str, Any]:
    """A factory as plain data for the checkpoint's hyperparameters (`_target_` and keywords,
    as conf/ writes it), which load with weights_only=True; a dict is such a record already."""
    if isinstance(factory, Mapping):
        return dict(factory)
    func = getattr(factory, "func", factory)  # a functools.partial's target
    return {"_target_": f"{func.__module__}.{func.__qualname__}",
            **getattr(factory, "keywords", {})}


class ClassifierModule(L.LightningModule):
    """Image classifier on a timm backbone, in float: the Q8Precision plugin quantizes it.

    `optimizer(params)` and `scheduler(optimizer, total_steps=, steps_per_epoch=)` build the
    optimizer and its per-step lr schedule; the checkpoint records them as plain settings, so a
    module loaded from it takes new ones to train on. `compile=True` compiles the backbone with
    torch.compile (in place: the state dict keeps its keys), traced after the plugin's rewrite.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        in_chans: int = 3,
        small_input: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | Mapping[str, Any] | None = None,
        scheduler: SchedulerFactory | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer if callable(optimizer) else None
        self.scheduler_factory = scheduler if callable(scheduler) else None
        self.save_hyperparameters(
            {
                "model_name": model_name,
                "num_classes": num_classes,
                "in_chans": in_chans,
                "small_input": small_input,
                "model_kwargs": dict(model_kwargs or {}),
                "optimizer": _settings(optimizer or {}),
                "scheduler": _settings(scheduler or {}),
                "label_smoothing": label_smoothing,
            },
            logger=False,  # train.py logs the whole resolved config instead
        )
        self.model = create_backbone(model_name, num_classes, in_chans, small_input, model_kwargs)
        self.start_step = 0
        self.compile_backbone = compile

    def setup(self, stage: str) -> None:
        if self.compile_backbone:  # once: fit's setup, or test's without a fit
            self.model.compile()
            self.compile_backbone = False

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

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None or self.scheduler_factory is None:
            raise UsageError("ClassifierModule has no optimizer or scheduler to train with (a "
                             "checkpoint records their settings only): pass optimizer= and "
                             "scheduler=, e.g. to load_from_checkpoint")
        try:
            optimizer = self.optimizer_factory(self.parameters())
        except (TypeError, ValueError) as ex:
            raise UsageError(f"the optimizer rejects its settings "
                             f"{self.hparams.optimizer}: {ex}") from ex
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = (
            self.trainer.max_epochs
            if self.trainer.max_epochs and self.trainer.max_epochs > 0
            else 1
        )
        scheduler = self.scheduler_factory(
            optimizer, total_steps=total_steps, steps_per_epoch=total_steps / epochs
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def create_classifier(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    small_input: bool = False,
    kwargs: Mapping[str, Any] | None = None,
    **module_args: Any,
) -> ClassifierModule:
    """ClassifierModule on timm's model `name`, built from conf/model/ (`name`, `small_input`,
    `kwargs` for timm.create_model); `module_args` (optimizer, scheduler, label_smoothing,
    compile) go to ClassifierModule."""
    return ClassifierModule(name, num_classes, in_chans, small_input, kwargs, **module_args)
