"""Tests of the DPS model (METHODS.md §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from needlework import create_model, list_models
from needlework.models import DPS
from needlework.topk import cell_coords, extract_patches
from selection_toy import bars_batch, train_losses

SMALL = dict(
    num_classes=3,
    grid=4,
    patch_size=8,
    k=2,
    n_samples=16,
    dim=16,
    n_heads=2,
    encoder=dict(widths=(8, 16), strides=(1, 2)),
)


def test_registered_names_build():
    assert {"dps", "dps.megapixel_mnist"} <= set(list_models("dps*"))
    assert isinstance(create_model("dps", **SMALL), DPS)
    m = create_model("dps.megapixel_mnist", k=3)
    assert m.k == 3 and m.grid == (30, 30) and m.topk.n_samples == 500


@pytest.mark.parametrize(
    "aggregation, pos",
    [
        ("transformer", "learned"),
        ("transformer", "sinusoidal"),
        ("transformer", "none"),
        ("max", "none"),
        ("mean", "none"),
    ],
)
def test_forward_contract_in_train_and_eval(aggregation, pos):
    m = DPS(**SMALL | dict(aggregation=aggregation, pos_encoding=pos))
    x_low, x_high = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 32, 48)
    for training in (True, False):
        m.train(training)
        out = m(x_low, x_high)
        assert out["logits"].shape == (2, 3)
        support, weights = out["indicator_support"], out["indicator_weights"]
        assert weights.shape == (2, 2, support.shape[1]) and support.shape[1] <= 16
        at = support.unsqueeze(1).expand(-1, 2, -1)
        dense = torch.zeros(2, 2, 16).scatter_add_(2, at, weights.detach())
        torch.testing.assert_close(dense.sum(-1), torch.ones(2, 2))
        assert dense.max() <= 1 + 1e-6 and (dense.sum(1) <= 1 + 1e-6).all()
        torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2))
        assert out["selected_idx"].shape == (2, 2)
        assert (out["selected_idx"].diff(dim=1) > 0).all()  # sorted by position
        expected = cell_coords((32, 48), (4, 4), 8)[out["selected_idx"]]
        assert torch.equal(out["selected_coords"], expected)


def test_eval_uses_the_hard_top_k_patches():
    torch.manual_seed(0)
    m = DPS(**SMALL | dict(aggregation="mean")).eval()
    x_low, x_high = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 32, 32)
    seen = {}

    def hook(mod, args, out):
        seen["patches"] = args[0]

    m.encoder.register_forward_hook(hook)
    out = m(x_low, x_high)
    expected = extract_patches(x_high, out["selected_coords"], 8).flatten(0, 1)
    torch.testing.assert_close(seen["patches"], expected)
    assert torch.equal(out["indicator_support"], out["selected_idx"])
    assert torch.equal(out["indicator_weights"], torch.eye(2).expand(2, 2, 2))


def test_gradient_reaches_the_scorer_only_through_the_indicators_in_training():
    m = DPS(**SMALL)
    out = m(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 32, 32))
    F.cross_entropy(out["logits"], torch.tensor([0, 2])).backward()
    grads = [p.grad for p in m.scorer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert m.pos_table.grad is not None


def test_missing_low_view_is_an_area_downsample():
    m = DPS(**SMALL | dict(low_scale=0.5)).eval()
    x_high = torch.rand(1, 1, 32, 32)
    a = m(x_high=x_high)
    b = m(F.interpolate(x_high, scale_factor=0.5, mode="area"), x_high)
    torch.testing.assert_close(a["logits"], b["logits"])


def test_entropy_regulariser_is_negative_weighted_entropy():
    m = DPS(**SMALL | dict(entropy_weight=0.1))
    out = m(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 32, 32))
    p = out["attention"]
    expected = -0.1 * (-(p * torch.log(p + 1e-6)).sum(-1).mean())
    torch.testing.assert_close(out["aux_loss"]["entropy"], expected)
    total, parts = m.compute_loss(out, torch.tensor([0, 1]))
    torch.testing.assert_close(total, parts["task"] + parts["entropy"])


def test_multilabel_uses_bce():
    m = DPS(**SMALL | dict(multilabel=True))
    out = m(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 32, 32))
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss, _ = m.compute_loss(out, target)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(out["logits"], target))


def test_sigma_schedule_advances_with_training_forwards():
    m = DPS(**SMALL | dict(sigma=0.1, sigma_schedule="linear", total_steps=2))
    for _ in range(2):
        m(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 32, 32))
    assert m.topk.sigma == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(aggregation="sum"), "aggregation"),
        (dict(k=17), "k must be"),
        (dict(pos_encoding="rope"), "pos_encoding"),
        (dict(entropy_weight=-1.0), "entropy_weight"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPS(**SMALL | kwargs)


def test_wrong_channels_raise_naming_the_input():
    with pytest.raises(ValueError, match="x_high"):
        DPS(**SMALL)(torch.rand(1, 1, 16, 16), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="needs x_high"):
        DPS(**SMALL)(torch.rand(1, 1, 16, 16))


def test_training_finds_the_needle_on_a_toy_task():
    """One bar among 64 cells; σ decays linearly from 1 (exploration) to 0.05 over the 40 steps."""
    torch.manual_seed(0)
    m = DPS(
        num_classes=2,
        grid=8,
        patch_size=8,
        k=2,
        n_samples=32,
        sigma=1.0,
        sigma_schedule="linear",
        total_steps=40,
        sigma_end=0.05,
        low_scale=0.5,
        dim=32,
        n_heads=2,
        encoder=dict(widths=(16, 32), strides=(1, 2)),
        aggregation="max",
    )
    batches = [(dict(x_high=x), y) for x, y in (bars_batch(16, seed=s) for s in range(40))]
    losses = train_losses(m, batches, steps=40)
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    x, y = bars_batch(100, seed=99)  # held-out images, hard top-K at evaluation
    accuracy = (m.predict(x_high=x)["logits"].argmax(-1) == y).float().mean()
    assert accuracy > 0.8
