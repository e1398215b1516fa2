"""Which checkpoint a run resumes from, and whether it is this run's: read before training,
so that a damaged file or a checkpoint of another model or quant preset fails in seconds.

What the checkpoint holds beyond Lightning's own state, so that the resumed run continues the
interrupted one exactly, is saved by callbacks/exact_resume.py (random states, epoch sums) and
by the datamodule (q8.lit.train_order: the position in the epoch). How checkpoints are written
(atomically, on SIGTERM, every N steps) is q8.lit.checkpoint_io and callbacks/checkpoint.py;
the path check that runs before the slow imports is q8.lit.validate.check_ckpt_path.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from q8.config import QuantConfig
from q8.lit.errors import UsageError

# The module's hyperparameters that must match: the model, its classes and input channels, its
# stem. The optimizer and the schedule may change on a resume.
MODEL_KEYS = ("model_name", "num_classes", "in_chans", "small_input")


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


def resume_from(requested: str, path: str, output_dir: Path, hparams: Mapping[str, Any],
                quant: QuantConfig) -> str:
    """The checkpoint fit resumes from (read_resume_checkpoint), once it is known to be this
    run's model (`hparams`: the module's MODEL_KEYS) and quant preset (check_checkpoint_matches).
    """
    path, ckpt = read_resume_checkpoint(requested, path, output_dir)
    expected = {key: hparams[key] for key in MODEL_KEYS if key in hparams}
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
