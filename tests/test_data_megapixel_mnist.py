"""Megapixel MNIST generators: counts, boxes, determinism, split hygiene, paint order, low views, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import needlework
from needlework.data import MegapixelMNIST, MegapixelMNISTIPS, digit_pool
from needlework.data.megapixel_mnist import noise_patterns


@pytest.fixture(scope="module")
def ats():
    return MegapixelMNIST("train", size=12, preset="ci", n_noise=8)


@pytest.fixture(scope="module")
def ips():
    return MegapixelMNISTIPS("test", size=12, preset="ci", n_noise=8)


def test_registered_names_and_keys(ats):
    assert isinstance(needlework.create_dataset("megapixel_mnist", split="val", preset="ci"), MegapixelMNIST)
    ds = needlework.create_dataset("megapixel_mnist_ips", split="val", preset="ci", task="top")
    assert isinstance(ds, MegapixelMNISTIPS) and ds.task == "top"
    item = ats[0]
    assert {"x_high", "x_low", "label", "labels", "boxes", "box_labels"} <= set(item)
    assert item["x_high"].shape == (1, 256, 256) and item["x_high"].dtype == torch.float32
    assert item["x_low"].shape == (1, 30, 30) and item["x_low"].dtype == torch.float32
    assert float(item["x_high"].min()) >= 0 and float(item["x_high"].max()) <= 1
    assert len(ats) == 12 and len(MegapixelMNIST("test", preset="ci")) == 100


def test_counts_labels_and_boxes(ats):
    for i in range(len(ats)):
        item = ats[i]
        boxes, labels = item["boxes"], item["box_labels"]
        assert boxes.shape == (5, 4) and boxes.dtype == torch.float32 and labels.shape == (5,)
        assert (labels[:3] == item["label"]).all() and (labels[3:] != item["label"]).all()
        assert (boxes[:, 2] - boxes[:, 0] == 28).all() and (boxes[:, 3] - boxes[:, 1] == 28).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 256).all()
        for a in range(5):  # digit boxes never overlap
            for b in range(a):
                ox = min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0])
                oy = min(boxes[a, 3], boxes[b, 3]) - max(boxes[a, 1], boxes[b, 1])
                assert ox <= 0 or oy <= 0


def test_deterministic_and_seed_dependent(ats):
    again = MegapixelMNIST("train", size=12, preset="ci", n_noise=8)
    for i in (0, 5):
        a, b = ats[i], again[i]
        assert torch.equal(a["x_high"], b["x_high"]) and torch.equal(a["x_low"], b["x_low"])
        assert torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(ats[0]["x_high"], ats[1]["x_high"])
    other_seed = MegapixelMNIST("train", seed=1, size=12, preset="ci", n_noise=8)
    assert not torch.equal(ats[0]["x_high"], other_seed[0]["x_high"])
    assert not np.array_equal(ats.patterns, other_seed.patterns)


def test_split_hygiene_digits_come_from_own_pool(ips):
    own = {digit.tobytes() for digit in digit_pool("test").images}
    others = {d.tobytes() for s in ("train", "val") for d in digit_pool(s).images}
    for i in range(6):
        item = ips[i]
        canvas = np.rint(item["x_high"][0].numpy() * 255).astype(np.uint8)
        for x0, y0, _, _ in item["boxes"].int().tolist():
            block = canvas[y0 : y0 + 28, x0 : x0 + 28].tobytes()  # IPS paints digits last: intact
            assert block in own and block not in others
    train = MegapixelMNISTIPS("train", size=2, preset="ci", n_noise=8)
    assert not np.array_equal(train.patterns, ips.patterns)  # noise patterns are per split too


def test_ats_paint_order_noise_erases_digits():
    ds = MegapixelMNIST("train", size=30, preset="ci", n_noise=40)
    erased = [ds[i]["meta"]["erased_target_fraction"] for i in range(30)]
    assert max(erased) > 0  # noise painted after digits erases ink
    lay = ds.layout(3)
    canvas = np.rint(ds[3]["x_high"][0].numpy() * 255).astype(np.uint8)
    r, c = lay.noise_positions[-1]
    assert np.array_equal(canvas[r : r + 28, c : c + 28], np.floor(ds.patterns[lay.noise_ids[-1]] * 255))
    ips = MegapixelMNISTIPS("train", size=30, preset="ci", n_noise=40)
    assert all(ips[i]["meta"]["erased_target_fraction"] == 0 for i in range(30))
    assert ips.n_noise_patterns == 40
    assert ((lay.noise_positions >= 28) & (lay.noise_positions < 256 - 28)).all()


def test_noise_patterns_are_two_corner_strokes():
    pats = noise_patterns(np.random.default_rng(0), 50)
    assert pats.shape == (50, 28, 28)
    vals = pats[pats > 0]
    assert vals.min() >= 0.8 and vals.max() <= 1.0
    assert (pats[:, 0, 0] > 0).all()  # stroke A always starts at the top-left corner
    assert ((pats[:, 0, 27] > 0) | (pats[:, 0, 0] > 0)).all()
    assert (pats > 0).sum(axis=(1, 2)).min() >= 28  # at least one full stroke


def test_low_view_downsample_equals_area_resize():
    ds = MegapixelMNIST("val", size=3, preset="ci", low_view="downsample", low_scale=0.25)
    item = ds[1]
    ref = F.interpolate(item["x_high"][None], size=(64, 64), mode="area")[0]
    torch.testing.assert_close(item["x_low"], ref)


def test_rendered_low_view_matches_the_high_view():
    """The rendered view (objects shrunk to 3 px, pasted at floor positions) is the downsampled high view
    up to sub-pixel shifts: correlated once both are blurred by 3×3, with (3 / 3.36)² ≈ 0.8 of its mass."""
    ds = MegapixelMNIST("val", size=4, preset="small", n_noise=0)  # 500² → 60², no noise

    def blur(x):
        return F.avg_pool2d(x[None, None], 3, 1, 1)[0, 0]

    for i in range(4):
        item = ds[i]
        low, down = item["x_low"][0], F.interpolate(item["x_high"][None], size=(60, 60), mode="area")[0, 0]
        corr = torch.corrcoef(torch.stack([blur(low).flatten(), blur(down).flatten()]))[0, 1]
        assert corr > 0.7
        assert 0.6 < float(low.sum() / down.sum()) < 0.95
        for x0, y0, _, _ in item["boxes"].tolist():  # each digit is visible where its box maps
            r, c = int(y0 * 0.12), int(x0 * 0.12)
            assert low[r : r + 3, c : c + 3].sum() > 0.05


def test_ips_tasks(ips):
    for i in range(len(ips)):
        item = ips[i]
        labels, boxes, classes = item["labels"], item["boxes"], item["box_labels"]
        assert labels["majority"] == int(torch.mode(classes).values) == item["label"]
        assert labels["max"] == int(classes.max())
        assert labels["top"] == int(classes[int(torch.argmin(boxes[:, 1]))])
        multi = torch.zeros(10)
        multi[classes] = 1
        assert torch.equal(labels["multilabel"], multi)
    multi_ds = MegapixelMNISTIPS("test", size=2, preset="ci", task="multilabel")
    assert multi_ds[0]["label"].shape == (10,) and multi_ds[0]["label"].dtype == torch.float32
    assert isinstance(MegapixelMNISTIPS("test", size=2, preset="ci", task="max")[0]["label"], int)


def test_collates_in_a_dataloader(ips):
    batch = next(iter(torch.utils.data.DataLoader(ips, batch_size=4)))
    assert batch["x_high"].shape == (4, 1, 256, 256) and batch["x_low"].shape == (4, 1, 64, 64)
    assert batch["labels"]["multilabel"].shape == (4, 10) and batch["boxes"].shape == (4, 5, 4)


def test_errors():
    with pytest.raises(ValueError, match="split"):
        MegapixelMNIST("dev")
    with pytest.raises(ValueError, match="task"):
        MegapixelMNISTIPS("train", task="multi")
    with pytest.raises(ValueError, match="too small"):
        MegapixelMNIST("train", canvas=50)
    with pytest.raises(ValueError, match="paint_order"):
        MegapixelMNIST("train", paint_order="random")
    with pytest.raises(IndexError):
        MegapixelMNIST("train", size=2, preset="ci").layout(2)
