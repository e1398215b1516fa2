"""Resuming a run: which checkpoint it resumes from, and what a checkpoint holds beyond
Lightning's own state so that the resumed run continues the interrupted one exactly.

Lightning restores the weights, the optimizer, the scheduler and the loop counters. A mid-epoch
resume of a q8 run needs three more things, all here:

- **the random states** (`ExactResume`): stochastic rounding and augmentation draw from them.
  Every rank's are saved; under DDP each rank also forks its own stream once, when training
  starts, so that the ranks' rounding noise is independent (and not again after a resume that
  restored each rank's own state);
- **the running sums behind the epoch means** (`ExactResume`): Lightning does not checkpoint
  them, so a resumed epoch's `train/loss_epoch` would otherwise cover only its resumed part;
- **the position in the training epoch** (`TrainOrder`, which the datamodules build their
  training loader with): the epoch's shuffling seed and the samples done. Lightning would
  otherwise reshuffle the interrupted epoch and train on other batches.

How checkpoints are written (atomically, on SIGTERM, every N steps) is q8.lit.checkpoint; the
path check that runs before the slow imports is q8.lit.validate.check_ckpt_path.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from q8.config import QuantConfig
from q8.lit import lightning_internals
from q8.lit.errors import UsageError

# ---------------------------------------------------------------- the checkpoint to resume from


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at `path` (memory-mapped), or a UsageError saying why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as ex:
        reason = str(ex).splitlines()[0][:160] if str(ex) else type(ex).__name__
        raise UsageError(f"cannot read checkpoint ckpt_path={path}: {reason}") from ex
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"ckpt_path={path} is not a Lightning checkpoint of this application")
    return ckpt


def resume_from(requested: str, path: str, output_dir: Path, expected: dict[str, Any],
                quant: QuantConfig) -> str:
    """The checkpoint fit resumes from (read_resume_checkpoint), once it is known to be this
    run's model and quant preset (check_checkpoint_matches)."""
    path, ckpt = read_resume_checkpoint(requested, path, output_dir)
    check_checkpoint_matches(path, ckpt, expected, quant)
    return path


def read_resume_checkpoint(requested: str, path: str, output_dir: Path) -> tuple[str, dict]:
    """The checkpoint to resume from: `path`, or for ckpt_path=last an unreadable last.ckpt's
    newest readable sibling (the run's other checkpoints and SLURM's hpc_ckpt_*.ckpt, newest
    first, those that hold the training loops), with a warning. Nothing readable: the error."""
    try:
        return path, read_checkpoint(path)
    except UsageError as ex:
        if requested != "last":
            raise
        error = ex
    others = [p for p in [*(output_dir / "checkpoints").glob("*.ckpt"),
                          *output_dir.glob("hpc_ckpt_*.ckpt")] if str(p) != path]
    for other in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            ckpt = read_checkpoint(str(other))
        except UsageError:
            continue
        if "loops" in ckpt:
            print(f"warning: {error}; resuming from {other} instead, the newest readable "
                  "checkpoint of this run", file=sys.stderr)
            return str(other), ckpt
    raise error


def check_checkpoint_matches(path: str, ckpt: dict[str, Any], expected: dict[str, Any],
                             quant: QuantConfig) -> None:
    """Refuse, before training, a checkpoint of another model (`expected`: the module's
    hyperparameters) or quant preset (the config Q8Precision saved)."""
    saved = dict(ckpt.get("hyper_parameters", {}))
    plugin = ckpt.get("Q8Precision")
    if plugin is None:
        raise UsageError(f"checkpoint {path} was not trained by this application "
                         "(it has no Q8Precision entry)")
    saved["quant"] = dict(plugin.get("config", {}))
    expected = {**expected, "quant": quant.to_dict()}
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise UsageError(
                f"checkpoint {path} is incompatible with this run: it was trained with "
                f"{key}={saved[key]}, this run has {key}={value}"
            )


