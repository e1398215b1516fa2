"""Checkpoints on a signal and every N steps: `ResumableCheckpoint`, Lightning's ModelCheckpoint
plus:

- SIGTERM and SIGUSR1 stop the run after the current batch, every rank at the same step (the
  handler only records the signal; the ranks agree on it at each batch end, then Lightning's
  loop raises SIGTERMException), and on that exception `last.ckpt` is saved before the process
  exits (a signal during validation takes effect when that validation ends: Lightning's resume
  from inside a validation would skip the rest of it and reshuffle the next epoch differently);
- under SLURM with auto_requeue, SLURM's requeue signal (SIGUSR1) instead makes every rank, at
  the same batch end, run Lightning's requeue: save `hpc_ckpt_<n>.ckpt` and `scontrol requeue`
  the job;
- `last.ckpt` is also saved every `last_every_n_train_steps` steps, so that a SIGKILL (which
  cannot be caught) loses at most that many steps, and at the end of every epoch: Lightning
  >= 2.5 writes it only when the best checkpoint changed, which left it epochs behind the run.

The files are written atomically by q8.lit.checkpoint_io.AtomicCheckpointIO (a Trainer plugin);
the temporary files of a write that a kill interrupted are removed when the next run starts.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from q8.lit import lightning_internals
from q8.lit.checkpoint_io import remove_interrupted_writes
from q8.lit.train_order import batches_into_epoch


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves `last.ckpt` when the run is stopped by SIGTERM or SIGUSR1, and
    every `last_every_n_train_steps` optimizer steps inside an epoch (0: at epoch ends only).
    Under SLURM with auto_requeue, SIGUSR1 saves `hpc_ckpt_<n>.ckpt` and requeues instead."""

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
        self._signal_pending = False  # SIGTERM or SIGUSR1: stop
        self._requeue_pending = False  # SLURM's requeue signal: hpc_ckpt, then requeue
        self._requeue_signal: int | None = None
        self._deferred_signal = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            remove_interrupted_writes(self.dirpath)

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
        """Replace Lightning's SIGTERM and SIGUSR1 handlers with one that only records the
        signal; the ranks agree on it at the next batch end or validation end, then all stop
        (saving last.ckpt) or, for SLURM's requeue signal (SIGUSR1 by default, under SLURM with
        auto_requeue), all run Lightning's requeue (hpc_ckpt_<n>.ckpt, `scontrol requeue`) and
        train on until SLURM stops the job with SIGTERM.

        Lightning's own handlers broadcast, or save a checkpoint, from inside the signal handler,
        which deadlocks a DDP run when the signal lands during another collective, and each rank
        then stops at the first batch end after its own signal, so the ranks can stop at
        different steps; Lightning also installs its SLURM handler only where no handler is set,
        and train.py's is. Lightning restores the handlers it found at fit start when fit ends,
        these included."""
        if self._signals_taken:
            return
        env = lightning_internals.cluster_environment(trainer)
        requeue = None
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            requeue = env.requeue_signal
        signums = [requeue] if requeue is not None else []
        if self.save_on_signal:
            stops = [signal.SIGTERM, getattr(signal, "SIGUSR1", None)]
            signums += [s for s in stops if s is not None and s != requeue]
        if not signums:
            return

        def record(signum: int, frame: Any) -> None:
            requeues = signum == requeue
            if not (self._requeue_pending if requeues else self._signal_pending):
                what = "requeueing the job" if requeues else "saving last.ckpt"
                rank_zero_info(f"Received signal {signum}: {what} after this batch")
                launcher = trainer.strategy.launcher
                if launcher is not None:  # the ranks this process started get it too
                    launcher.kill(signum)
            if requeues:
                self._requeue_pending = True
            else:
                self._signal_pending = True

        try:
            for signum in signums:
                signal.signal(signum, record)
        except ValueError:  # not the main thread: Lightning's handlers stay
            return
        self._signals_taken, self._requeue_signal = True, requeue

    def _agree_on_signal(self, trainer: L.Trainer) -> None:
        """Every rank calls this at the same point: if any rank has received a signal, all of
        them run Lightning's SLURM requeue (the requeue signal) or tell Lightning to stop, so
        they do it at the same step."""
        pending = [self._signal_pending, self._requeue_pending]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            flags = torch.tensor([int(p) for p in pending], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            pending = [bool(f) for f in flags.tolist()]
        stop, requeue = pending
        if requeue:  # here, not in the handler: a consistent step, saved by every rank together
            self._requeue_pending = False
            lightning_internals.slurm_requeue(trainer, self._requeue_signal)
        if stop:
            self._signal_pending = False
            lightning_internals.set_received_sigterm(trainer, True)

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
            # Lightning would stop right now
            lightning_internals.set_received_sigterm(trainer, False)
            self._deferred_signal = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if lightning_internals.saves_on_train_epoch_end(self, trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the epoch's best and last checkpoints
        if not lightning_internals.saves_on_train_epoch_end(self, trainer):
            self._save_last_if_behind(trainer)
        if self._signals_taken and not trainer.sanity_checking:
            self._agree_on_signal(trainer)
        if self._deferred_signal:
            self._deferred_signal = False
            lightning_internals.set_received_sigterm(trainer, True)  # stop before the next batch

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        """Save last.ckpt unless this step's checkpoints are already written (Lightning saves
        it along with a new best checkpoint only); save_last="link" would link last.ckpt to the
        best checkpoint, not save this state."""
        if self.save_last is True and not lightning_internals.should_skip_saving(self, trainer):
            lightning_internals.save_last(self, trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._signals_taken = False
        self._signal_pending = self._requeue_pending = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not (self.save_on_signal and isinstance(exception, SIGTERMException)):
            return
        if not self.save_last:
            return
        saved = lightning_internals.last_global_step_saved(self)
        if saved != trainer.global_step:  # else saved at this very step
            if lightning_internals.should_skip_saving(self, trainer):
                return
            lightning_internals.save_last(self, trainer)
        rank_zero_info(
            f"Stopped by a signal at step {trainer.global_step}: saved {self.last_model_path}"
        )
