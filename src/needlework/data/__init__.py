"""Datasets and digit sources. Importing this package registers every built-in dataset."""

from needlework.data.gabor import GaborTextures
from needlework.data.mnist import DataSourceError, DigitPool, digit_pool
from needlework.data.mnist_hard import MultiMNIST, MultiMNISTEasy
from needlework.data.poisson import poisson_disk

__all__ = [
    "DataSourceError",
    "DigitPool",
    "GaborTextures",
    "MultiMNIST",
    "MultiMNISTEasy",
    "digit_pool",
    "poisson_disk",
]
