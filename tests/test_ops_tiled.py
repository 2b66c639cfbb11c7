"""Tiled attention / scorer networks: exact against the whole-image pass, and memory of one tile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from needlework.models.ats_networks import CellAttention
from needlework.models.dps import Scorer
from needlework.ops.tiled import tiled_map, unit_float


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # the last layer starts at zero (uniform attention): make it count
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return net


def _grads(net: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = net(x)
    (out * weight).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("channels", "pool_after", "cell_pool", "size"),
    [((4, 4, 8), (1,), 2, (77, 93)), ((4, 6), (0, 1), 1, (64, 50)), ((3,), (), 3, (40, 41))],
)
def test_cell_attention_tiled_equals_whole(channels, pool_after, cell_pool, size, dtype):
    whole = _randomise(CellAttention(3, channels, pool_after, cell_pool)).to(dtype)
    tiled = _randomise(CellAttention(3, channels, pool_after, cell_pool, tile=13)).to(dtype)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref = whole(x)
    out = tiled(x)
    assert out.shape == ref.shape == (2, 1, size[0] // whole.cell, size[1] // whole.cell)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    gx_ref, gp_ref = _grads(whole, x, weight)
    gx, gp = _grads(tiled, x, weight)
    torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_a_halo_too_small_is_not_exact():
    """The halo is what makes tiling exact: one px short of the receptive field, tile borders show."""
    net = _randomise(CellAttention(1, (4, 4, 4), (), 1)).double()  # three 3×3 convs: radius 3
    x = torch.randn(1, 1, 40, 40, dtype=torch.float64)
    assert net.halo == 3
    ok = tiled_map(net._logits, x, tile=10, halo=3)
    short = tiled_map(net._logits, x, tile=10, halo=2)
    torch.testing.assert_close(ok, net(x))
    assert (short - net(x)).abs().max() > 1e-6


def test_dps_scorer_tiled_equals_whole():
    whole = _randomise(Scorer(3, (4, 8), (5, 7))).double()
    tiled = _randomise(Scorer(3, (4, 8), (5, 7), tile=16)).double()
    x = torch.randn(1, 3, 61, 83, dtype=torch.float64)
    torch.testing.assert_close(tiled(x), whole(x))
    torch.testing.assert_close(tiled(x, (9, 4)), whole(x, (9, 4)))
    w = torch.randn(1, 35, dtype=torch.float64)
    for a, b in zip(_grads(tiled, x, w)[1], _grads(whole, x, w)[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tile", [16, 20])
def test_dps_scorer_pools_each_tile_when_cells_are_whole_squares(tile):
    """Cells of 4 × 4 px: the tile-pooled path equals the whole map's adaptive max pool, values and
    gradients, and the full-resolution one-channel map (or its gradient) is never built."""
    from torch.utils._python_dispatch import TorchDispatchMode

    whole = _randomise(Scorer(3, (4, 8), (16, 24))).double()
    tiled = _randomise(Scorer(3, (4, 8), (16, 24), tile=tile)).double()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    shapes: list[tuple] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.extend(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                          if isinstance(t, torch.Tensor))  # fmt: skip
            return out

    w = torch.randn(1, 16 * 24, dtype=torch.float64)
    with Spy():
        tiled_grads = _grads(tiled, x, w)
    torch.testing.assert_close(tiled(x), whole(x))
    for a, b in zip(tiled_grads[1], _grads(whole, x, w)[1]):
        torch.testing.assert_close(a, b)
    assert (1, 1, 64, 96) not in shapes


def test_tiled_map_gradcheck():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2)).double()
    x = torch.randn(1, 2, 14, 18, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tiled_map(conv, t, tile=6, halo=1, stride=2), (x,))


def test_backward_keeps_one_tile_of_activations():
    """What autograd saves for the backward: every layer's maps whole, against only the tile inputs."""
    net = _randomise(CellAttention(3, (16, 16, 32), (1,), 2))
    x = torch.randn(1, 3, 256, 256)

    def saved_bytes(model: nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return total

    whole = saved_bytes(net)
    net.tile = 64
    tiled = saved_bytes(net)
    assert whole > 16 * 256 * 256 * 4 * 2  # at least two full-resolution 16-channel maps
    assert tiled < whole / 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tile": 0, "halo": 1}, "tile >= 1"), ({"tile": 4, "halo": -1}, "halo >= 0")],
)
def test_tiled_map_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiled_map(nn.Identity(), torch.zeros(1, 1, 8, 8), **kwargs)


def test_tiled_map_needs_an_image_batch():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tiled_map(nn.Identity(), torch.zeros(8, 8), tile=4, halo=0)


def test_cell_attention_rejects_a_bad_tile():
    with pytest.raises(ValueError, match="tile"):
        CellAttention(3, tile=0)


# -- uint8 low views (a slide's x_low stays uint8; the networks convert tile by tile) -----------------------
def test_unit_float_scales_uint8_and_passes_floats_through():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    assert torch.equal(unit_float(x), torch.tensor([0, 1, 128, 255]) / 255.0)
    f = torch.rand(3, dtype=torch.float64)
    assert unit_float(f) is f
    with pytest.raises(TypeError, match="uint8"):
        unit_float(torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("tile", [None, 24])
def test_networks_on_uint8_equal_them_on_the_float_view(tile):
    """Same logits and the same parameter gradients from the uint8 view as from its float copy / 255."""
    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 70, 50), dtype=torch.uint8)
    nets = [CellAttention(3, (4, 8), pool_after=(0,), cell_pool=2, tile=tile), Scorer(3, (4,), (5, 5), tile)]
    nn.init.normal_(nets[0].net[-1].weight)  # not the zero (uniform) initialisation
    for net in nets:
        assert net.takes_uint8
        outs, grads = [], []
        for x in (u8, u8.float() / 255):
            net.zero_grad()
            out = net(x)
            out.square().sum().backward()
            outs.append(out.detach())
            grads.append([p.grad.clone() for p in net.parameters()])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for g0, g1 in zip(*grads):
            torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)


def test_ats_converts_uint8_for_an_attention_net_that_cannot():
    """A network without ``takes_uint8`` gets the whole view as float in [0, 1]."""
    import needlework

    torch.manual_seed(0)
    model = needlework.create_model("ats.megapixel_mnist", num_classes=3, n_patches=2, patch_size=50,
                                    attention_channels=4, feature_channels=4)  # fmt: skip
    u8 = torch.randint(0, 256, (1, 1, 30, 30), dtype=torch.uint8)
    high = torch.rand(1, 1, 250, 250)
    a = model.sampler.attention_logits(u8)
    torch.testing.assert_close(a, model.sampler.attention_logits(u8.float() / 255))
    assert model(u8, high)["logits"].shape == (1, 3)
