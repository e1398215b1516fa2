"""Fault tolerance: atomic checkpoint files and a checkpoint on SIGTERM/SIGUSR1.

- `AtomicCheckpointIO` writes a checkpoint to a temporary file in the target directory and
  `os.replace()`s it, so a kill never leaves a half-written `last.ckpt`.
- `ResumableCheckpoint` is Lightning's ModelCheckpoint plus: SIGUSR1 is treated like SIGTERM
  (Lightning's own SIGTERM handling stops the loop after the current batch and raises
  SIGTERMException), and on that exception `last.ckpt` is saved before the process exits.
"""

from __future__ import annotations

import os
import signal
import tempfile
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same directory, then an atomic os.replace()."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote file systems: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        name = os.path.basename(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return None


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves `last.ckpt` when the run is stopped by SIGTERM or SIGUSR1."""

    def __init__(self, *args: Any, save_on_signal: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_on_signal = save_on_signal
        self._old_sigusr1: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if not self.save_on_signal or slurm_requeue or not hasattr(signal, "SIGUSR1"):
            return  # under SLURM, Lightning's requeue handler owns SIGUSR1

        def stop(signum: int, frame: Any) -> None:
            rank_zero_info(f"Received signal {signum}: saving last.ckpt after this batch")
            trainer._signal_connector.received_sigterm = True

        try:
            self._old_sigusr1 = signal.signal(signal.SIGUSR1, stop)
        except ValueError:  # not the main thread
            self._old_sigusr1 = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._old_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._old_sigusr1)
            self._old_sigusr1 = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not (self.save_on_signal and isinstance(exception, SIGTERMException)):
            return
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(
            f"Stopped by a signal at step {trainer.global_step}: saved {self.last_model_path}"
        )
