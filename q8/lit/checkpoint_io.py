"""Checkpoint files written atomically: a kill never leaves a half-written `last.ckpt`.

`AtomicCheckpointIO` (a Trainer plugin, conf/trainer/default.yaml) writes a checkpoint to a
temporary file in the target directory and `os.replace()`s it; the temporary files of a write
that a kill interrupted are removed by `remove_interrupted_writes` when the next run starts
(callbacks/checkpoint.py, which also says when checkpoints are written).
"""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from q8.lit.errors import CheckpointWriteError


def remove_interrupted_writes(directory: str) -> None:
    """Remove the temporary files that AtomicCheckpointIO was writing when a kill stopped it."""
    for tmp in glob.glob(os.path.join(directory, ".*.ckpt.*.tmp")):  # mkstemp's names below
        os.remove(tmp)


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
