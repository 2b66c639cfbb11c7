"""MNIST-hard / MNIST-easy / Gabor-noise generators and Poisson-disk sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needlework
from needlework.data import GaborTextures, MultiMNIST, MultiMNISTEasy, poisson_disk
from needlework.data.gabor import gabor_kernel


def pairwise_min(points: np.ndarray) -> float:
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    d[np.diag_indices(len(points))] = np.inf
    return float(d.min())


@pytest.mark.parametrize("radius", [5.0, 14.0])
def test_poisson_disk_spacing_bounds_and_determinism(radius):
    pts = poisson_disk((10, 10, 70, 70), radius, np.random.default_rng(3))
    assert pts.shape[1] == 2 and len(pts) >= 9
    assert pairwise_min(pts) >= radius
    assert (pts >= 10).all() and (pts < 70).all()
    np.testing.assert_array_equal(pts, poisson_disk((10, 10, 70, 70), radius, np.random.default_rng(3)))
    # maximality (Bridson): no point of a fine grid is farther than 2r from every sample
    g = np.stack(np.meshgrid(np.linspace(10, 69.9, 40), np.linspace(10, 69.9, 40)), -1).reshape(-1, 2)
    assert np.linalg.norm(g[:, None] - pts[None], axis=-1).min(1).max() < 2 * radius
    with pytest.raises(ValueError, match="radius"):
        poisson_disk((0, 0, 1, 1), 0.0, np.random.default_rng(0))


def test_mnist_hard_item_contract():
    ds = needlework.create_dataset("mnist_hard", split="train", size=6)
    assert isinstance(ds, MultiMNIST) and len(ds) == 6
    for i in range(6):
        item = ds[i]
        img, boxes, labels, kp = item["image"], item["boxes"], item["box_labels"], item["keypoints"]
        assert img.shape == (1, 80, 80) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0 and img.max() > 0.5
        assert boxes.shape == (9, 4) and labels.shape == (9,) and (labels >= 0).all() and (labels < 10).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) == 20).all()
        assert (boxes >= 0).all() and (boxes <= 80).all()
        torch.testing.assert_close(kp[:, :2], (boxes[:, :2] + boxes[:, 2:]) / 2)
        assert torch.equal(item["label"], torch.bincount(labels, minlength=10))
        # the ink lies inside the union of the boxes
        mask = torch.zeros(80, 80, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes.long().tolist():
            mask[y0:y1, x0:x1] = True
        assert img[0][~mask].abs().max() == 0
        # Poisson-disk spacing up to the rounding of the top-left corner (≤ 0.5 px per axis)
        assert pairwise_min(kp[:, :2].numpy()) >= 14.0 - np.sqrt(2)


def test_mnist_hard_is_deterministic_and_seed_dependent():
    a, b = MultiMNIST("val", seed=1, size=3), MultiMNIST("val", seed=1, size=3)
    for key in ("image", "boxes", "box_labels"):
        assert torch.equal(a[2][key], b[2][key])
    assert not torch.equal(a[2]["image"], MultiMNIST("val", seed=2, size=3)[2]["image"])
    assert not torch.equal(a[2]["image"], MultiMNIST("test", seed=1, size=3)[2]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_mnist_hard_variable_count_pads_and_collates():
    ds = MultiMNIST("train", size=8, n_digits=[3, 6], canvas=64, digit_size=16, min_distance=10)
    counts = [int((ds[i]["box_labels"] >= 0).sum()) for i in range(8)]
    assert min(counts) >= 3 and max(counts) <= 6 and len(set(counts)) > 1
    item = next(i for i in (ds[j] for j in range(8)) if (i["box_labels"] < 0).any())
    pad = item["box_labels"] < 0
    assert (item["boxes"][pad] == 0).all()
    assert int(item["label"].sum()) == int((~pad).sum())
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 1, 64, 64) and batch["boxes"].shape == (4, 6, 4)


def test_mnist_hard_scale_jitter_and_rgb():
    ds = MultiMNIST("train", size=2, scale_jitter=[8, 12], rgb=True)
    item = ds[0]
    assert item["image"].shape == (3, 80, 80)
    sides = item["boxes"][:, 2] - item["boxes"][:, 0]
    assert (sides >= 16).all() and (sides <= 24).all()
    torch.testing.assert_close(item["keypoints"][:, 2], sides / 2)


def test_mnist_hard_errors():
    with pytest.raises(ValueError, match="split"):
        MultiMNIST("training")
    with pytest.raises(ValueError, match="n_digits"):
        MultiMNIST("train", n_digits=[5, 2])
    with pytest.raises(RuntimeError, match="min_distance"):
        MultiMNIST("train", size=1, n_digits=9, min_distance=40, max_retries=2)[0]
    with pytest.raises(IndexError):
        MultiMNIST("train", size=1)[1]


def test_mnist_easy_sorted_on_perturbed_grid():
    ds = needlework.create_dataset("mnist_easy", split="test", size=5)
    assert isinstance(ds, MultiMNISTEasy)
    for i in range(5):
        item = ds[i]
        labels = item["box_labels"]
        assert torch.equal(labels, labels.sort().values)
        cell = 80 / 3
        grid = torch.tensor([[(j % 3 + 0.5) * cell, (j // 3 + 0.5) * cell] for j in range(9)])
        # within 4 std (std = cell / 8) plus rounding and the clamp to the margin
        assert ((item["keypoints"][:, :2] - grid).abs() <= 4 * cell / 8 + 1).all()


def test_gabor_textures_are_sums_of_kernels_at_the_impulses():
    ds = needlework.create_dataset("gabor_noise", split="train", size=4, n_impulses=[2, 4])
    assert isinstance(ds, GaborTextures)
    for i in range(4):
        item = ds[i]
        img, boxes, labels = item["image"][0], item["boxes"], item["box_labels"]
        assert img.shape == (64, 64) and img.min() >= 0 and img.max() <= 1
        rebuilt = torch.zeros(64, 64)
        for (x0, y0, x1, y1), lab in zip(boxes.long().tolist(), labels.tolist()):
            if lab < 0:
                continue
            assert x1 - x0 == 16 and y1 - y0 == 16
            rebuilt[y0:y1, x0:x1] += torch.from_numpy(gabor_kernel(16, 16 / 5, 6.0, lab * np.pi / 4))
        torch.testing.assert_close(img, rebuilt.clamp(0, 1))
        assert torch.equal(item["label"], torch.bincount(labels[labels >= 0], minlength=4))
    assert torch.equal(ds[1]["image"], GaborTextures("train", size=4, n_impulses=[2, 4])[1]["image"])


def test_gabor_kernel_orientation():
    k0 = gabor_kernel(16, 3.0, 6.0, 0.0)  # θ = 0: the carrier varies along x; θ = π/2 is the transpose
    k90 = gabor_kernel(16, 3.0, 6.0, np.pi / 2)
    np.testing.assert_allclose(k90, k0.T, atol=1e-6)
    assert k0.max() == pytest.approx(1.0)
