"""Distributed training with Lightning: Range BN statistics synchronised across ranks, and
independent rounding noise per rank. Launch environments and the shared run directory are in
q8.lit.launch.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from q8.lit.errors import StoppedBySignal
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

    A checkpoint holds every rank's state (ClassifierModule.on_save_checkpoint): a run resumed
    on as many ranks restores each rank's own and does not fork again, so it continues the
    uninterrupted run's streams."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or getattr(pl_module, "rng_restored_per_rank", False):
            return
        common = int(torch.randint(0, 2**62, ()).item())  # the same on every rank
        seed = np.random.SeedSequence([common, trainer.global_rank]).generate_state(1)[0]
        torch.manual_seed(int(seed))  # the CPU and every CUDA generator


@contextlib.contextmanager
def stop_started_ranks_on_signal(trainer: L.Trainer) -> Iterator[None]:
    """On StoppedBySignal, forward the signal to the ranks this process started (Lightning's
    launcher), which would otherwise wait for it in their next collective."""
    try:
        yield
    except StoppedBySignal as ex:
        launcher = getattr(trainer.strategy, "launcher", None)
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(ex.signum)
        raise


def lost_rank_message(trainer: L.Trainer, ex: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering
    (a closed connection, a timeout), naming the ranks this process started (Lightning's
    launcher: ranks 1.. of this node are its children) that died or still run; None for any
    other error. Those still running are killed: they would wait in their own collectives.
    Under torchrun or srun the launcher names the failed rank itself."""
    text = str(ex)
    lost = isinstance(ex, torch.distributed.DistError) or any(
        s in text.lower() for s in ("connection reset by peer", "connection closed by peer",
                                    "timed out", "timeout", "nccl"))
    if trainer.world_size < 2 or not lost:
        return None
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    dead = []
    for local_rank, proc in enumerate(procs, start=1):
        for _ in range(30):  # a killed peer's exit status can trail its closed socket
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        code, rank = proc.returncode, trainer.node_rank * trainer.num_devices + local_rank
        if code is None:
            proc.kill()
            dead.append(f"rank {rank} (pid {proc.pid}) stopped answering and was killed")
        elif code != 0:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            dead.append(f"rank {rank} (pid {proc.pid}) died ({how})")
    who = ", ".join(dead) or "another rank died or stopped answering (its log names it)"
    first = text.strip().splitlines()[0] if text.strip() else type(ex).__name__
    return (f"rank {trainer.global_rank} lost the process group: {who}; "
            f"the collective failed with: {first[:300]}")
