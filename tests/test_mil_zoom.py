"""Zooming (index-based child selection) and ZoomMIL."""

from __future__ import annotations

import pytest
import torch

import needlework
from mil_helpers import (
    one_thread,  # noqa: F401  (autouse fixture)
    pad_bags,
)
from needlework.ops.zoom import TensorTiles, ZoomRows, embed_rows


def kron_zoom(indicators: torch.Tensor, children: torch.Tensor, r: int) -> torch.Tensor:
    """The reference's dense zoom: ``kron(Ŷ, I_r) @ x`` per bag."""
    eye = torch.eye(r, dtype=children.dtype)
    return torch.stack([torch.kron(y, eye) @ x for y, x in zip(indicators, children)])


def soft_indicators(b: int, k: int, n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Sparse row-stochastic ``(B, K, N)`` like perturbed top-K output (a few non-zeros per row)."""
    y = torch.rand(b, k, n, generator=g, dtype=dtype) * (torch.rand(b, k, n, generator=g) < 0.3)
    y[..., 0] += 1e-3  # no empty row
    return y / y.sum(-1, keepdim=True)


def test_select_children_equals_kron_on_two_levels():
    g = torch.Generator().manual_seed(0)
    b, n, r1, r2, d = 2, 5, 4, 3, 6
    x1 = torch.randn(b, n * r1, d, generator=g, dtype=torch.float64)
    x2 = torch.randn(b, n * r1 * r2, d, generator=g, dtype=torch.float64)
    y0 = soft_indicators(b, 3, n, g)
    rows1 = ZoomRows.identity(b, n).select(y0).children(r1)
    torch.testing.assert_close(rows1.gather(x1), kron_zoom(y0, x1, r1))
    y1 = soft_indicators(b, 4, 3 * r1, g)
    rows2 = rows1.select(y1).children(r2)
    # reference: level-0 selection applied to all descendants at level 2, then the level-1 selection
    expected = kron_zoom(y1, kron_zoom(y0, x2, r1 * r2), r2)
    torch.testing.assert_close(rows2.gather(x2), expected)


def test_zoom_gradients_equal_kron_gradients():
    g = torch.Generator().manual_seed(1)
    y = soft_indicators(2, 3, 4, g).requires_grad_()
    x = torch.randn(2, 4 * 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 3 * 2, 3, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((ZoomRows.identity(2, 4).select(y).children(2).gather(x) * up).sum(), (y, x))
    ref = torch.autograd.grad((kron_zoom(y, x, 2) * up).sum(), (y, x))
    # the zoom reads Ŷ only on (a superset of) its support, which is all the perturbed top-K backward
    # uses; wherever it reads Ŷ its gradient is the dense one
    support = y != 0
    torch.testing.assert_close(ours[0] * support, ref[0] * support)
    torch.testing.assert_close(torch.where(ours[0] != 0, ours[0] - ref[0], 0.0), torch.zeros_like(y))
    torch.testing.assert_close(ours[1], ref[1])


def test_hard_selection_gathers_exactly_the_children_of_the_selected_parents():
    idx = torch.tensor([[1, 3], [0, 2]])
    hard = torch.zeros(2, 2, 4).scatter_(2, idx[..., None], 1.0)
    rows = ZoomRows.identity(2, 4).select(hard).children(3)
    assert rows.index.squeeze(-1).tolist() == [[3, 4, 5, 9, 10, 11], [0, 1, 2, 6, 7, 8]]
    assert torch.equal(rows.dominant(), rows.index.squeeze(-1))
    batch_idx, index, _ = rows.used()
    assert sorted(zip(batch_idx.tolist(), index.tolist())) == sorted(
        [(0, i) for i in (3, 4, 5, 9, 10, 11)] + [(1, i) for i in (0, 1, 2, 6, 7, 8)]
    )


def test_embed_rows_embeds_only_used_children():
    calls = []

    def encoder(tiles: torch.Tensor) -> torch.Tensor:
        calls.append(len(tiles))
        return tiles.flatten(1)[:, :2]

    tiles = torch.randn(1, 8, 1, 2, 2)
    rows = ZoomRows.identity(1, 4).select(torch.tensor([[[0.0, 0.0, 1.0, 0.0]]])).children(2)
    feats, count = embed_rows(rows, TensorTiles(tiles), encoder)
    assert count == 2 and calls == [2]
    torch.testing.assert_close(feats, tiles[0, 4:6].flatten(1)[None, :, :2])


topk = pytest.importorskip("needlework.topk", reason="needlework.topk (perturbed_topk) not available")


def test_zoommil_zooms_into_the_top_aux_attention_parents():
    torch.manual_seed(2)
    model = needlework.create_model("zoommil", in_dim=6, num_classes=2, num_levels=3, k=2,
                                    hidden_dim=8, attention_dim=4, dropout=0.0).eval()
    bag = torch.randn(1, 5, 6)
    bag_1, bag_2 = torch.randn(1, 20, 6), torch.randn(1, 80, 6)
    out = model(bag, bag_1=bag_1, bag_2=bag_2)
    h = model.embed[0](bag)
    aux = model.aux_attention[0](h).squeeze(-1)
    top = aux.topk(2).indices.sort().values
    assert torch.equal(out["selected_idx"], top)
    # level 1 attends over exactly the 2 × 4 children of those parents, in depth-first order
    assert out["attention_levels"][1].shape == (1, 8)
    children = (top[..., None] * 4 + torch.arange(4)).flatten(1)
    h1 = model.embed[1](bag_1[:, children[0]])
    att1 = model.attention[1](h1).squeeze(-1).softmax(-1)
    torch.testing.assert_close(out["attention_levels"][1], att1)
    # the level-1 choices (original level-1 indices) are children of the level-0 choices
    chosen = out["selected_idx_levels"][1]
    assert set(chosen.flatten().tolist()) <= set(children.flatten().tolist())
    assert set((chosen // 4).flatten().tolist()) <= set(top.flatten().tolist())
    assert out["attention_levels"][2].shape == (1, 8)


def test_zoommil_any_number_of_levels_and_errors():
    for levels in (1, 2, 4):
        model = needlework.create_model("zoommil", in_dim=4, num_levels=levels, k=2, hidden_dim=8,
                                        attention_dim=4).eval()
        extra = {f"bag_{lv}": torch.randn(2, 3 * 2**lv, 4) for lv in range(1, levels)}
        out = model(torch.randn(2, 3, 4), **extra)
        assert out["logits"].shape == (2, 2) and len(out["attention_levels"]) == levels
    model = needlework.create_model("zoommil", in_dim=4, num_levels=2, k=2, hidden_dim=8)
    with pytest.raises(ValueError, match="needs bag_1"):
        model(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="not a multiple"):
        model(torch.randn(1, 3, 4), bag_1=torch.randn(1, 7, 4))
    with pytest.raises(ValueError, match="k must be"):
        needlework.create_model("zoommil", in_dim=4, num_levels=3, k=[2])


def test_on_the_fly_children_equal_precomputed_features_and_save_compute():
    torch.manual_seed(3)
    model = needlework.create_model("zoommil", in_dim=500, num_levels=2, k=3, hidden_dim=16,
                                    attention_dim=8, dropout=0.0, child_encoder="lenet")
    tiles = torch.rand(2, 6 * 4, 1, 28, 28)
    bag = torch.randn(2, 6, 500)
    with torch.no_grad():
        precomputed = model.child_encoder(tiles.flatten(0, 1)).view(2, 24, 500)
    model.eval()
    on_the_fly = model(bag, tiles_1=tiles)
    reference = model(bag, bag_1=precomputed)
    torch.testing.assert_close(on_the_fly["logits"], reference["logits"], atol=1e-5, rtol=1e-4)
    assert on_the_fly["embedded_children"] == [2 * 3 * 4]  # K·r per bag, not all 24
    model.train()
    torch.manual_seed(4)
    soft = model(bag, tiles_1=tiles)
    torch.manual_seed(4)
    soft_ref = model(bag, bag_1=precomputed)
    torch.testing.assert_close(soft["logits"], soft_ref["logits"], atol=1e-5, rtol=1e-4)
    assert soft["embedded_children"][0] <= 2 * 24
    soft["logits"].sum().backward()
    assert model.child_encoder.fc[0].weight.grad is not None


def test_aux_heads_learn_only_through_the_perturbed_topk():
    torch.manual_seed(5)
    model = needlework.create_model("zoommil", in_dim=6, num_levels=2, k=2, hidden_dim=8,
                                    attention_dim=4, sigma=0.1, n_samples=50, dropout=0.0).train()
    out = model(torch.randn(3, 5, 6), bag_1=torch.randn(3, 20, 6))
    loss, _ = model.compute_loss(out, torch.tensor([0, 1, 1]))
    loss.backward()
    grad = model.aux_attention[0].score.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()
    model.eval()
    out = model(torch.randn(3, 5, 6), bag_1=torch.randn(3, 20, 6))
    model.compute_loss(out, torch.tensor([0, 1, 1]))[0].backward()
    grad = model.aux_attention[0].score.weight.grad  # hard top-K in evaluation: no gradient
    assert grad is None or grad.abs().sum() == 0


def test_zoommil_learns_planted_multilevel_bags():
    torch.manual_seed(6)  # also passes with seeds 7 and 8
    ds = needlework.create_dataset("planted_bags", split="train", size=48, grid=4, levels=3, dim=8,
                                   signal=3.0, tissue_fraction=0.7, lesion_size=4)
    model = needlework.create_model("zoommil", in_dim=8, num_levels=3, k=3, hidden_dim=32,
                                    attention_dim=16, dropout=0.0, sigma=0.05, n_samples=20)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = [pad_bags([ds[j] for j in range(i, i + 8)]) for i in range(0, 48, 8)]

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return sum(float(model.compute_loss(model.forward_batch(b), b["label"])[0]) for b in batches)

    before = loss_now()
    for _ in range(10):
        model.train()
        for batch in batches:
            loss, _ = model.compute_loss(model.forward_batch(batch), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss_now() < 0.75 * before
