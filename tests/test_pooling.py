import math

import pytest
import torch

from needlework.models.pooling import (
    AttentionPool,
    create_pooling,
    flatten_map,
    logsumexp_pool,
    masked_softmax,
    max_pool,
    mean_pool,
)

X = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 5.0]]])  # (B=1, N=3, D=2)


def test_max_mean_lse_hand_values():
    assert max_pool(X)[0].tolist() == [[3.0, 5.0]]
    assert torch.allclose(mean_pool(X)[0], torch.tensor([[4 / 3, 2.0]]))
    lse = [math.log(math.e**1 + math.e**3 + 1), math.log(math.e**2 + math.e**-1 + math.e**5)]
    assert torch.allclose(logsumexp_pool(X)[0], torch.tensor([lse]))
    lme = [v - math.log(3) for v in lse]
    assert torch.allclose(logsumexp_pool(X, normalise=True)[0], torch.tensor([lme]))
    r = 2.0
    lse_r = [math.log(math.e ** (r * 1) + math.e ** (r * 3) + 1) / r]
    assert logsumexp_pool(X, r=r)[0][0, 0].item() == pytest.approx(lse_r[0], rel=1e-6)


def test_max_weights_mark_winners():
    _, w = max_pool(X)
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 0.5]]))


def test_attention_pool_hand_values():
    pool = AttentionPool(dim=2, hidden=1)
    with torch.no_grad():
        pool.attention.tanh_branch[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        pool.attention.tanh_branch[0].bias.zero_()
        pool.attention.score.weight.fill_(2.0)
        pool.attention.score.bias.zero_()
    pooled, a = pool(X)
    scores = 2 * torch.tanh(X[0, :, 0])
    expected_a = torch.softmax(scores, 0)
    assert torch.allclose(a[0], expected_a)
    assert torch.allclose(pooled[0], (expected_a[:, None] * X[0]).sum(0))


def test_gated_attention_hand_values():
    pool = AttentionPool(dim=2, hidden=1, gated=True)
    with torch.no_grad():
        for branch in (pool.attention.tanh_branch, pool.attention.gate_branch):
            branch[0].weight.copy_(torch.tensor([[0.0, 1.0]]))
            branch[0].bias.zero_()
        pool.attention.score.weight.fill_(1.0)
        pool.attention.score.bias.zero_()
    _, a = pool(X)
    h = X[0, :, 1]
    assert torch.allclose(a[0], torch.softmax(torch.tanh(h) * torch.sigmoid(h), 0))


@pytest.mark.parametrize("name", ["max", "mean", "logsumexp", "lme", "attention", "gated_attention"])
def test_padding_with_mask_changes_nothing(name):
    pool = create_pooling(name, dim=4)
    x = torch.randn(1, 5, 4)
    padded = torch.cat([x, 100 * torch.randn(1, 3, 4)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    a, wa = pool(x)
    b, wb = pool(padded, mask)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.all(wb[0, 5:] == 0) and torch.allclose(wa, wb[:, :5], atol=1e-6)


@pytest.mark.parametrize("name", ["mean", "logsumexp", "attention"])
def test_weights_sum_to_one(name):
    _, w = create_pooling(name, dim=4)(torch.randn(3, 6, 4))
    assert torch.allclose(w.sum(1), torch.ones(3))


def test_masked_softmax_zero_outside_mask():
    mask = torch.tensor([[True, False, True]])
    p = masked_softmax(torch.tensor([[1.0, 50.0, 1.0]]), mask)
    assert p.tolist() == [[0.5, 0.0, 0.5]]


def test_flatten_map_is_row_major():
    fmap = torch.arange(12.0).reshape(1, 2, 2, 3)  # C=2, h=2, w=3
    inst = flatten_map(fmap)
    assert inst.shape == (1, 6, 2)
    assert inst[0, 4].tolist() == [fmap[0, 0, 1, 1].item(), fmap[0, 1, 1, 1].item()]


def test_errors():
    with pytest.raises(ValueError, match="unknown pooling"):
        create_pooling("median")
    with pytest.raises(ValueError, match="needs the feature size"):
        create_pooling("attention")
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\)"):
        mean_pool(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="no real instance"):
        mean_pool(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        create_pooling("logsumexp", r=0)
