"""At a run's first step: the share of its GEMM FLOPs that run on quantized operands."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from q8.gemm_coverage import coverage


class CoverageCallback(L.Callback):
    """Runs q8.coverage on a copy of the model and the first `images` images of the first
    batch, with its own random numbers (training's stream does not move). Prints the summary,
    and logs coverage/forward_share, coverage/backward_share and each module class's shares,
    which metrics.json keeps. A run resumed past its first step measures nothing."""

    def __init__(self, images: int = 8) -> None:
        self.images = images
        self.report = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.report is not None or trainer.global_step != 0 or self.images <= 0:
            return
        model = copy.deepcopy(getattr(pl_module, "model", pl_module)).train()
        x = batch[0][: self.images]
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            self.report = coverage(model, x)
        del model
        rank_zero_info(self.report.summary())
        pl_module.log_dict({f"coverage/{k}": float(v) for k, v in self.report.to_dict().items()},
                           on_step=False, on_epoch=True, rank_zero_only=True)
