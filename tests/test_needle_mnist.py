"""needle-MNIST invariants, checked with a digit pool whose digits can be counted from the pixels."""

import numpy as np
import pytest

from needlework.data import NeedleMNIST
from needlework.data import needle_mnist as nm
from needlework.data.mnist import DigitPool

TARGET_VALUE, CLUTTER_VALUE = 100, 1  # a "3" paints 100 per pixel, any other digit 1


@pytest.fixture
def counting_pool(monkeypatch):
    """Every digit is a solid 28×28 block; 3s are 100, others 1 (sums stay below the 255 clip)."""
    labels = np.repeat(np.arange(10), 5)
    images = np.where(labels[:, None, None] == 3, TARGET_VALUE, CLUTTER_VALUE) * np.ones((1, 28, 28))
    pool = DigitPool(images.astype(np.uint8), labels, "train", "counting")
    monkeypatch.setattr(nm, "digit_pool", lambda split, mnist_dir=None: pool)
    return pool


def _counts(image):
    """(#targets, #clutter) from the painted mass."""
    mass = int(round(float(image.sum()) * 255))
    n_target, rest = divmod(mass, TARGET_VALUE * 784)
    return n_target, rest // (CLUTTER_VALUE * 784)


@pytest.mark.parametrize("canvas", [64, 128, 256])
def test_object_counts_and_boxes(counting_pool, canvas):
    ds = NeedleMNIST(canvas=canvas, split="train", size=40, seed=3)
    n = nm.CLUTTER_TABLE[canvas]
    for i in range(len(ds)):
        item = ds[i]
        image, label, boxes = item["image"], item["label"], item["boxes"]
        assert image.shape == (1, canvas, canvas) and image.dtype.is_floating_point
        assert image.min() >= 0 and image.max() <= 1
        if label == 1:
            assert _counts(image) == (1, n)
            (x0, y0, x1, y1) = boxes[0].tolist()
            assert boxes.shape == (1, 4) and x1 - x0 == 28 and y1 - y0 == 28
            assert x0 // 64 == (x1 - 1) // 64 and y0 // 64 == (y1 - 1) // 64  # inside one 64-px cell
            crop = image[0, int(y0) : int(y1), int(x0) : int(x1)]
            assert float(crop.min()) * 255 >= TARGET_VALUE - 0.5  # the needle is where the box says
        else:
            assert _counts(image) == (0, n + 1)  # same number of objects as a positive
            assert boxes.shape == (0, 4)


def test_o2i_matches_table():
    for canvas, o2i in [(64, 0.191), (128, 0.0479), (256, 0.0120), (512, 0.00299)]:
        assert NeedleMNIST(canvas=canvas, size=2).o2i == pytest.approx(o2i, rel=0.01)


def test_deterministic_given_seed_and_index():
    a = NeedleMNIST(canvas=128, split="val", size=10, seed=1)
    b = NeedleMNIST(canvas=128, split="val", size=10, seed=1)
    c = NeedleMNIST(canvas=128, split="val", size=10, seed=2)
    for i in (0, 7):
        assert np.array_equal(a[i]["image"], b[i]["image"])
        assert not np.array_equal(a[i]["image"], c[i]["image"])
    assert np.array_equal(a[3]["image"], a[3]["image"])  # no hidden state between calls


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_class_balance_and_oversampling(fraction):
    ds = NeedleMNIST(canvas=64, size=200, positive_fraction=fraction)
    labels = np.array([ds[i]["label"] for i in range(len(ds))])
    assert labels.mean() == pytest.approx(fraction) and np.array_equal(labels, ds.labels)
    over = NeedleMNIST(canvas=64, size=200, positive_fraction=fraction, oversample=True)
    assert over.labels.mean() == pytest.approx(0.5)
    assert len(over) == 2 * max(ds.n_positive, ds.n_negative)
    # oversampled items are repeats of real ones, not new images
    images = {over[i]["image"].numpy().tobytes() for i in range(len(over))}
    assert len(images) == len(ds)


