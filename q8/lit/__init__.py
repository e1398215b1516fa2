"""The training application's plain-Python parts: LightningModule, data modules, helpers; its
Lightning callbacks are in the repository's callbacks/ package, which this one never imports.

Hydra is imported by q8.lit.instantiate alone, with which train.py turns the configuration into
these objects; the others take plain values. Names are imported lazily so that
`q8.lit.errors` can be used without paying for importing Lightning.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CIFARDataModule": "q8.lit.data",
    "DigitsDataModule": "q8.lit.data",
    "ImageFolderDataModule": "q8.lit.data",
    "SyntheticDataModule": "q8.lit.data",
    "DatasetNotFoundError": "q8.lit.errors",
    "UsageError": "q8.lit.errors",
    "check_model_name": "q8.lit.models",
    "create_backbone": "q8.lit.models",
    "ClassifierModule": "q8.lit.module",
    "create_classifier": "q8.lit.module",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'q8.lit' has no attribute {name!r}")
