"""Sparse convolution, sparse maps and coordinate augmentation (SparseConvMIL's operators)."""

from __future__ import annotations

import math

import pytest
import torch

from mil_helpers import one_thread  # noqa: F401  (autouse fixture)
from needlework.ops.coord_augment import augment_coords
from needlework.ops.sparse_conv import (
    SubmanifoldConv2d,
    dense_submanifold_conv2d,
    neighbor_table,
    sparse_global_mean,
    submanifold_conv2d,
)
from needlework.ops.sparse_map import coords_to_sites


def random_sites(b: int, h: int, w: int, s: int, g: torch.Generator) -> torch.Tensor:
    flat = torch.randperm(b * h * w, generator=g)[:s]
    return torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=1)


def naive_neighbors(sites: torch.Tensor, k: int, dilation: int) -> torch.Tensor:
    where = {tuple(r): i for i, r in enumerate(sites.tolist())}
    r = k // 2
    rows = []
    for b, y, x in sites.tolist():
        rows.append([where.get((b, y + dy * dilation, x + dx * dilation), len(sites))
                     for dy in range(-r, r + 1) for dx in range(-r, r + 1)])
    return torch.tensor(rows)


@pytest.mark.parametrize(("k", "dilation"), [(3, 1), (5, 1), (3, 2), (1, 1)])
def test_neighbor_table_matches_naive_lookup(k, dilation):
    g = torch.Generator().manual_seed(0)
    sites = random_sites(2, 9, 13, 60, g)
    assert torch.equal(neighbor_table(sites, k, dilation), naive_neighbors(sites, k, dilation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "dilation"), [(3, 1), (5, 1), (3, 2)])
def test_sparse_conv_equals_dense_masked_conv_values_and_gradients(dtype, k, dilation):
    g = torch.Generator().manual_seed(1)
    sites = random_sites(3, 20, 17, 150, g)
    f = torch.randn(len(sites), 5, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(7, 5, k, k, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=dtype, requires_grad=True)
    upstream = torch.randn(len(sites), 7, generator=g, dtype=dtype)
    out = submanifold_conv2d(f, neighbor_table(sites, k, dilation), w, bias)
    grads = torch.autograd.grad((out * upstream).sum(), (f, w, bias))
    ref = dense_submanifold_conv2d(f, sites, w, bias, dilation)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (f, w, bias))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(out, ref, **tol)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, **tol)


def test_sparse_conv_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    sites = random_sites(1, 5, 5, 9, g)
    nbr = neighbor_table(sites)
    f = torch.randn(9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: submanifold_conv2d(f, nbr, w), (f, w))


