"""Sampling, smoothing, entropy, cell → patch mapping and nested expectation."""

from __future__ import annotations

import math

import pytest
import torch

from needlework.ats import (
    attention_from_logits,
    cells_to_offsets,
    entropy,
    entropy_regulariser,
    nested_expectation,
    sample,
)


def _within_se(counts: torch.Tensor, probs: torch.Tensor, M: int, k: float = 5.0) -> bool:
    freq = counts / M
    se = (probs * (1 - probs) / M).sqrt() + 1e-12
    return bool(((freq - probs).abs() <= k * se + 1e-4).all())


def test_without_replacement_follows_sequential_order():
    """P(q1 = i, q2 = j) = a_i · a_j / (1 − a_i): the Gumbel-top-k order is the sampling order."""
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    M = 200_000
    idx, probs = sample(a.expand(M, 4), 2, replace=False, generator=gen)
    assert (idx[:, 0] != idx[:, 1]).all()
    torch.testing.assert_close(probs, a[idx])
    counts = torch.zeros(16, dtype=torch.float64).index_add_(
        0, idx[:, 0] * 4 + idx[:, 1], torch.ones(M, dtype=torch.float64)
    )
    exact = (a[:, None] * a[None, :] / (1 - a[:, None])).fill_diagonal_(0).flatten()
    assert _within_se(counts, exact, M)
    # and the reverse order is clearly wrong (the test has power)
    assert not _within_se(counts, exact.view(4, 4).T.flatten(), M)


def test_with_replacement_is_iid_categorical():
    gen = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
    M = 50_000
    idx, _ = sample(a.expand(M, 7), 3, replace=True, generator=gen)
    for k in range(3):
        counts = torch.bincount(idx[:, k], minlength=7).double()
        assert _within_se(counts, a, M)
    assert (idx[:, 0] == idx[:, 1]).any()  # repeats happen


def test_sample_zero_attention_never_drawn_and_reproducible():
    a = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]]).expand(100, 5)
    idx, _ = sample(a, 2, replace=False, generator=torch.Generator().manual_seed(5))
    assert set(idx.unique().tolist()) == {1, 2}
    i1, _ = sample(a, 2, replace=True, generator=torch.Generator().manual_seed(5))
    i2, _ = sample(a, 2, replace=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(i1, i2)


def test_sample_errors():
    a = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="without replacement"):
        sample(a, 5, replace=False)
    with pytest.raises(ValueError, match="attention"):
        sample(a[0], 2, replace=True)
    with pytest.raises(ValueError, match="positive int"):
        sample(a, 0, replace=True)
    with pytest.raises(TypeError, match="floating-point"):
        sample(torch.ones(2, 4, dtype=torch.long), 1, replace=True)


