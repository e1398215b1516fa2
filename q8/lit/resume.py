"""Which checkpoint a run resumes from (`ckpt_path=last` or a file), and whether it can: read
and checked before training starts, each problem one UsageError line. No Lightning import: the
path is checked before the slow imports."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from q8.lit.errors import UsageError


def resolve_checkpoint(path: str | None, output_dir: Path) -> str | None:
    """`last` means <run dir>/checkpoints/last.ckpt; a missing file is an error now, not later."""
    if path is None:
        return None
    resolved = output_dir / "checkpoints" / "last.ckpt" if path == "last" else Path(path)
    if not resolved.is_file():
        hint = (
            "resume in the old run directory with hydra.run.dir=<that run dir>"
            if path == "last"
            else "pass the path of a .ckpt file"
        )
        raise UsageError(f"ckpt_path={path}: {resolved} does not exist; {hint}")
    return str(resolved)


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at `path` (memory-mapped), or a UsageError saying why it cannot be used."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as ex:
        reason = str(ex).splitlines()[0][:160] if str(ex) else type(ex).__name__
        raise UsageError(f"cannot read checkpoint ckpt_path={path}: {reason}") from ex
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"ckpt_path={path} is not a Lightning checkpoint of this application")
    return ckpt


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


def check_checkpoint_matches(path: str, ckpt: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse, before training, a checkpoint of another model or quant preset."""
    saved = ckpt.get("hyper_parameters", {})
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise UsageError(
                f"checkpoint {path} is incompatible with this run: it was trained with "
                f"{key}={saved[key]}, this run has {key}={value}"
            )
