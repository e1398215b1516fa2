"""A resumed run continues the interrupted one exactly: what a checkpoint holds beyond
Lightning's own state (weights, optimizer, scheduler, loop counters).

- **the random states**: stochastic rounding and augmentation draw from them. Every rank's are
  saved; under DDP each rank also forks its own stream once, when training starts, so that the
  ranks' rounding noise is independent (and not again after a resume that restored each rank's
  own state);
- **the running sums behind the epoch means**: Lightning does not checkpoint them, so a resumed
  epoch's `train/loss_epoch` would otherwise cover only its resumed part.

The position in the training epoch is the datamodule's (q8.lit.train_order); which checkpoint a
run resumes from, and whether it is this run's, is q8.lit.resume.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch

from q8.lit import lightning_internals
from q8.lit.train_order import batches_into_epoch


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
