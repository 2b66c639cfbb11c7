"""Tests of patch extraction from coordinates and from soft indicators (METHODS.md §1.1, §5.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from needlework.topk import (
    cell_coords,
    extract_patches,
    grid_coords,
    hard_patches,
    hard_topk,
    perturbed_topk,
    perturbed_topk_support,
    soft_patches,
    support_indices,
    support_patches,
)


def naive_patches(image, coords, ph, pw):
    """Oracle: zero-pad the whole image generously and slice patch by patch."""
    pad = max(ph, pw) + int(coords.abs().max())
    padded = F.pad(image, (pad, pad, pad, pad))
    out = torch.zeros(coords.shape[0], coords.shape[1], image.shape[1], ph, pw, dtype=image.dtype)
    for b in range(coords.shape[0]):
        for k in range(coords.shape[1]):
            x, y = (int(v) + pad for v in coords[b, k])
            out[b, k] = padded[b, :, y : y + ph, x : x + pw]
    return out


def test_extract_patches_matches_naive_oracle_with_borders_and_rectangles():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 23, 31)  # asymmetric H != W catches (x, y) / (row, col) swaps
    coords = torch.tensor([[[0, 0], [25, 3], [-4, -2], [29, 20]], [[5, 18], [30, 22], [-7, 10], [12, -6]]])
    out = extract_patches(image, coords, (6, 9))
    assert out.shape == (2, 4, 3, 6, 9)
    torch.testing.assert_close(out, naive_patches(image, coords, 6, 9))


def test_extract_patches_x_is_column_and_y_is_row():
    image = torch.zeros(1, 1, 10, 20)
    image[0, 0, 2, 15] = 1.0  # row 2, column 15
    out = extract_patches(image, torch.tensor([[[15, 2]]]), 1)
    assert out.item() == 1.0


def test_extract_patches_gradcheck_float64():
    image = torch.rand(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[[1, 2], [-1, 5], [6, 0]]])
    assert torch.autograd.gradcheck(lambda im: extract_patches(im, coords, 3), (image,))


def test_extract_patches_noncontiguous_image():
    image = torch.rand(2, 1, 16, 12).transpose(2, 3)  # (2, 1, 12, 16), non-contiguous
    coords = torch.randint(-3, 12, (2, 5, 2))
    torch.testing.assert_close(
        extract_patches(image, coords, 4), extract_patches(image.contiguous(), coords, 4)
    )


def test_grid_coords_cover_unfold_in_row_major_order():
    image = torch.rand(1, 1, 40, 60)
    coords = grid_coords((40, 60), 20)
    assert coords.shape == (6, 2)
    patches = extract_patches(image, coords[None], 20)[0]  # (6, 1, 20, 20)
    unfolded = F.unfold(image, 20, stride=20).view(1, 20, 20, 6).permute(3, 0, 1, 2)
    torch.testing.assert_close(patches, unfolded)
    assert grid_coords((40, 60), 20, stride=10).shape == (3 * 5, 2)


def test_cell_coords_centres_patches_on_cells():
    coords = cell_coords((90, 120), (3, 4), 50)  # cell stride 30, patch 50 → offset 10
    assert coords.shape == (12, 2)
    centres = coords + 25
    cells = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).view(-1, 2)
    expected = torch.stack([cells[:, 1] * 30 + 15, cells[:, 0] * 30 + 15], dim=1)
    assert (centres - expected).abs().max() <= 1


def dense_mixture(image, indicators, candidates, patch):
    every = extract_patches(image, candidates[None].expand(image.shape[0], -1, -1), patch)
    return torch.einsum("bkn,bn...->bk...", indicators, every)


def test_soft_patches_equals_dense_mixture_and_gives_the_same_score_gradient():
    torch.manual_seed(1)
    image = torch.rand(2, 1, 48, 64)
    candidates = cell_coords((48, 64), (6, 8), 12)
    scores = torch.randn(2, 48)
    weight = torch.randn(2, 3, 1, 12, 12)
    grads = []
    for fn in (soft_patches, dense_mixture):
        s = scores.clone().requires_grad_()
        y = perturbed_topk(s, 3, 0.3, 40, torch.Generator().manual_seed(0))
        x = fn(image, y, candidates, 12)
        (x * weight).sum().backward()
        grads.append((x.detach(), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    # the perturbed top-K backward reads ∂L/∂Ŷ only on the support, so the sparse form is exact
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_support_patches_from_the_support_form_equal_soft_patches():
    """Patches and score gradient of the support form equal those of the dense indicators (same seed)."""
    torch.manual_seed(2)
    image = torch.rand(2, 3, 48, 64, dtype=torch.float64)
    candidates = cell_coords((48, 64), (6, 8), 12)
    scores = torch.randn(2, 48, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 12, 12, dtype=torch.float64)
    s1, s2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    x1 = soft_patches(image, perturbed_topk(s1, 3, 0.3, 40, torch.Generator().manual_seed(5)), candidates, 12)
    support, w = perturbed_topk_support(s2, 3, 0.3, 40, torch.Generator().manual_seed(5))
    x2 = support_patches(image, support, w, candidates, 12)
    torch.testing.assert_close(x2, x1)
    (x1 * weight).sum().backward()
    (x2 * weight).sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad)
    with pytest.raises(ValueError, match="weights must have shape"):
        support_patches(image, support, w[:, :, :1], candidates, 12)


def test_soft_patches_only_cuts_the_support():
    y = torch.zeros(2, 2, 100)
    y[0, 0, 3], y[0, 1, 50], y[1, 0, 7], y[1, 1, 8] = 1, 1, 1, 1
    y[1, 1, 9], y[1, 1, 8] = 0.5, 0.5
    support = support_indices(y)
    assert support.shape == (2, 3)
    assert set(support[0, :2].tolist()) == {3, 50}
    assert set(support[1].tolist()) == {7, 8, 9}


def test_hard_patches_equal_soft_patches_of_hard_indicators():
    image = torch.rand(3, 2, 30, 30)
    candidates = cell_coords((30, 30), (5, 5), 8)
    scores = torch.randn(3, 25)
    idx = scores.topk(4).indices.sort(-1).values
    torch.testing.assert_close(
        hard_patches(image, idx, candidates, 8), soft_patches(image, hard_topk(scores, 4), candidates, 8)
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: extract_patches(torch.rand(1, 8, 8), torch.zeros(1, 1, 2, dtype=torch.long), 2),
            ValueError,
            "images must have shape",
        ),
        (lambda: extract_patches(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 2), 2), TypeError, "integer"),
        (
            lambda: extract_patches(torch.rand(2, 1, 8, 8), torch.zeros(1, 1, 2, dtype=torch.long), 2),
            ValueError,
            "offsets must have shape",
        ),
        (lambda: grid_coords((10, 10), 20), ValueError, "smaller than patch_size"),
        (lambda: grid_coords((10, 10), 0), ValueError, "patch_size must be"),
        (
            lambda: soft_patches(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 5), torch.zeros(4, 2), 2),
            ValueError,
            "candidates must have shape",
        ),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()
