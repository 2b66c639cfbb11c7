"""Datasets and digit sources. Importing this package registers every built-in dataset."""

from needlework.data.mnist import DataSourceError, DigitPool, digit_pool

__all__ = ["DataSourceError", "DigitPool", "digit_pool"]

from needlework.data.needle_mnist import NeedleMNIST

__all__ += ["NeedleMNIST"]

from needlework.data.gabor import GaborTextures  # noqa: E402
from needlework.data.mnist_hard import MultiMNIST, MultiMNISTEasy  # noqa: E402
from needlework.data.poisson import poisson_disk  # noqa: E402

__all__ += ["GaborTextures", "MultiMNIST", "MultiMNISTEasy", "poisson_disk"]
