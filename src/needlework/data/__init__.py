"""Datasets and digit sources. Importing this package registers every built-in dataset."""

from needlework.data import (  # noqa: F401  (each import registers its datasets or collates)
    bags,
    batching,
    collate,
    level_collate,
    multimag_bags,
    views,
)
from needlework.data.collate import pad_bags
from needlework.data.gabor import GaborTextures
from needlework.data.megapixel_mnist import MegapixelMNIST, MegapixelMNISTIPS
from needlework.data.mnist import DataSourceError, DigitPool, digit_pool
from needlework.data.mnist_bags import MNISTBags
from needlework.data.mnist_hard import MultiMNIST, MultiMNISTEasy
from needlework.data.needle_mnist import NeedleMNIST
from needlework.data.planted_bags import PlantedBags
from needlework.data.poisson import poisson_disk
from needlework.data.views import MultiResolutionViews, area_downsample

__all__ = [
    "DataSourceError",
    "DigitPool",
    "GaborTextures",
    "MegapixelMNIST",
    "MegapixelMNISTIPS",
    "MultiMNIST",
    "MultiMNISTEasy",
    "NeedleMNIST",
    "digit_pool",
    "pad_bags",
    "poisson_disk",
]
__all__ += ["MNISTBags", "MultiResolutionViews", "PlantedBags", "area_downsample"]