def batches_into_epoch(trainer: L.Trainer) -> int | None:
    """Training batches of the current epoch already stepped on, if a checkpoint saved now falls
    inside an epoch; None at an epoch's start or end, where a resume starts the next epoch."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return done if 0 < done < trainer.num_training_batches else None


# ---------------------------------------------------------------- random states, epoch sums


def _random_states() -> dict[str, Any]:
    """This process's generators, as plain types and tensors (torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_random_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ExactResume(L.Callback):
    """Saves and restores the random states and the epoch sums (see the module's docstring);
    under DDP, forks one random stream per rank when training starts.

    Why the fork: stochastic rounding hashes its noise from seeds drawn from torch's default
    generator (q8.kernels.reference.draw_seed), and seed_everything() seeds every rank alike,
    so without it every rank would add the same noise to its own g_l: the ranks' rounding
    errors would be correlated (about 0.5 for uniformly spread fractions) and DDP's average
    over N ranks would not cut their variance by N. Each rank reseeds from a number drawn from
    the common state and its rank. The weights stay identical: DDP all-reduces the gradients,
    and every rank applies the same update."""

    def __init__(self) -> None:
        self._restored_per_rank = False
        self._epoch_sums: dict[str, list[torch.Tensor]] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or self._restored_per_rank:
            return
        common = int(torch.randint(0, 2**62, ()).item())  # the same on every rank
        seed = np.random.SeedSequence([common, trainer.global_rank]).generate_state(1)[0]
        torch.manual_seed(int(seed))  # the CPU and every CUDA generator

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = _random_states()
        checkpoint["rng_states"] = states
        if trainer.world_size > 1:  # every rank's own stream
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states_per_rank"] = gathered
        if batches_into_epoch(trainer) is not None:
            checkpoint["epoch_metric_sums"] = {
                key: [m.value.detach().cpu().clone(), m.cumulated_batch_size.detach().cpu().clone()]
                for key, m in _epoch_means(trainer).items()
            }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._epoch_sums = checkpoint.get("epoch_metric_sums")
        states = checkpoint.get("rng_states")
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank and len(per_rank) == trainer.world_size:
            states = per_rank[trainer.global_rank]
            self._restored_per_rank = True  # each rank has its own stream back: no new fork
        if states:
            _set_random_states(states)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the resumed epoch's first batch, whose self.log calls made each epoch mean's
        sum that batch's share only: saved + that share is the uninterrupted run's sum, to the
        last bit."""
        if not self._epoch_sums:
            return
        for key, m in _epoch_means(trainer).items():
            if key in self._epoch_sums:
                value, size = self._epoch_sums[key]
                m.value = value.to(m.value) + m.value
                m.cumulated_batch_size = size.to(m.cumulated_batch_size) + m.cumulated_batch_size
        self._epoch_sums = None


def _epoch_means(trainer: L.Trainer) -> dict[str, Any]:
    """The training step's metrics logged with on_epoch=True and a mean reduction, from
    Lightning's result collection (a private API: if a release drops it, the epoch means of a
    resumed epoch fall back to the resumed part only, and tests/test_private_apis.py fails)."""
    try:
        results = lightning_internals.epoch_results(trainer) or {}
    except AttributeError:
        results = {}
    return {
        key: m
        for key, m in results.items()
        if key.startswith("training_step.")
        and getattr(m, "is_tensor", False)
        and m.meta.on_epoch
        and m.meta.is_mean_reduction
    }


# ---------------------------------------------------------------- the position in the epoch

# Lightning's warning on a mid-epoch resume, false for a loader built by TrainOrder
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class ResumableSampler(RandomSampler):
    """torch's RandomSampler (the same order from the same one draw of torch's global RNG per
    epoch) that can replay an interrupted epoch from its `start`-th sample: a mid-epoch resume."""

    def __init__(self, data_source: Dataset) -> None:
        super().__init__(data_source)
        self.epoch_seed: int | None = None  # the seed of the epoch being iterated
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch_seed: int, start: int) -> None:
        """Make the next iteration that epoch's permutation, without its first `start` samples."""
        self._resume = (epoch_seed, start)

    def __iter__(self) -> Iterator[int]:
        if self._resume is None:  # as RandomSampler: a seed from the global RNG at the 1st next()
            seed, start = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        else:
            (seed, start), self._resume = self._resume, None
        self.epoch_seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()[start:]


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler, shuffled as Lightning builds it under DDP (seed
    PL_GLOBAL_SEED + epoch, one shard per rank), that can replay an interrupted epoch from its
    `start`-th sample of this rank's shard. Every rank steps through the same number of batches,
    so one count, rank 0's, serves them all."""

    def __init__(self, data_source: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        self.epoch_seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch_seed: int, start: int) -> None:
        """Make the next iteration, that of the epoch shuffled with `epoch_seed` (Lightning sets
        the epoch before it), skip the first `start` samples of this rank's shard."""
        self._resume = (epoch_seed, start)

    def __iter__(self) -> Iterator[int]:
        self.epoch_seed, start = self.seed + self.epoch, 0
        if self._resume is not None:
            (seed, start), self._resume = self._resume, None
            if seed != self.epoch_seed:
                raise UsageError(
                    f"the checkpoint's epoch was shuffled with seed {seed}, this run shuffles "
                    f"epoch {self.epoch} with {self.epoch_seed}: resume with the seed it was "
                    "trained with")
        yield from list(super().__iter__())[start:]


