"""Rulebook (gather–GEMM–scatter) path of the submanifold convolution, against brute force and dense conv."""

from __future__ import annotations

import pytest
import torch

from mil_helpers import one_thread  # noqa: F401  (autouse fixture)
from needlework.models.mil.sparseconvmil import SparseConvMIL
from needlework.ops.rulebook import Rulebook, RulebookConv, rulebook
from needlework.ops.sparse_conv import (
    SubmanifoldConv2d,
    choose_method,
    dense_submanifold_conv2d,
    neighbor_table,
    submanifold_conv2d,
)
from test_mil_sparse_conv import naive_neighbors, random_sites


def brute_pairs(sites: torch.Tensor, k: int, dilation: int) -> dict[int, set[tuple[int, int]]]:
    """Offset → {(in_row, out_row)} by comparing every pair of sites (no table involved)."""
    r = k // 2
    pairs: dict[int, set[tuple[int, int]]] = {o: set() for o in range(k * k)}
    rows = sites.tolist()
    for i, (b, y, x) in enumerate(rows):  # i: output site
        for j, (b2, y2, x2) in enumerate(rows):  # j: input site
            dy, dx = (y2 - y), (x2 - x)
            if b2 != b or dy % dilation or dx % dilation:
                continue
            oy, ox = dy // dilation + r, dx // dilation + r
            if 0 <= oy < k and 0 <= ox < k:
                pairs[oy * k + ox].add((j, i))
    return pairs


def compact_sites(n: int, side: int, bags: int = 1) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    one = torch.stack([y.flatten(), x.flatten()], 1)[:n]
    return torch.cat([torch.cat([torch.full((len(one), 1), b), one], 1) for b in range(bags)])


@pytest.mark.parametrize(("k", "dilation"), [(1, 1), (3, 1), (5, 1), (3, 2)])
def test_rulebook_pairs_match_brute_force(k, dilation):
    g = torch.Generator().manual_seed(1)
    sites = random_sites(3, 8, 11, 90, g)  # three bags, ~34 % dense
    book = rulebook(neighbor_table(sites, k, dilation))
    expected = brute_pairs(sites, k, dilation)
    centre = k * k // 2
    assert expected[centre] == {(i, i) for i in range(len(sites))}  # the identity, done as F @ W_c
    start = 0
    for o, n in enumerate(book.counts):
        got = list(zip(book.in_rows[start : start + n].tolist(), book.out_rows[start : start + n].tolist()))
        start += n
        assert len(got) == len(set(got))
        assert set(got) == (set() if o == centre else expected[o])
        # mirror offsets hold the swapped pairs
        assert set(got) == ({(b, a) for a, b in expected[k * k - 1 - o]} if o != centre else set())
    assert start == len(book.in_rows) == len(book.out_rows)
    real = sum(len(v) for v in expected.values())
    assert book.fraction == pytest.approx(real / (len(sites) * k * k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["scattered", "compact"])
@pytest.mark.parametrize(("k", "dilation"), [(3, 1), (5, 1), (3, 2)])
def test_rulebook_conv_equals_dense_values_and_gradients(dtype, layout, k, dilation):
    g = torch.Generator().manual_seed(2)
    sites = random_sites(2, 20, 24, 80, g) if layout == "scattered" else compact_sites(150, 13, bags=2)
    feats = torch.randn(len(sites), 5, dtype=dtype, generator=g, requires_grad=True)
    weight = torch.randn(7, 5, k, k, dtype=dtype, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=dtype, generator=g, requires_grad=True)
    grad_out = torch.randn(len(sites), 7, dtype=dtype, generator=g)
    book = rulebook(neighbor_table(sites, k, dilation))
    out = submanifold_conv2d(feats, book, weight, bias, method="rulebook")
    grads = torch.autograd.grad(out, (feats, weight, bias), grad_out)
    ref = dense_submanifold_conv2d(feats, sites, weight, bias, dilation)
    ref_grads = torch.autograd.grad(ref, (feats, weight, bias), grad_out)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    im2col = submanifold_conv2d(feats, book, weight, bias, method="im2col")
    torch.testing.assert_close(out, im2col, atol=tol, rtol=tol)


def test_rulebook_function_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    sites = random_sites(2, 6, 7, 30, g)
    book = rulebook(neighbor_table(sites, 3))
    feats = torch.randn(len(sites), 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w_, b: RulebookConv.apply(f, w_, b, book), (feats, w, bias))
    assert torch.autograd.gradcheck(lambda f, w_: RulebookConv.apply(f, w_, None, book), (feats, w))


def test_rulebook_saves_no_gathered_copies():
    g = torch.Generator().manual_seed(4)
    sites = random_sites(1, 30, 30, 400, g)
    book = rulebook(neighbor_table(sites, 3))
    feats = torch.randn(len(sites), 6, requires_grad=True)
    weight = torch.randn(6, 6, 3, 3, requires_grad=True)
    out = submanifold_conv2d(feats, book, weight, method="rulebook")
    saved = out.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved if t.is_floating_point()) == feats.numel() + weight.numel()
    assert {t.data_ptr() for t in saved if not t.is_floating_point()} == {
        book.in_rows.data_ptr(), book.out_rows.data_ptr()
    }