def test_default_size_is_one_pair_per_target_digit():
    ds = NeedleMNIST(canvas=64, split="test", duplicates=2)
    n_threes = len(ds.pool.indices_of(3))
    assert len(ds) == 2 * n_threes * 2 and ds.labels.mean() == 0.5


def test_target_digits_come_from_the_split_pool():
    ds = NeedleMNIST(canvas=64, split="test", size=20, n_clutter=0)
    threes = ds.pool.images[ds.pool.indices_of(3)]
    for i in range(10):  # positives: with no clutter the crop is exactly one test-pool "3"
        item = ds[i]
        x0, y0, x1, y1 = (int(v) for v in item["boxes"][0])
        crop = np.rint(item["image"][0, y0:y1, x0:x1].numpy() * 255).astype(np.uint8)
        assert any(np.array_equal(crop, t) for t in threes)


def test_uniform_placement_and_large_canvas_boxes():
    ds = NeedleMNIST(canvas=2048, size=2, target_placement="uniform")
    item = ds[0]
    assert item["image"].shape == (1, 2048, 2048) and item["boxes"].shape == (1, 4)
    assert np.array_equal(ds.needle_boxes(0), ds.generate(0)[1])


def test_cache_gives_identical_images(tmp_path, monkeypatch):
    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path))
    plain = NeedleMNIST(canvas=64, size=12, seed=5)
    cached = NeedleMNIST(canvas=64, size=12, seed=5, cache=True)
    assert list((tmp_path / "needle_mnist").glob("*.npy"))
    for i in range(12):
        assert np.array_equal(plain[i]["image"], cached[i]["image"])
        assert np.array_equal(plain[i]["boxes"], cached[i]["boxes"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(canvas=100), "multiple of the cell"),
        (dict(canvas=128, n_clutter=-1), "n_clutter must be a non-negative"),
        (dict(canvas=128, positive_fraction=1.5), "positive_fraction"),
        (dict(canvas=128, split="holdout"), "split must be one of"),
        (dict(canvas=16), "at least 29"),
        (dict(canvas=128, size=0), "size must be positive"),
        (dict(canvas=128, target_placement="corner"), "target_placement"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeedleMNIST(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError, match="out of range"):
        NeedleMNIST(canvas=64, size=4)[4]


class _FixedDraws:
    """Stands in for a numpy Generator: ``uniform`` returns the given values in order."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, low, high):
        return self.values.pop(0)


def test_digit_warp_identity_and_right_angle():
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[3:9, 14:25] = 200  # an asymmetric blob: a wrong centre or direction would show
    digit[20:26, 5:8] = 90
    identity = nm._DigitWarp(_FixedDraws(0.0, 1.0, 0.0))(digit)
    assert np.array_equal(identity, digit)
    quarter_turn = nm._DigitWarp(_FixedDraws(90.0, 1.0, 0.0))(digit)
    assert np.array_equal(quarter_turn, np.rot90(digit))  # counter-clockwise, as displayed


def test_augment_keeps_layout_labels_and_determinism():
    plain = NeedleMNIST(canvas=128, split="train", size=12, seed=5)
    aug = NeedleMNIST(canvas=128, split="train", size=12, seed=5, augment=True)
    changed = 0
    for i in range(len(plain)):
        p, a = plain[i], aug[i]
        assert p["label"] == a["label"] and np.array_equal(p["boxes"], a["boxes"])
        assert np.array_equal(a["image"], aug[i]["image"])  # deterministic per index
        changed += not np.array_equal(p["image"], a["image"])
        # scale 0.9-1.1 changes each digit's ink by at most its area factor (0.81-1.21), up to clipping
        assert 0.7 < float(a["image"].sum()) / float(p["image"].sum()) < 1.3
    assert changed == len(plain)
    assert aug.meta()["augment"] and not plain.meta()["augment"]