class ResumableDataLoader(DataLoader):
    """A DataLoader that can start its next iteration without drawing from the global RNG."""

    keep_rng = False  # set for the iteration that resumes an interrupted epoch

    def __iter__(self) -> Iterator:
        if not self.keep_rng:
            return super().__iter__()
        self.keep_rng = False
        # The interrupted run drew this epoch's worker base seed from the global RNG before its
        # checkpoint; drawing it again would shift every later random number (augmentation,
        # stochastic rounding) by one draw.
        rng = torch.get_rng_state()
        try:
            return super().__iter__()
        finally:
            torch.set_rng_state(rng)


class TrainOrder:
    """A datamodule's shuffled training loader, resumable mid-epoch: the datamodule builds it
    with `loader()` and passes its own `state_dict`/`load_state_dict` through to this one."""

    def __init__(self) -> None:
        self._loader: ResumableDataLoader | None = None
        self._resume: tuple[int, int] | None = None

    def loader(self, dataset: Dataset, trainer: L.Trainer | None, **kwargs: Any) -> DataLoader:
        world = trainer.world_size if trainer is not None else 1
        sampler = (ResumableDistributedSampler(dataset, world, trainer.global_rank)
                   if world > 1 else ResumableSampler(dataset))
        loader = ResumableDataLoader(dataset, sampler=sampler, **kwargs)
        if self._resume is not None:
            sampler.resume(*self._resume)
            loader.keep_rng = True
            self._resume = None
        self._loader = loader
        return loader

    def state_dict(self, trainer: L.Trainer | None) -> dict[str, Any]:
        """The current epoch's shuffling seed and the samples already trained on; empty at an
        epoch's end (the next epoch starts afresh) or before the loader was iterated."""
        loader = self._loader
        if trainer is None or loader is None:
            return {}
        done = batches_into_epoch(trainer)
        if done is None or loader.sampler.epoch_seed is None:
            return {}
        return {"epoch_seed": loader.sampler.epoch_seed, "samples_done": done * loader.batch_size}

    def load_state_dict(self, trainer: L.Trainer | None, state: Mapping[str, Any]) -> None:
        """The next training loader replays the interrupted epoch from where `state` left it."""
        if state and trainer is not None and trainer.state.fn == "fit":
            self._resume = (int(state["epoch_seed"]), int(state["samples_done"]))
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING)
