"""MIST's bilinear sampler S and inverse S⁻¹: grid_sample references, exact crops, gradchecks, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from needlework.mist import bilinear_sample, boxes_xyxy, paste_patches, sample_patches
from needlework.mist.sampler import sample_points


def affine_reference(image, centres, sizes, p):
    """Independent construction: one affine_grid per box, then F.grid_sample (align_corners=False)."""
    b, c, h, w = image.shape
    k = centres.shape[1]
    out = torch.empty(b, k, c, p, p, dtype=image.dtype)
    for i in range(b):
        for j in range(k):
            cx, cy = centres[i, j].tolist()
            sw, sh = sizes[i, j].tolist()
            theta = torch.tensor(
                [[[sw / w, 0.0, 2 * cx / w - 1], [0.0, sh / h, 2 * cy / h - 1]]], dtype=image.dtype
            )
            grid = F.affine_grid(theta, [1, c, p, p], align_corners=False)
            out[i, j] = F.grid_sample(
                image[i : i + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )[0]
    return out


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_sample_patches_matches_affine_grid_sample(impl):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 21, 27, generator=g, dtype=torch.float64)
    centres = (
        torch.rand(2, 4, 2, generator=g, dtype=torch.float64) * torch.tensor([31.0, 25.0]) - 2
    )  # some outside
    sizes = 3 + 12 * torch.rand(2, 4, 2, generator=g, dtype=torch.float64)
    got = sample_patches(image, centres, sizes, 7, impl=impl)
    assert got.shape == (2, 4, 3, 7, 7)
    torch.testing.assert_close(got, affine_reference(image, centres, sizes, 7), rtol=1e-10, atol=1e-10)


def test_gather_implementation_matches_grid_sample_on_points():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 2, 9, 13, generator=g, dtype=torch.float64)
    points = torch.rand(2, 200, 2, generator=g, dtype=torch.float64) * torch.tensor([17.0, 13.0]) - 2
    torch.testing.assert_close(bilinear_sample(image, points), sample_points(image, points, "grid_sample"))


def test_integer_aligned_boxes_are_exact_crops():
    image = torch.rand(1, 1, 20, 30)
    # box with top-left (x=4, y=7) and side 6, patch of 6 px: an exact crop image[7:13, 4:10]
    centres = torch.tensor([[[7.0, 10.0], [25.0, 3.0]]])
    sizes = torch.tensor([[6.0, 6.0]])
    patches = sample_patches(image, centres, sizes, 6)
    torch.testing.assert_close(patches[0, 0, 0], image[0, 0, 7:13, 4:10])
    torch.testing.assert_close(patches[0, 1, 0], image[0, 0, 0:6, 22:28])
    # asymmetric check of (x, y) = (column, row): moving x moves along columns
    shifted = sample_patches(image, centres + torch.tensor([1.0, 0.0]), sizes, 6)
    torch.testing.assert_close(shifted[0, 0, 0], image[0, 0, 7:13, 5:11])


def test_rectangular_patches_and_sizes():
    image = torch.rand(1, 2, 16, 16)
    out = sample_patches(image, torch.tensor([[[8.0, 8.0]]]), torch.tensor([[[8.0, 4.0]]]), (2, 4))
    assert out.shape == (1, 1, 2, 2, 4)
    # (w=8, h=4) box at the centre, 2 rows × 4 cols: each output pixel averages a 2×2 block exactly
    want = F.avg_pool2d(image[:, :, 6:10, 4:12], 2)
    torch.testing.assert_close(out[0, 0], want[0])


def test_noncontiguous_inputs():
    image = torch.rand(1, 12, 12, 2).permute(0, 3, 1, 2)  # channels-last view
    centres = (torch.rand(2, 3) * 10).t()[None]  # (1, 3, 2), not contiguous
    assert not image.is_contiguous() and not centres.is_contiguous()
    sizes = torch.full((1, 3), 5.0)
    torch.testing.assert_close(
        sample_patches(image, centres, sizes, 4),
        sample_patches(image.contiguous(), centres.contiguous(), sizes, 4),
    )


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_gradcheck_sample_patches(impl):
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 2, 8, 9, generator=g, dtype=torch.float64, requires_grad=True)
    centres = (torch.rand(1, 2, 2, generator=g, dtype=torch.float64) * 6 + 1.3).requires_grad_()
    sizes = (torch.rand(1, 2, generator=g, dtype=torch.float64) * 3 + 2.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i, c, s: sample_patches(i, c, s, 3, impl=impl), (image, centres, sizes)
    )


@pytest.mark.parametrize("impl", ["grid_sample", "gather"])
def test_gradcheck_paste_patches(impl):
    g = torch.Generator().manual_seed(3)
    patches = torch.rand(1, 2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    centres = (torch.rand(1, 2, 2, generator=g, dtype=torch.float64) * 6 + 2.37).requires_grad_()
    sizes = torch.tensor([[5.3, 4.1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p, c: paste_patches(p, c, sizes, (9, 10), impl=impl), (patches, centres)
    )


def test_paste_inverts_sample_on_aligned_boxes():
    image = torch.rand(2, 1, 24, 24, dtype=torch.float64)
    centres = torch.tensor([[[5.0, 6.0], [17.0, 15.0]], [[12.0, 12.0], [4.0, 20.0]]], dtype=torch.float64)
    sizes = torch.full((2, 2), 8.0, dtype=torch.float64)
    patches = sample_patches(image, centres, sizes, 8)
    layers = paste_patches(patches, centres, sizes, (24, 24), reduce="none")
    boxes = boxes_xyxy(centres, sizes).long()
    for b in range(2):
        for k in range(2):
            x0, y0, x1, y1 = boxes[b, k].tolist()
            mask = torch.zeros(24, 24, dtype=torch.bool)
            mask[y0:y1, x0:x1] = True
            torch.testing.assert_close(layers[b, k, 0][mask], image[b, 0][mask])
            assert layers[b, k, 0][~mask].abs().max() < 1e-12
    torch.testing.assert_close(paste_patches(patches, centres, sizes, (24, 24)), layers.sum(1))


def test_boxes_xyxy():
    boxes = boxes_xyxy(torch.tensor([[[10.0, 20.0]]]), torch.tensor([[[4.0, 6.0]]]))
    assert boxes.tolist() == [[[8.0, 17.0, 12.0, 23.0]]]


def test_sampler_errors_name_the_argument():
    with pytest.raises(ValueError, match="centres"):
        sample_patches(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 3), torch.ones(1, 2), 4)
    with pytest.raises(ValueError, match="sizes"):
        sample_patches(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 2), torch.ones(1, 3), 4)
    with pytest.raises(ValueError, match="image"):
        sample_patches(torch.rand(1, 8, 8), torch.rand(1, 2, 2), torch.ones(1, 2), 4)
    with pytest.raises(ValueError, match="impl"):
        sample_patches(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 2), torch.ones(1, 2), 4, impl="nearest")
    with pytest.raises(ValueError, match="reduce"):
        paste_patches(torch.rand(1, 2, 1, 4, 4), torch.rand(1, 2, 2), torch.ones(1, 2), (8, 8), reduce="max")
