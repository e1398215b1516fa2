"""The private attributes of Lightning that the app reads or writes, one function each.

No public API gives these; a Lightning release may rename or drop any of them without notice.
tests/test_private_apis.py exercises each one on the installed Lightning and fails naming it,
so that an upgrade that breaks one fails there rather than in a run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

# ---------------------------------------------------------------- the trainer


def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment:
    """`trainer._accelerator_connector.cluster_environment`: how the processes were launched
    (SLURM, torchelastic, Lightning's own); SLURM's `auto_requeue` and `requeue_signal` say
    which signal requeues the job."""
    return trainer._accelerator_connector.cluster_environment


def set_received_sigterm(trainer: L.Trainer, value: bool) -> None:
    """Write `trainer._signal_connector.received_sigterm`, which `trainer.received_sigterm`
    reads: True makes Lightning's loops raise SIGTERMException at their next check (after the
    batch), False withdraws it. q8 sets it once every rank agrees that a signal came."""
    trainer._signal_connector.received_sigterm = value


def slurm_requeue(trainer: L.Trainer, signum: int) -> None:
    """Run `trainer._signal_connector._slurm_sigusr_handler_fn`, Lightning's SLURM requeue:
    finalize the loggers, save <default_root_dir>/hpc_ckpt_<n>.ckpt (every rank: it is a
    collective), and `scontrol requeue` the job from rank 0."""
    trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)


def epoch_results(trainer: L.Trainer) -> dict[str, Any]:
    """`trainer.fit_loop.epoch_loop._results`: the training step's logged values (key ->
    _ResultMetric, with .meta, .value, .cumulated_batch_size), whose running sums are the epoch
    means that a checkpoint does not hold."""
    return trainer.fit_loop.epoch_loop._results


# ---------------------------------------------------------------- ModelCheckpoint, subclassed


def last_global_step_saved(callback: ModelCheckpoint) -> int:
    """`ModelCheckpoint._last_global_step_saved`: the step of its newest checkpoint."""
    return callback._last_global_step_saved


def should_skip_saving(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """`ModelCheckpoint._should_skip_saving_checkpoint`: no checkpoint now (sanity check, a
    fast_dev_run, a step already saved, a trainer that is not fitting)."""
    return callback._should_skip_saving_checkpoint(trainer)


def saves_on_train_epoch_end(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """`ModelCheckpoint._should_save_on_train_epoch_end`: whether its epoch's checkpoints are
    written at the training epoch's end (no validation this epoch) or at validation's end."""
    return callback._should_save_on_train_epoch_end(trainer)


def save_last(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """`ModelCheckpoint._save_last_checkpoint` with `_monitor_candidates`: write last.ckpt of
    this step (its name filled from the logged metrics) and remember it as saved."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


# ---------------------------------------------------------------- loggers


def wandb_run_started(logger: Any) -> bool:
    """`WandbLogger._experiment` is set: its W&B run has started (reading `.experiment` would
    start one), so there is a run to finish."""
    return logger._experiment is not None