def test_attention_smoothing_bounds_and_gradient():
    logits = torch.tensor([[[50.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    a = attention_from_logits(logits, smoothing=0.01)
    assert a.shape == (1, 4)
    torch.testing.assert_close(a.sum(1), torch.ones(1))
    assert float(a.detach().min()) >= 0.01 / 4 - 1e-9
    a[0, 1].backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="smoothing"):
        attention_from_logits(logits, smoothing=1.0)


def test_entropy_and_regulariser_sign():
    uniform = torch.full((2, 8), 1 / 8)
    peaky = torch.tensor([[0.93] + [0.01] * 7] * 2)
    assert abs(float(entropy(uniform)[0]) - math.log(8)) < 1e-4
    assert float(entropy(peaky)[0]) < float(entropy(uniform)[0])
    # the loss term is lower for the spread-out attention: minimising it raises entropy
    assert float(entropy_regulariser(uniform, 0.1)) < float(entropy_regulariser(peaky, 0.1))
    logits = torch.zeros(1, 8, requires_grad=True)
    with torch.no_grad():
        logits[0, 0] = 2.0
    entropy_regulariser(torch.softmax(logits, 1), 1.0).backward()
    assert logits.grad[0, 0] > 0  # gradient descent lowers the dominant logit
    with pytest.raises(ValueError, match=">= 0"):
        entropy_regulariser(uniform, -1.0)


def test_cells_to_offsets_same_padding_centres_patches():
    # attention map = low view (same padding), high = 4x low: cell (r, c) covers high rows 4r..4r+3
    idx = torch.arange(12).view(1, 12)
    off = cells_to_offsets(idx, (3, 4), (3, 4), (12, 16), patch_size=2)
    rows, cols = torch.div(idx, 4, rounding_mode="floor"), idx % 4
    assert torch.equal(off[..., 0], cols * 4 + 1)  # centre 4c + 2, minus P/2
    assert torch.equal(off[..., 1], rows * 4 + 1)
    big = cells_to_offsets(torch.tensor([[0]]), (3, 4), (3, 4), (12, 16), patch_size=10)
    assert big.tolist() == [[[-3, -3]]]  # may leave the image: extraction pads with zeros


def test_cells_to_offsets_receptive_field_and_rectangular():
    # valid convs lose RF=2 low pixels: a 4-wide low view gives a 2-wide map covering low cols 1..2
    off = cells_to_offsets(
        torch.tensor([[0, 1]]), (1, 2), (3, 4), (30, 40), patch_size=(6, 10), receptive_field=2
    )
    # r = 10; step = (4 - 2) * 10 / 2 = 10; centre x = 10 + c*10 + 5
    # rows: r = 10, step = (3 - 2) * 10 = 10 → y centre 15
    assert off.tolist() == [[[10, 12], [20, 12]]]


def test_nested_expectation_unbiased_two_levels():
    """MC check of the nested estimator: value and gradients w.r.t. both levels' attention."""
    gen = torch.Generator().manual_seed(7)
    N0, N1, n0, n1, M = 6, 5, 3, 2, 100_000
    a0 = torch.softmax(torch.randn(N0, generator=gen, dtype=torch.float64) * 1.5, 0)
    a1 = torch.softmax(torch.randn(N0, N1, generator=gen, dtype=torch.float64) * 1.5, 1)
    f = torch.randn(N0, N1, generator=gen, dtype=torch.float64)
    a0r = a0.expand(M, N0).clone().requires_grad_()
    i0, _ = sample(a0r, n0, replace=False, generator=gen)  # (M, n0)
    a1r = a1.expand(M, N0, N1).clone().requires_grad_()
    a1_rows = a1r.gather(1, i0.unsqueeze(-1).expand(M, n0, N1)).reshape(M * n0, N1)
    i1, _ = sample(a1_rows, n1, replace=True, generator=gen)  # (M*n0, n1)
    feats = f[i0.repeat_interleave(n1, 1).reshape(M * n0, n1), i1].reshape(M, n0 * n1, 1)
    out = nested_expectation([a0r, a1_rows], [i0, i1], feats, replace=[False, True])
    out.sum().backward()
    out = out.detach()
    exact = (a0[:, None] * a1 * f).sum()
    assert abs(float(out.mean()) - float(exact)) < 5 * float(out.std()) / M**0.5 + 1e-4
    g0 = a0 * ((a1 * f).sum(1) - (a0 * (a1 * f).sum(1)).sum())  # logit-space gradient, level 0
    m0 = a0 * (a0r.grad.mean(0) - (a0 * a0r.grad.mean(0)).sum())
    assert float((m0 - g0).norm() / g0.norm()) < 0.03
    ga1 = a0[:, None] * f  # d/da1_ij of Σ a0_i a1_ij f_ij, then logit space per row
    g1 = a1 * (ga1 - (a1 * ga1).sum(1, keepdim=True))
    v1 = a1r.grad.mean(0)
    m1 = a1 * (v1 - (a1 * v1).sum(1, keepdim=True))
    assert float((m1 - g1).norm() / g1.norm()) < 0.03


def test_nested_expectation_errors():
    a0 = torch.full((2, 4), 0.25)
    i0 = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="equal length"):
        nested_expectation([a0], [], torch.ones(2, 2, 1), replace=True)
    with pytest.raises(ValueError, match="features"):
        nested_expectation([a0], [i0], torch.ones(2, 3, 1), replace=True)
    with pytest.raises(ValueError, match=r"attentions\[1\]"):
        nested_expectation([a0, a0], [i0, i0], torch.ones(2, 4, 1), replace=True)
