"""Fault tolerance: atomic checkpoint files, a checkpoint on SIGTERM/SIGUSR1 and every N steps.

- `AtomicCheckpointIO` writes a checkpoint to a temporary file in the target directory and
  `os.replace()`s it, so a kill never leaves a half-written `last.ckpt`.
- `ResumableCheckpoint` is Lightning's ModelCheckpoint plus: SIGTERM and SIGUSR1 stop the run
  after the current batch, every rank at the same step (the handler only records the signal;
  the ranks agree on it at each batch end, then Lightning's loop raises SIGTERMException), and
  on that exception `last.ckpt` is saved before the process exits (a signal during validation
  takes effect when that validation ends: Lightning's resume from inside a validation would
  skip the rest of it and reshuffle the next epoch differently);
  `last.ckpt` is also saved every `last_every_n_train_steps` steps, so that a SIGKILL (which
  cannot be caught) loses at most that many steps; the temporary files of a write that a kill
  interrupted are removed when the next run starts. `last.ckpt` is written at the end of
  every epoch: Lightning >= 2.5 writes it only when the best checkpoint changed, which left it
  epochs behind the run.
"""

from __future__ import annotations

import glob
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

from q8.lit.errors import CheckpointWriteError
from q8.lit.resume import batches_into_epoch


class _RecordingWriter:
    """A file's write() and flush() that keep the OSError they raise: torch.save reports a failed
    write as a RuntimeError without the reason."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as ex:
            self.error = ex
            raise

    def flush(self) -> None:
        self.file.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same directory, then an atomic os.replace(). A
    write that fails (disk full, quota, file size limit) removes the temporary file, leaves the
    previous checkpoint as it was and raises CheckpointWriteError naming the file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote file systems: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(path)
        tmp = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as f:
                writer = _RecordingWriter(f)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError as ex:
                    if writer.error is None:
                        raise
                    raise writer.error from ex
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as ex:
            reason = ex.strerror or str(ex)
            kept = "; the previous one is intact" if os.path.exists(path) else ""
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason}{kept}") from ex
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
        return None


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves `last.ckpt` when the run is stopped by SIGTERM or SIGUSR1, and
    every `last_every_n_train_steps` optimizer steps inside an epoch (0: at epoch ends only)."""

    def __init__(
        self,
        *args: Any,
        save_on_signal: bool = True,
        last_every_n_train_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(last_every_n_train_steps, bool) or not (
            isinstance(last_every_n_train_steps, int) and last_every_n_train_steps >= 0
        ):
            raise ValueError(
                f"last_every_n_train_steps={last_every_n_train_steps!r} is invalid: it must be "
                "an integer >= 0 (0 = save last.ckpt at epoch ends only)"
            )
        self.save_on_signal = save_on_signal
        self.last_every_n_train_steps = last_every_n_train_steps
        self._signals_taken = False
        self._signal_pending = False
        self._deferred_signal = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            # what AtomicCheckpointIO was writing when a kill stopped it
            for tmp in glob.glob(os.path.join(self.dirpath, ".*.ckpt.*.tmp")):
                os.remove(tmp)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._signals_taken:
            self._agree_on_signal(trainer)
        n = self.last_every_n_train_steps
        # at an epoch's last batch the epoch-end checkpoint follows; saving here would make
        # Lightning's resume skip that epoch's validation
        if n and trainer.global_step % n == 0 and batches_into_epoch(trainer) is not None:
            self._save_last_if_behind(trainer)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_signals(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_signals(trainer)

    def _take_over_signals(self, trainer: L.Trainer) -> None:
        """Replace Lightning's SIGTERM handler (and handle SIGUSR1 the same way) with one that
        only records the signal; the ranks agree on it at the next batch end or validation end.

        Lightning's own handler broadcasts from inside the signal handler, which deadlocks a DDP
        run when the signal lands during another collective, and each rank then stops at the
        first batch end after its own signal, so the ranks can stop at different steps. Lightning
        restores the handlers it found at fit start when fit ends, these included."""
        if not self.save_on_signal or self._signals_taken:
            return
        env = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        # under SLURM, Lightning's requeue handler owns SIGUSR1
        signums = [signal.SIGTERM]
        if hasattr(signal, "SIGUSR1") and not slurm_requeue:
            signums.append(signal.SIGUSR1)

        def record(signum: int, frame: Any) -> None:
            if not self._signal_pending:
                rank_zero_info(f"Received signal {signum}: saving last.ckpt after this batch")
                launcher = trainer.strategy.launcher
                if launcher is not None:  # the ranks this process started get it too
                    launcher.kill(signum)
            self._signal_pending = True

        try:
            for signum in signums:
                signal.signal(signum, record)
        except ValueError:  # not the main thread: Lightning's handlers stay
            return
        self._signals_taken = True

    def _agree_on_signal(self, trainer: L.Trainer) -> None:
        """Every rank calls this at the same point: if any rank has received a signal, all of
        them tell Lightning to stop, so they stop at the same step."""
        stop = self._signal_pending
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            self._signal_pending = False
            trainer._signal_connector.received_sigterm = True

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.save_on_signal and trainer.received_sigterm and not trainer.sanity_checking:
            trainer._signal_connector.received_sigterm = False  # Lightning would stop right now
            self._deferred_signal = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the epoch's best and last checkpoints
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)
        if self._signals_taken and not trainer.sanity_checking:
            self._agree_on_signal(trainer)
        if self._deferred_signal:
            self._deferred_signal = False
            trainer._signal_connector.received_sigterm = True  # stop before the next batch

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        """Save last.ckpt unless this step's checkpoints are already written (Lightning saves
        it along with a new best checkpoint only); save_last="link" would link last.ckpt to the
        best checkpoint, not save this state."""
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._signals_taken = False
        self._signal_pending = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not (self.save_on_signal and isinstance(exception, SIGTERMException)):
            return
        if not self.save_last:
            return
        if self._last_global_step_saved != trainer.global_step:  # else saved at this very step
            if self._should_skip_saving_checkpoint(trainer):
                return
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        rank_zero_info(
            f"Stopped by a signal at step {trainer.global_step}: saved {self.last_model_path}"
        )
