"""The order of the training samples, resumable mid-epoch: the datamodules of q8.lit.data build
their training loader with `TrainOrder` and keep its state in their own `state_dict`.

A checkpoint saved inside an epoch then holds the epoch's shuffling seed and the samples done,
and the resumed run replays the rest of that permutation; Lightning would otherwise reshuffle
the interrupted epoch and train on other batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from q8.lit.errors import UsageError

# Lightning's warning on a mid-epoch resume, false for a loader built by TrainOrder
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


def batches_into_epoch(trainer: L.Trainer) -> int | None:
    """Training batches of the current epoch already stepped on, if a checkpoint saved now falls
    inside an epoch; None at an epoch's start or end, where a resume starts the next epoch."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return done if 0 < done < trainer.num_training_batches else None


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
        """The training loader of `dataset`: sharded by rank under DDP, and replaying the
        interrupted epoch after load_state_dict."""
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
