"""The training application's plain-Python parts: LightningModule, data modules, helpers.

No Hydra here: train.py turns the configuration into these objects.
"""

from q8.lit.data import (
    CIFARDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from q8.lit.errors import DatasetNotFoundError, UsageError
from q8.lit.models import check_model_name, create_backbone
from q8.lit.module import ClassifierModule

__all__ = [
    "CIFARDataModule",
    "ClassifierModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "UsageError",
    "check_model_name",
    "create_backbone",
]
