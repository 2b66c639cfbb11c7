"""Tests of the IPS model (METHODS.md §6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from needlework import create_model, list_models
from needlework.models import IPS
from needlework.profiling import saved_tensor_bytes
from needlework.topk import extract_patches, grid_coords
from selection_toy import bars_batch, train_losses

SMALL = dict(
    num_classes=3,
    patch_size=8,
    n_keep=3,
    chunk_size=5,
    dim=16,
    n_heads=2,
    d_k=8,
    d_inner=32,
    encoder=dict(widths=(8, 16), strides=(1, 2)),
)


def test_registered_names_build():
    assert {"ips", "ips.megapixel_mnist"} <= set(list_models("ips*"))
    m = create_model("ips.megapixel_mnist", n_keep=20)
    assert m.tasks == ["majority", "max", "top", "multilabel"] and m.n_keep == 20
    assert m.task_multilabel["multilabel"] and not m.multilabel


@pytest.mark.parametrize("pos", ["1d", "2d", "none"])
def test_forward_contract(pos):
    m = IPS(**SMALL | dict(pos_encoding=pos))
    x = torch.rand(2, 1, 32, 40)  # 4 × 5 grid, N = 20
    for training in (True, False):
        m.train(training)
        out = m(x)
        assert out["logits"].shape == (2, 3)
        assert out["selected_idx"].shape == (2, 3)
        assert len(set(out["selected_idx"][0].tolist())) == 3
        assert torch.equal(out["selected_coords"], grid_coords((32, 40), 8)[out["selected_idx"]])
        att = out["attention"]
        assert att.shape == (2, 20)
        torch.testing.assert_close(att.sum(-1), torch.ones(2))
        mask = torch.zeros(2, 20, dtype=torch.bool).scatter(1, out["selected_idx"], True)
        assert (att[~mask] == 0).all()


def test_iterative_selection_equals_global_top_m_with_one_head_and_one_task():
    """With one head and one query the softmax ranking is set-independent: the scan is exact."""
    torch.manual_seed(0)
    m = IPS(**SMALL | dict(n_heads=1, shuffle=False, pos_encoding="2d")).eval()
    x = torch.rand(2, 1, 48, 48)  # N = 36, scanned in 3 + 7 chunks of 5
    coords = grid_coords((48, 48), 8)
    idx = m.select(x, coords)
    with torch.no_grad():
        all_idx = torch.arange(36).expand(2, 36)
        scores = m.aggregator.scores(m._embed(x, coords, all_idx))
    expected = scores.topk(3, dim=1).indices
    assert [set(r) for r in idx.tolist()] == [set(r) for r in expected.tolist()]


def test_selection_runs_without_gradient_in_eval_mode_and_restores_train_mode():
    m = IPS(**SMALL).train()
    modes = []
    m.encoder.register_forward_hook(lambda mod, a, o: modes.append((mod.training, torch.is_grad_enabled())))
    m(torch.rand(1, 1, 32, 32))  # N = 16: first M = 3, chunks 5, 5, 3, then the gradient pass
    assert modes[:-1] == [(False, False)] * (len(modes) - 1)
    assert modes[-1] == (True, True)
    assert m.encoder.training and m.aggregator.training


def test_gradient_only_through_kept_patches_and_memory_independent_of_n():
    """Saved activations and the largest encoder call do not grow with the number of patches N."""
    m = IPS(**SMALL).train()
    batch_sizes = []
    m.encoder.register_forward_hook(lambda mod, a, o: batch_sizes.append(a[0].shape[0]))
    saved = {}
    for side in (32, 96, 256):  # N = 16, 144, 1024
        batch_sizes.clear()
        x = torch.rand(2, 1, side, side)
        out, saved[side] = saved_tensor_bytes(lambda x=x: m(x))
        assert max(batch_sizes) <= 2 * max(m.n_keep, m.chunk_size)
        out["logits"].sum().backward()
    assert saved[32] == saved[96] == saved[256]


def test_fewer_patches_than_memory_keeps_all():
    m = IPS(**SMALL | dict(n_keep=10)).eval()
    out = m(torch.rand(1, 1, 16, 24))  # N = 6 < M
    assert sorted(out["selected_idx"][0].tolist()) == list(range(6))


def test_multitask_loss_averages_ce_and_bce():
    m = IPS(**SMALL | dict(num_classes=[3, 3, 4], tasks=["majority", "max", "multilabel"]))
    out = m(torch.rand(2, 1, 32, 32))
    assert set(out["task_logits"]) == {"majority", "max", "multilabel"}
    assert out["task_logits"]["multilabel"].shape == (2, 4)
    target = {
        "majority": torch.tensor([0, 2]),
        "max": torch.tensor([1, 1]),
        "multilabel": torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]]),
    }
    loss, parts = m.compute_loss(out, target)
    tl = out["task_logits"]
    expected = (
        F.cross_entropy(tl["majority"], target["majority"])
        + F.cross_entropy(tl["max"], target["max"])
        + F.binary_cross_entropy_with_logits(tl["multilabel"], target["multilabel"])
    ) / 3
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"task", "task_majority", "task_max", "task_multilabel"}
    loss.backward()
    # a plain tensor target trains the primary task
    loss_primary, _ = m.compute_loss(m(torch.rand(2, 1, 32, 32)), torch.tensor([0, 1]))
    assert loss_primary.ndim == 0


def test_single_multilabel_task_uses_bce():
    m = IPS(**SMALL | dict(tasks=["multilabel"], num_classes=10))
    assert m.multilabel
    out = m(torch.rand(2, 1, 32, 32))
    target = torch.zeros(2, 10).index_fill_(1, torch.tensor([3]), 1.0)
    loss, _ = m.compute_loss(out, target)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(out["logits"], target))


def test_kept_patches_are_the_image_patches():
    m = IPS(**SMALL).eval()
    seen = []
    m.encoder.register_forward_hook(lambda mod, a, o: seen.append(a[0]))
    x = torch.rand(2, 1, 32, 32)
    out = m(x)
    torch.testing.assert_close(seen[-1], extract_patches(x, out["selected_coords"], 8).flatten(0, 1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pos_encoding="rope"), "pos_encoding"),
        (dict(n_keep=0), "n_keep"),
        (dict(num_classes=[3, 3], tasks=["a"]), "num_classes has 2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IPS(**SMALL | kwargs)


def test_dict_target_without_known_task_raises():
    m = IPS(**SMALL)
    with pytest.raises(KeyError, match="predicts"):
        m.compute_loss(m(torch.rand(1, 1, 32, 32)), {"other": torch.tensor([0])})


def test_training_finds_the_needles_on_a_toy_task():
    """Four bars among 64 patches, M = 8 kept: the scan learns to keep bars and classify them."""
    torch.manual_seed(0)
    m = IPS(
        num_classes=2,
        patch_size=8,
        n_keep=8,
        chunk_size=16,
        dim=32,
        n_heads=2,
        d_k=8,
        d_inner=64,
        encoder=dict(widths=(16, 32), strides=(1, 2)),
        dropout=0.0,
    )
    batches = [(dict(x_high=x), y) for x, y in (bars_batch(16, seed=s, n_bars=4) for s in range(40))]
    losses = train_losses(m, batches, steps=40)
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    x, y = bars_batch(100, seed=99, n_bars=4)
    out = m.predict(x_high=x)
    assert (out["logits"].argmax(-1) == y).float().mean() > 0.8
    bright = extract_patches(x, out["selected_coords"], 8).amax(dim=(2, 3, 4)) > 0.5
    assert bright.float().mean() > 0.4  # kept patches are mostly bars (4 of 64 = 6 % at random)


@pytest.mark.parametrize(
    "patch, stride, hw, low", [(32, 32, (200, 296), (50, 74)), (16, 8, (96, 64), (13, 9))]
)
def test_grid_tissue_candidates_equal_the_whole_grid_test(patch, stride, hw, low):
    """Same coordinates, same order as tissue_candidates over grid_coords; the blank-slide fallback too."""
    from needlework.models.ips import grid_tissue_candidates, tissue_candidates

    g = torch.Generator().manual_seed(0)
    for density in (0.02, 0.3, 0.0):
        tissue = (torch.rand(2, 1, *low, generator=g) < density).to(torch.uint8)
        whole = tissue_candidates(grid_coords(hw, patch, stride), tissue, hw, patch, minimum=3)
        fast = grid_tissue_candidates(hw, patch, stride, tissue, minimum=3)
        assert torch.equal(fast, whole), density
    with pytest.raises(ValueError, match="smaller than patch_size"):
        grid_tissue_candidates((10, 10), 16, 16, tissue)
