"""MNIST-bags generator and the LeNet pixel-bag wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needlework
from mil_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    pad_bags,
)
from needlework.data.mnist_bags import MNISTBags, grid_layout


def test_registered_and_deterministic():
    assert "mnist_bags" in needlework.list_datasets()
    a = needlework.create_dataset("mnist_bags", split="train", size=5, seed=3)
    b = MNISTBags(split="train", size=5, seed=3)
    for i in range(5):
        assert torch.equal(a[i]["bag"], b[i]["bag"])
    assert not torch.equal(MNISTBags(split="train", size=5, seed=4)[0]["bag"][:1], a[0]["bag"][:1]) or (
        len(MNISTBags(split="train", size=5, seed=4)[0]["bag"]) != len(a[0]["bag"])
    )


def test_item_contract_and_label_rule():
    ds = MNISTBags(split="test", size=40, seed=0)
    pool = ds.pool
    for i in range(40):
        item = ds[i]
        n = len(item["bag"])
        assert item["bag"].shape == (n, 1, 28, 28) and item["bag"].dtype == torch.float32
        assert float(item["bag"].min()) >= 0.0 and float(item["bag"].max()) <= 1.0
        assert item["coords"].shape == (n, 2) and item["coords"].dtype == torch.int64
        assert len(torch.unique(item["coords"], dim=0)) == n
        picks = ds.sample(i)
        assert (item["instance_labels"].numpy() == (pool.labels[picks] == 9)).all()
        assert item["label"] == int((pool.labels[picks] == 9).any())
    assert (ds.labels == np.array([ds[i]["label"] for i in range(40)])).all()


def test_bag_length_distribution_and_bounds():
    ds = MNISTBags(split="train", size=400, seed=0, mean_bag_length=50, std_bag_length=10, max_bag_length=60)
    lengths = np.array([len(ds.sample(i)) for i in range(400)])
    assert lengths.max() <= 60 and lengths.min() >= 1
    assert 45 < lengths.mean() < 52  # int() truncation of N(50, 10), clamped at 60
    small = MNISTBags(split="train", size=50, seed=0, mean_bag_length=1, std_bag_length=3)
    assert min(len(small.sample(i)) for i in range(50)) == 1


def test_unbalanced_matches_reference_rate_and_balanced_is_half():
    ds = MNISTBags(split="train", size=600, seed=1)
    # P(>= one 9 in a bag) at mean length ≈ 9.5 with 10 % nines: about 0.63
    assert 0.55 < ds.labels.mean() < 0.72
    bal = MNISTBags(split="train", size=600, seed=1, balanced=True, mean_bag_length=30, std_bag_length=5)
    assert 0.44 < bal.labels.mean() < 0.56


def test_splits_use_disjoint_digits_and_normalisation():
    train, test = MNISTBags(split="train", size=3), MNISTBags(split="test", size=3, normalize=True)
    assert train.pool.split == "train" and test.pool.split == "test"
    assert float(test[0]["bag"].min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="split"):
        MNISTBags(split="validation")
    with pytest.raises(ValueError, match="max_bag_length"):
        MNISTBags(min_bag_length=5, max_bag_length=2)
    with pytest.raises(IndexError):
        MNISTBags(size=3)[3]


def test_grid_layout():
    assert grid_layout(5).tolist() == [[0, 0], [28, 0], [56, 0], [0, 28], [28, 28]]


@pytest.mark.parametrize("head", ["abmil", "abmil.gated", "clam_sb", "dsmil", "transmil", "sparseconvmil"])
def test_lenet_mil_on_padded_pixel_bags(head):
    torch.manual_seed(0)
    kwargs = {"transmil": {"dim": 32, "heads": 4}, "sparseconvmil": {"cell_size": 28}}.get(head, {})
    model = needlework.create_model("lenet_mil", num_classes=2, mil=head, mil_kwargs=kwargs).eval()
    ds = MNISTBags(split="val", size=3, seed=2)
    batch = pad_bags([ds[i] for i in range(3)])
    assert batch["bag"].shape[:2] == batch["mask"].shape and batch["bag"].dim() == 5
    out = model.forward_batch(batch)
    assert out["logits"].shape == (3, 2)
    with torch.no_grad():
        for i in range(3):
            alone = model(ds[i]["bag"][None], ds[i]["coords"][None])
            torch.testing.assert_close(out["logits"][i : i + 1], alone["logits"], atol=1e-5, rtol=1e-4)
    loss, _ = model.compute_loss(model.train().forward_batch(batch), batch["label"])
    loss.backward()
    assert model.encoder.fc[0].weight.grad is not None


def test_lenet_mil_learns_mnist_bags():
    """A few epochs of the paper's setup separate bags with and without a 9 on held-out bags."""
    torch.manual_seed(0)
    model = needlework.create_model("lenet_mil", num_classes=2, mil="abmil.gated",
                                    mil_kwargs={"embed_dim": None, "attention_dim": 128})
    train = MNISTBags(split="train", size=96, seed=0, mean_bag_length=6, std_bag_length=1, balanced=True)
    test = MNISTBags(split="test", size=64, seed=0, mean_bag_length=6, std_bag_length=1, balanced=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    batches = [pad_bags([train[j] for j in range(i, i + 8)]) for i in range(0, 96, 8)]
    for _ in range(6):
        for batch in batches:
            loss, _ = model.compute_loss(model.forward_batch(batch), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    batch = pad_bags([test[i] for i in range(64)])
    probs = model.predict(bag=batch["bag"], coords=batch["coords"], mask=batch["mask"])["probs"][:, 1]
    labels = batch["label"].bool()
    # AUROC from ranks (probability a positive outranks a negative)
    auroc = (probs[labels][:, None] > probs[~labels][None, :]).float().mean()
    assert auroc > 0.8


def test_planted_bags_levels_are_depth_first_and_consistent():
    from needlework.data.planted_bags import PlantedBags

    ds = needlework.create_dataset("planted_bags", split="train", size=4, grid=5, levels=3, scale=2,
                                   tissue_fraction=0.5, dim=8)
    assert isinstance(ds, PlantedBags)
    item = ds[0]
    assert item["label"] == 1 and ds[3]["label"] == 0
    n0 = len(item["bag"])
    assert n0 == round(0.5 * 25)
    for level, tile in ((1, 512), (2, 256)):
        parents = item["coords" if level == 1 else "coords_1"]
        children = item[f"coords_{level}"].view(len(parents), 4, 2)
        offsets = children - parents[:, None]
        assert offsets.tolist() == [[[0, 0], [tile, 0], [0, tile], [tile, tile]]] * len(parents)
        assert item[f"bag_{level}"].shape == (n0 * 4**level, 8)
    # a parent is lesion iff one of its children is
    fine = item["instance_labels_2"].view(-1, 4).amax(1)
    assert torch.equal(item["instance_labels_1"], fine)
    assert int(item["instance_labels_2"].sum()) == 4  # the 2×2 lesion at the finest level
    assert ds[3]["instance_labels_2"].sum() == 0


def test_planted_bags_signal_lives_on_the_lesion_direction():
    ds = needlework.create_dataset("planted_bags", size=40, grid=8, levels=1, signal=3.0, dim=16)
    u = torch.from_numpy(ds.direction)
    proj_lesion, proj_other = [], []
    for i in range(20):  # positives
        item = ds[i]
        proj = item["bag"] @ u
        proj_lesion.append(proj[item["instance_labels"].bool()])
        proj_other.append(proj[~item["instance_labels"].bool()])
    assert torch.cat(proj_lesion).mean() == pytest.approx(3.0, abs=0.4)
    assert torch.cat(proj_other).mean() == pytest.approx(0.0, abs=0.1)


def test_pad_bag_levels_pads_each_level_and_builds_masks():
    from needlework.data.level_collate import pad_bag_levels

    ds = needlework.create_dataset("planted_bags", size=6, grid=4, levels=2, tissue_fraction=0.5, dim=4,
                                   seed=3)
    items = [ds[i] for i in (0, 5)]
    items[1]["mask_1"] = torch.ones(len(items[1]["bag_1"]), dtype=torch.bool)
    items[1]["mask_1"][0] = False
    items[0]["mask_1"] = torch.ones(len(items[0]["bag_1"]), dtype=torch.bool)
    batch = pad_bag_levels(items)
    n = [len(it["bag"]) for it in items]
    assert batch["bag"].shape == (2, max(n), 4) and batch["bag_1"].shape == (2, 4 * max(n), 4)
    assert batch["mask"].sum(1).tolist() == n
    assert batch["mask_1"].sum(1).tolist() == [4 * n[0], 4 * n[1] - 1]
    assert batch["coords_1"].dtype == torch.int64 and batch["label"].tolist() == [1, 0]
    with pytest.raises(KeyError, match="'bag'"):
        pad_bag_levels([{"x": torch.ones(2)}])
