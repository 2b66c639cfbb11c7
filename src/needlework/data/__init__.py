"""Datasets and digit sources. Importing this package registers every built-in dataset."""

from needlework.data.mnist import DataSourceError, DigitPool, digit_pool

__all__ = ["DataSourceError", "DigitPool", "digit_pool"]

from needlework.data.mnist_bags import MNISTBags
from needlework.data.needle_mnist import NeedleMNIST
from needlework.data.planted_bags import PlantedBags

__all__ += ["NeedleMNIST"]
__all__ += ["MNISTBags"]
__all__ += ["PlantedBags"]
