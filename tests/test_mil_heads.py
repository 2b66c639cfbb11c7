"""Model-specific checks: Nyström attention, TransMIL layouts, CLAM instance loss, DSMIL, pooling limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mil_helpers import (
    grid_coords,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
)
from needlework.models.mil.common import masked_logsumexp
from needlework.models.mil.nystrom import NystromAttention, iterative_pinv, segment_means


def test_iterative_pinv_approaches_the_inverse():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 6, dtype=torch.float64).softmax(-1)  # row-stochastic like attention
    z = iterative_pinv(x, iterations=40)
    torch.testing.assert_close(z, torch.linalg.pinv(x), atol=1e-8, rtol=1e-6)


def test_segment_means():
    x = torch.arange(7, dtype=torch.float32)[:, None]
    assert segment_means(x, 3).flatten().tolist() == [1.0, 3.5, 5.5]  # segments [0-2], [3-4], [5-6]
    torch.testing.assert_close(segment_means(x, 7), x)


def test_nystrom_equals_softmax_attention_with_all_tokens_as_landmarks():
    torch.manual_seed(1)
    attn = NystromAttention(dim=16, heads=2, num_landmarks=64, pinv_iterations=60, residual=False).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    out, row = attn.attend(x, row=0)
    q, k, v = attn.to_qkv(x).view(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    exact = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 12, 16))
    torch.testing.assert_close(out, exact, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(row, weights[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)


def test_transmil_coords_layout_uses_positions_not_order():
    """With PPEG on coordinates, tokens far apart on the slide do not mix through the position encoding,
    whatever their order in the sequence."""
    torch.manual_seed(3)
    model = make_model("transmil", ppeg_layout="coords", coord_stride=256).eval()
    assert model.ppeg_layout == "coords"
    bag = torch.randn(1, 6, 12)
    coords = grid_coords(1, 6, side=40)
    with torch.no_grad():
        out = model(bag, coords)
    assert out["logits"].shape == (1, 3)
    cells, grid = model._grid(coords, 6)
    xy = (coords[0] - coords[0].min(0).values) // 256
    assert torch.equal(cells[0], xy[:, 1] * grid[1] + xy[:, 0])
    with pytest.raises(ValueError, match="coord_stride"):
        make_model("transmil", ppeg_layout="coords")
    with pytest.raises(ValueError, match="needs coords"):
        model(bag)


def test_ppeg_averages_tokens_sharing_a_cell():
    model = make_model("transmil").eval()
    tokens = torch.randn(1, 3, 32)
    cells = torch.tensor([[0, 0, 5]])
    for conv in model.ppeg.convs:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    out = model.ppeg(tokens, cells, (3, 3))
    mean01 = tokens[:, :2].mean(1)
    torch.testing.assert_close(out[:, 0], mean01)
    torch.testing.assert_close(out[:, 1], mean01)
    torch.testing.assert_close(out[:, 2], tokens[:, 2])


def _naive_clam_instance_loss(model, h, attention, n_real, label):
    """Per-bag loop following the prose of METHODS.md §10.3 (k = min(8, n // 2))."""
    k = min(model.k_sample, n_real // 2)
    if k == 0:
        return torch.tensor(0.0)
    a = attention[:n_real]
    top, bottom = a.topk(k).indices, (-a).topk(k).indices
    logits = model.instance_classifiers(h[:n_real]).view(n_real, model.num_classes, 2)
    total = 0.0
    for c in range(model.num_classes):
        if c == label:
            idx = torch.cat([top, bottom])
            tgt = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            total = total + F.cross_entropy(logits[idx, c], tgt)
        elif model.subtyping:
            total = total + F.cross_entropy(logits[top, c], torch.zeros(k).long())
    return total / model.num_classes if model.subtyping else total


@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_instance_loss_matches_a_per_bag_loop(subtyping):
    torch.manual_seed(4)
    model = make_model("clam_sb", subtyping=subtyping, k_sample=3).eval()
    lengths = [20, 5, 1, 7]
    mask = torch.zeros(4, 20, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    out = model(torch.randn(4, 20, 12), mask=mask)
    label = torch.tensor([0, 2, 1, 1])
    expected = torch.stack([
        _naive_clam_instance_loss(model, out["instance_features"][i], out["attention"][i], n, int(label[i]))
        for i, n in enumerate(lengths)
    ]).mean()
    torch.testing.assert_close(model.instance_loss(out, label), expected)
    total, parts = model.compute_loss(out, label)
    torch.testing.assert_close(parts["task"], 0.7 * F.cross_entropy(out["logits"], label))
    torch.testing.assert_close(total, parts["task"] + 0.3 * expected)


def test_dsmil_critical_instance_ignores_padding_and_loss_mixes_streams():
    torch.manual_seed(5)
    model = make_model("dsmil", num_classes=2).eval()
    bag = torch.randn(2, 6, 12)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.no_grad():
        w = model.instance_classifier.weight
        bag[0, 5] = 100 * w[0] / w[0].norm()  # a padded instance that would win class 0
        out = model(bag, mask=mask)
    assert (out["critical_idx"][0] < 4).all()
    scores = model.instance_classifier(bag[0, :4])
    torch.testing.assert_close(out["max_logits"][0], scores.max(0).values)
    target = torch.tensor([1, 0])
    total, parts = model.compute_loss(out, target)
    torch.testing.assert_close(
        total, 0.5 * F.cross_entropy(out["logits"], target) + 0.5 * F.cross_entropy(out["max_logits"], target)
    )
    assert set(parts) == {"task", "max_instance"}


def test_logsumexp_pooling_limits():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    big = masked_logsumexp(x, mask, r=1e4, normalise=True)
    small = masked_logsumexp(x.double(), mask, r=1e-6, normalise=True)
    torch.testing.assert_close(big, x.masked_fill(~mask[..., None], -1e9).max(1).values, atol=1e-3, rtol=0)
    mean = (x.double() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(small, mean, atol=1e-5, rtol=0)


def test_instance_max_attention_points_at_the_winner():
    model = make_model("instance.max").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 7, 12))
    winner = out["instance_logits"].argmax(1)  # (B, C)
    assert torch.equal(out["attention"].argmax(-1), winner)
