"""Training on Lightning: one task for every classifier, one data module for every dataset."""

from needlework.training.datamodule import DatasetDataModule
from needlework.training.task import ClassificationTask

__all__ = ["ClassificationTask", "DatasetDataModule"]
