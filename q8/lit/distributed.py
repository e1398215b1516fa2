"""Distributed training with Lightning: Range BN statistics synchronised across ranks, and
independent rounding noise per rank. Launch environments and the shared run directory are in
q8.lit.launch.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from q8.norm import set_range_bn_sync


class RangeBNSync(LayerSync):
    """Lightning plugin: while fitting, every Range BN layer all-reduces its batch mean and
    chunk ranges over `group` (q8.norm.set_range_bn_sync), as SyncBatchNorm does for BN.
    Use it instead of `Trainer(sync_batchnorm=True)`, which converts the norms to plain
    SyncBatchNorm: fp32 BN in place of Range BN, and timm's BatchNormAct2d activation
    dropped. Evaluation uses the running statistics and needs no synchronisation."""

    def __init__(self, group: Any = "world") -> None:
        self.group = group

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        layers = set_range_bn_sync(model, self.group, enabled=True)
        if layers == 0:
            rank_zero_warn("sync_range_bn: the model has no Range BN layer to synchronise")
        else:
            rank_zero_info(f"sync_range_bn: {layers} Range BN layers synchronised")
        return model

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        set_range_bn_sync(model, enabled=False)
        return model

class PerRankRNG(L.Callback):
    """Independent random streams per rank, drawn from one common state.

    Stochastic rounding hashes its noise from seeds drawn from torch's default CPU generator
    (q8.kernels.reference.draw_seed). seed_everything() seeds every rank alike, so without
    this every rank would add the same noise u to its own g_l:
    the rounding errors of two ranks would be correlated (about 0.5 for uniformly
    spread fractions) and DDP's average over N ranks would not cut their variance by N.
    At the start of training each rank reseeds from a number drawn from the common state
    and its rank. The weights stay identical: DDP all-reduces the gradients computed
    from the quantized g_l, and every rank applies the same update.

    A resumed run restores rank 0's saved state on every rank, then forks again: it is
    reproducible, but not bit-identical to the uninterrupted run past the resume point."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        common = int(torch.randint(0, 2**62, ()).item())  # the same on every rank
        seed = np.random.SeedSequence([common, trainer.global_rank]).generate_state(1)[0]
        torch.manual_seed(int(seed))  # the CPU and every CUDA generator
