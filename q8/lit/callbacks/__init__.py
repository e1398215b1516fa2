"""Lightning callbacks of the q8 application, configured in conf/callbacks/.

The standard ones (checkpointing, progress) come from Lightning; q8-specific callbacks
(per-layer quantization error and gradient statistics, GEMM coverage) live in this package.
"""

from importlib import import_module
from typing import Any

# imported on use: Lightning is slow to import
_EXPORTS = {"QuantStatsCallback": "q8.lit.callbacks.quant_stats",
            "CoverageCallback": "q8.lit.callbacks.coverage"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'q8.lit.callbacks' has no attribute {name!r}")