def test_sparse_conv_is_the_same_at_one_and_two_threads():
    g = torch.Generator().manual_seed(3)
    sites = random_sites(1, 64, 64, 1500, g)
    conv = SubmanifoldConv2d(16, 16)
    f = torch.randn(len(sites), 16, generator=g, requires_grad=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = conv(torch.relu(conv(f, sites=sites)), sites=sites)
            (grad,) = torch.autograd.grad(out.square().sum(), f)
            results.append((out.detach(), grad))
    finally:
        torch.set_num_threads(before)
    ref = dense_submanifold_conv2d(torch.relu(dense_submanifold_conv2d(f, sites, conv.weight, conv.bias)),
                                   sites, conv.weight, conv.bias)
    torch.testing.assert_close(results[0][0], ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=2e-5, rtol=1e-5)


def test_inactive_neighbours_contribute_nothing():
    """An isolated site only sees the centre tap of the kernel."""
    sites = torch.tensor([[0, 0, 0], [0, 10, 10]])
    w = torch.randn(4, 3, 3, 3)
    f = torch.randn(2, 3)
    out = submanifold_conv2d(f, neighbor_table(sites), w)
    torch.testing.assert_close(out, f @ w[:, :, 1, 1].T)


def test_sparse_conv_errors():
    with pytest.raises(ValueError, match="unique"):
        neighbor_table(torch.tensor([[0, 1, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match="odd"):
        neighbor_table(torch.tensor([[0, 1, 1]]), kernel_size=2)
    with pytest.raises(TypeError, match="integer"):
        neighbor_table(torch.tensor([[0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        neighbor_table(torch.tensor([[0, -1, 1]]))
    with pytest.raises(ValueError, match="weight"):
        submanifold_conv2d(torch.randn(2, 3), torch.zeros(2, 9, dtype=torch.long), torch.randn(4, 5, 3, 3))
    with pytest.raises(ValueError, match="backend"):
        SubmanifoldConv2d(3, 4, backend="minkowski")


def test_sparse_global_mean():
    f = torch.tensor([[1.0], [3.0], [10.0]])
    out = sparse_global_mean(f, torch.tensor([0, 0, 2]), 3)
    assert out.flatten().tolist() == [2.0, 0.0, 10.0]


def test_coords_to_sites_averages_collisions_and_ignores_padding():
    coords = torch.tensor([[[512, 512], [700, 600], [512, 1024], [9999, 9999]],
                           [[0, 0], [0, 256], [0, 0], [0, 0]]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    smap = coords_to_sites(coords, mask, cell_size=256)
    # bag 0: origin (512, 512): (0,0), (0,0) [x 188, y 88], (y 2, x 0); bag 1: (0,0), (1,0)
    assert smap.sites.tolist() == [[0, 0, 0], [0, 2, 0], [1, 0, 0], [1, 1, 0]]
    assert smap.instance_site.tolist() == [[0, 0, 1, -1], [2, 3, -1, -1]]
    assert smap.collision_rate == pytest.approx(1 - 4 / 5)
    feats = torch.arange(8, dtype=torch.float32).view(2, 4, 1)
    assert smap.scatter_mean(feats).flatten().tolist() == [0.5, 2.0, 4.0, 5.0]


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, None, :] - x[:, None, :, :]


def test_right_angle_rotations_are_exact_right_angles():
    g = torch.Generator().manual_seed(4)
    coords = torch.randint(0, 50, (64, 6, 2), generator=g) * 256
    out = augment_coords(coords, rotation="right_angles", flip=False, scale=None, generator=g)
    d_in, d_out = _pairwise(coords.float()), _pairwise(out)
    seen = set()
    for b in range(64):
        matches = [k for k in range(4) if torch.equal(d_out[b], _rot90(d_in[b], k))]
        assert len(matches) == 1, "each bag must be rotated by exactly a multiple of π/2"
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}
    assert torch.equal(out, out.round()), "right angles keep integer coordinates integral"


def _rot90(d: torch.Tensor, k: int) -> torch.Tensor:
    x, y = d[..., 0], d[..., 1]
    for _ in range(k):
        x, y = -y, x
    return torch.stack([x, y], -1)


def test_uniform_rotation_angles_are_radians_over_the_full_circle():
    g = torch.Generator().manual_seed(5)
    coords = torch.tensor([[[0, 0], [1000, 0]]]).expand(20000, 2, 2)
    out = augment_coords(coords, rotation="uniform", flip=False, scale=None, generator=g)
    d = out[:, 1] - out[:, 0]
    theta = torch.atan2(d[:, 1], d[:, 0])
    torch.testing.assert_close(d.norm(dim=1), torch.full((20000,), 1000.0), rtol=1e-5, atol=1e-3)
    # uniform on (−π, π): quartiles at −π/2, 0, π/2 (standard error ≈ 0.02 at 20,000 draws)
    q = torch.quantile(theta, torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(q, torch.tensor([-math.pi / 2, 0.0, math.pi / 2]), atol=0.08, rtol=0)
    assert float(theta.abs().max()) > 3.1


def test_flips_and_scaling():
    g = torch.Generator().manual_seed(6)
    coords = torch.tensor([[[0, 0], [100, 0], [0, 100]]]).expand(2000, 3, 2)
    out = augment_coords(coords, rotation="none", flip=True, scale=(0.5, 2.0), generator=g)
    dx, dy = out[:, 1] - out[:, 0], out[:, 2] - out[:, 0]
    assert torch.allclose(dx[:, 1], torch.zeros(2000), atol=1e-4)  # axes stay axes
    sx, sy = dx[:, 0] / 100, dy[:, 1] / 100
    assert ((sx.abs() >= 0.5 - 1e-5) & (sx.abs() <= 2.0 + 1e-5)).all()
    assert 0.4 < float((sx < 0).float().mean()) < 0.6 and 0.4 < float((sy < 0).float().mean()) < 0.6
    assert float((sx.abs() - sy.abs()).abs().mean()) > 0.1  # independent per axis


def test_augmentation_errors():
    with pytest.raises(ValueError, match="rotation"):
        augment_coords(torch.zeros(1, 2, 2), rotation="degrees")
    with pytest.raises(ValueError, match="coords"):
        augment_coords(torch.zeros(2, 2))


def test_spconv_backend_matches_default():
    spconv = pytest.importorskip("spconv.pytorch")
    del spconv
    g = torch.Generator().manual_seed(7)
    sites = random_sites(2, 40, 30, 400, g)
    torch.manual_seed(0)
    ref = SubmanifoldConv2d(8, 6)
    alt = SubmanifoldConv2d(8, 6, backend="spconv")
    alt.load_state_dict(ref.state_dict())
    f = torch.randn(len(sites), 8, generator=g, requires_grad=True)
    out_ref = ref(f, sites=sites)
    out_alt = alt(f, sites=sites, batch_size=2)
    torch.testing.assert_close(out_alt, out_ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out_ref)
    g_ref = torch.autograd.grad((out_ref * upstream).sum(), (f, ref.weight, ref.bias))
    g_alt = torch.autograd.grad((out_alt * upstream).sum(), (f, alt.weight, alt.bias))
    for a, e in zip(g_alt, g_ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_sample_instances_without_and_with_replacement():
    from needlework.ops.sparse_map import sample_instances

    g = torch.Generator().manual_seed(8)
    mask = torch.tensor([[True] * 6 + [False] * 4, [True] * 3 + [False] * 7])
    w = sample_instances(mask, 4, generator=g)
    assert w.sum(1).tolist() == [4.0, 3.0] and (w[~mask] == 0).all() and w.max() == 1
    w = sample_instances(mask, 50, replacement=True, generator=g)
    assert w.sum(1).tolist() == [50.0, 50.0] and (w[~mask] == 0).all() and w.max() > 1


def test_weighted_scatter_mean_equals_duplicated_tiles():
    """Sampling with replacement = averaging duplicated tiles on their site."""
    coords = torch.tensor([[[0, 0], [10, 10], [300, 0]]])
    feats = torch.tensor([[[1.0], [4.0], [7.0]]])
    smap = coords_to_sites(coords, None, cell_size=256)
    weights = torch.tensor([[2.0, 1.0, 3.0]])
    dup = coords_to_sites(torch.tensor([[[0, 0], [0, 0], [10, 10], [300, 0]]]), None, cell_size=256)
    expected = dup.scatter_mean(torch.tensor([[[1.0], [1.0], [4.0], [7.0]]]))
    torch.testing.assert_close(smap.scatter_mean(feats, weights), expected)


def test_sparseconvmil_tile_sampling_only_in_training():
    from needlework.models.mil import SparseConvMIL

    torch.manual_seed(9)
    model = SparseConvMIL(in_dim=4, channels=(8,), tiles_per_bag=3, augment=False)
    bag = torch.randn(2, 10, 4)
    coords = torch.stack([torch.arange(10) * 256, torch.zeros(10, dtype=torch.long)], -1).expand(2, 10, 2)
    out = model.train()(bag, coords)
    assert ((out["attention"] > 0).sum(1) == 3).all()
    torch.testing.assert_close(out["attention"].sum(1), torch.ones(2))
    assert ((model.eval()(bag, coords)["attention"] > 0).sum(1) == 10).all()
