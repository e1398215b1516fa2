"""The Lightning callbacks of the training application, one concern per file, each configured by
a file of conf/callbacks/ (`_target_: callbacks.<file>.<class>`).

- `quant_stats.QuantStatsCallback`: per-layer quantization error and gradient statistics,
  measured with `quant_metrics`'s functions;
- `coverage.CoverageCallback`: the share of a step's GEMM FLOPs that ran quantized;
- `nan_guard.NanGuard`: stop, or skip the step, on a non-finite loss or gradient;
- `checkpoint.ResumableCheckpoint`: last.ckpt on SIGTERM/SIGUSR1 and every N steps;
- `exact_resume.ExactResume`: the random states and epoch sums a checkpoint also needs.

Like train.py and conf/, this package is run from the repository, not installed; it uses the
library (`q8`) and the application's other parts (`q8.lit`), which never import it.
"""

from importlib import import_module
from typing import Any

# imported on use: Lightning is slow to import
_EXPORTS = {
    "QuantStatsCallback": "callbacks.quant_stats",
    "CoverageCallback": "callbacks.coverage",
    "NanGuard": "callbacks.nan_guard",
    "ResumableCheckpoint": "callbacks.checkpoint",
    "ExactResume": "callbacks.exact_resume",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