@pytest.mark.parametrize("method", ["rulebook", "im2col", "auto"])
def test_empty_and_single_site(method):
    weight, bias = torch.randn(4, 3, 3, 3), torch.randn(4)
    empty = neighbor_table(torch.empty(0, 3, dtype=torch.long), 3)
    book = rulebook(empty)
    assert book.counts == (0,) * 9 and book.fraction == 0.0
    feats = torch.randn(0, 3, requires_grad=True)
    out = submanifold_conv2d(feats, book, weight, bias, method=method)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert feats.grad.shape == (0, 3)
    one = torch.tensor([[0, 4, 2]])
    feats = torch.randn(1, 3, dtype=torch.float64)
    w64, b64 = weight.double(), bias.double()
    out = submanifold_conv2d(feats, rulebook(neighbor_table(one, 3)), w64, b64, method=method)
    torch.testing.assert_close(out, feats @ w64[:, :, 1, 1].T + b64)  # only the centre tap sees a site


def test_auto_choice_and_errors():
    assert choose_method(0.18, 20_000, 32) == "rulebook"  # scattered
    assert choose_method(0.99, 20_000, 32) == "rulebook"  # compact, large GEMMs
    assert choose_method(0.99, 300, 128) == "rulebook"
    assert choose_method(0.99, 20_000, 8) == "im2col"  # compact, small C
    assert choose_method(0.2, 100, 8) == "im2col"  # tiny: per-offset overhead dominates
    g = torch.Generator().manual_seed(5)
    sites = random_sites(1, 200, 200, 2000, g)  # 5 % dense → rulebook under auto
    table = neighbor_table(sites, 3)
    conv = SubmanifoldConv2d(32, 8)
    feats = torch.randn(len(sites), 32)
    with torch.no_grad():
        auto = conv(feats, table)
        torch.testing.assert_close(auto, conv(feats, rulebook(table)))
        conv.method = "im2col"
        torch.testing.assert_close(auto, conv(feats, table), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="method"):
        SubmanifoldConv2d(4, 4, method="fft")
    with pytest.raises(ValueError, match="method"):
        submanifold_conv2d(feats, table, conv.weight, method="fft")
    with pytest.raises(ValueError, match="neighbors"):
        rulebook(table[:, :8])
    with pytest.raises(ValueError, match="neighbors"):
        submanifold_conv2d(feats[:10], rulebook(table), conv.weight)


@pytest.mark.parametrize("method", ["rulebook", "im2col", "dense", "auto"])
def test_sparseconvmil_builds_one_rulebook_and_matches_im2col(method, monkeypatch):
    import needlework.models.mil.sparseconvmil as scm

    calls = []
    real = scm.rulebook
    spy = lambda t, sites=None: calls.append(sites is not None) or real(t, sites)  # noqa: E731
    monkeypatch.setattr(scm, "rulebook", spy)
    torch.manual_seed(0)
    model = SparseConvMIL(16, 2, cell_size=1.0, channels=(8, 8), augment=False, conv_method=method).eval()
    ref = SparseConvMIL(16, 2, cell_size=1.0, channels=(8, 8), augment=False, conv_method="im2col").eval()
    ref.load_state_dict(model.state_dict())
    coords = torch.randint(0, 12, (2, 40, 2)).float()
    bag = torch.randn(2, 40, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(bag, coords)["logits"], ref(bag, coords)["logits"])
    # once per batch (with the sites, for the dense boxes), shared by both layers
    assert calls == ([] if method == "im2col" else [True])
    assert isinstance(real(neighbor_table(torch.tensor([[0, 0, 0]]), 3)), Rulebook)


@pytest.mark.parametrize("spread", [1, 400])  # dense key map (small padded map) and sorted keys (huge map)
def test_neighbor_table_both_lookups_match_naive(spread):
    g = torch.Generator().manual_seed(6)
    sites = random_sites(2, 9, 13, 60, g)
    sites[:, 1:] *= spread  # × 400: a ~3600 × 4800 map per bag, far above the dense-map limit
    for k, dilation in ((3, 1), (5, 2)):
        table = neighbor_table(sites, k, dilation * spread)
        torch.testing.assert_close(table, naive_neighbors(sites, k, dilation * spread))
    with pytest.raises(ValueError, match="unique"):
        neighbor_table(torch.cat([sites, sites[:1]]), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, dilation", [(3, 1), (5, 2)])
def test_dense_box_path_equals_dense_conv_and_the_rulebook(dtype, k, dilation):
    """The dense path (scatter into each bag's box, conv2d, gather) against the dense reference and the
    rulebook, forward and both gradients, bags at different offsets, kernel 3 and 5 with dilation."""
    from needlework.ops.dense_box import dense_box

    g = torch.Generator().manual_seed(11)
    sites = random_sites(3, 9, 11, 70, g)
    sites[sites[:, 0] == 1, 1:] += torch.tensor([20, 5])  # bag 1 elsewhere on its map: its own box
    feats = torch.randn(len(sites), 6, dtype=dtype, generator=g, requires_grad=True)
    weight = torch.randn(4, 6, k, k, dtype=dtype, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=dtype, generator=g)
    table = neighbor_table(sites, k, dilation)
    book = rulebook(table, sites, dilation)
    b, h, w = book.box.shape  # bag 1's shift does not widen the box: each bag has its own offset
    assert b == 3 and h <= 9 and w <= 11
    assert book.box.fill == pytest.approx(len(sites) / (b * h * w))
    out = submanifold_conv2d(feats, book, weight, bias, method="dense")
    ref = dense_submanifold_conv2d(feats, sites, weight, bias, dilation=dilation)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out, ref, **tol)
    grads = torch.autograd.grad(out.square().sum(), [feats, weight])
    refs = torch.autograd.grad(submanifold_conv2d(feats, book, weight, bias, "rulebook").square().sum(),
                               [feats, weight])  # fmt: skip
    grad_tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else tol  # sums in another order
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, **grad_tol)
    assert dense_box(sites[:0]).fill == 0.0


def test_dense_box_gradcheck_and_auto_picks_it_on_compact_sites():
    from needlework.ops.dense_box import dense_box, dense_box_conv2d
    from needlework.ops.sparse_conv import choose_method

    g = torch.Generator().manual_seed(2)
    sites = random_sites(2, 5, 5, 30, g)
    box = dense_box(sites)
    feats = torch.randn(len(sites), 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w, b: dense_box_conv2d(f, box, w, b), (feats, weight, bias))
    compact = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(40),
                                         torch.arange(40), indexing="ij"), -1).reshape(-1, 3)  # fmt: skip
    scattered = compact * torch.tensor([1, 5, 5])
    assert rulebook(neighbor_table(compact, 3), compact).box.fill == 1.0
    assert choose_method(0.9, 1600, 32, fill=1.0) == "dense"
    assert choose_method(0.1, 1600, 32, fill=dense_box(scattered).fill) != "dense"  # fill 1/25
    assert choose_method(0.9, 1600, 32) != "dense"  # no boxes: never dense
    with pytest.raises(ValueError, match="rulebook\\(table, sites\\)"):
        submanifold_conv2d(torch.randn(1600, 32), neighbor_table(compact, 3), torch.randn(8, 32, 3, 3),
                           method="dense")  # fmt: skip
    with pytest.raises(ValueError, match="same site set"):
        rulebook(neighbor_table(compact, 3), compact[:10])

