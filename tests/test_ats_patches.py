"""extract_patches against a naive per-patch loop (borders included), dtypes, devices, errors."""

from __future__ import annotations

import pytest
import torch

from needlework.ats import extract_patches, extract_patches_1d, extract_patches_3d

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive_patches(images: torch.Tensor, offsets: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Loop reference: zero-pad by the patch size on every side, then slice each patch."""
    B, C, *spatial = images.shape
    d = len(spatial)
    pad = max(size) + int(offsets.abs().max())
    wide = images.to(torch.complex128 if images.is_complex() else torch.float64)  # pad: no bool kernel
    padded = torch.nn.functional.pad(wide, [pad] * (2 * d)).to(images.dtype)
    out = torch.zeros(B, offsets.shape[1], C, *size, dtype=images.dtype, device=images.device)
    for b in range(B):
        for k in range(offsets.shape[1]):
            corner = offsets[b, k].tolist()[::-1]  # (x, y, z) → axis order
            sl = tuple(slice(c + pad, c + pad + s) for c, s in zip(corner, size))
            out[b, k] = padded[(b, slice(None), *sl)]
    return out


def _offsets(B, n, spatial, size, gen):
    """Corners everywhere, including partly and wholly outside the image."""
    cols = []
    for extent, s in zip(reversed(spatial), reversed(size)):
        cols.append(torch.randint(-s - 2, extent + 2, (B, n, 1), generator=gen))
    return torch.cat(cols, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(5, 5), (3, 7), (1, 1)])
def test_matches_naive_loop_2d(device, size):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 17, 23, generator=gen).to(device)
    offsets = _offsets(3, 40, (17, 23), size, gen).to(device)
    out = extract_patches(images, offsets, size)
    assert out.shape == (3, 40, 2, *size)
    assert torch.equal(out, naive_patches(images, offsets, size))


def test_exact_corners_and_axis_order():
    img = torch.arange(4 * 6).view(1, 1, 4, 6)  # asymmetric image: (x, y) vs (row, col) is detectable
    out = extract_patches(img, torch.tensor([[[4, 1], [-1, -1], [5, 3]]]), (2, 2))
    assert out[0, 0, 0].tolist() == [[10, 11], [16, 17]]  # x=4 → columns 4..5, y=1 → rows 1..2
    assert out[0, 1, 0].tolist() == [[0, 0], [0, 0]]  # only (0, 0) is inside
    assert out[0, 1, 0, 1, 1] == 0 and out[0, 2, 0].tolist() == [[23, 0], [0, 0]]
    out = extract_patches(img, torch.tensor([[[-1, -1]]]), 2)
    assert out[0, 0, 0].tolist() == [[0, 0], [0, 0]]


DTYPES = [torch.uint8, torch.int8, torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64,
          torch.int16, torch.int32, torch.int64, torch.complex64]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 9, 11, generator=gen) * 200 - (0 if dtype == torch.uint8 else 100)
    if dtype.is_complex:
        images = torch.complex(images, -images)
    images = images.to(dtype)
    offsets = _offsets(2, 10, (9, 11), (4, 4), gen)
    assert (offsets < 0).any(), "the draw must cross the border"
    out = extract_patches(images, offsets, 4)
    assert out.dtype == dtype
    assert torch.equal(out, naive_patches(images, offsets, (4, 4)))


def test_noncontiguous_input_and_int32_offsets():
    gen = torch.Generator().manual_seed(2)
    base = torch.rand(2, 12, 10, 3, generator=gen)
    images = base.permute(0, 3, 1, 2)  # channels-last memory, (B, C, H, W) view
    assert not images.is_contiguous()
    offsets = _offsets(2, 8, (12, 10), (3, 3), gen).int()
    assert torch.equal(
        extract_patches(images, offsets, 3), naive_patches(images.contiguous(), offsets, (3, 3))
    )


def test_1d_and_3d_match_naive_loop():
    gen = torch.Generator().manual_seed(3)
    sig = torch.rand(2, 3, 31, generator=gen)
    off1 = _offsets(2, 12, (31,), (6,), gen)
    assert torch.equal(extract_patches_1d(sig, off1, 6), naive_patches(sig, off1, (6,)))
    vol = torch.rand(2, 1, 7, 9, 8, generator=gen)
    off3 = _offsets(2, 12, (7, 9, 8), (3, 4, 2), gen)
    out = extract_patches_3d(vol, off3, (3, 4, 2))
    assert out.shape == (2, 12, 1, 3, 4, 2)
    assert torch.equal(out, naive_patches(vol, off3, (3, 4, 2)))


def test_gradcheck_wrt_image():
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(1, 2, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([[[-1, 2], [3, 3], [0, 0], [0, 0]]])  # borders and a repeated patch
    assert torch.autograd.gradcheck(lambda x: extract_patches(x, offsets, 3), (images,))


def test_errors_name_the_argument():
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="offsets"):
        extract_patches(images, torch.zeros(2, 3, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="offsets"):
        extract_patches(images, torch.zeros(1, 3, 2, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="integer"):
        extract_patches(images, torch.zeros(2, 3, 2), 2)
    with pytest.raises(ValueError, match="size"):
        extract_patches(images, torch.zeros(2, 3, 2, dtype=torch.long), (2, 2, 2))
    with pytest.raises(ValueError, match="images"):
        extract_patches(images[0], torch.zeros(2, 3, 2, dtype=torch.long), 2)


def test_sliced_view_with_storage_offset_and_patch_larger_than_image():
    gen = torch.Generator().manual_seed(5)
    base = torch.rand(3, 2, 20, 20, generator=gen)
    images = base[1:, :, 3:17, 2:15]  # storage offset, non-contiguous rows
    offsets = _offsets(2, 30, (14, 13), (4, 6), gen)
    assert torch.equal(
        extract_patches(images, offsets, (4, 6)), naive_patches(images.contiguous(), offsets, (4, 6))
    )
    small = torch.rand(1, 1, 3, 4, generator=gen)
    off = torch.tensor([[[0, 0], [-2, 1]]])
    assert torch.equal(extract_patches(small, off, 5), naive_patches(small, off, (5, 5)))


def test_differentiable_path_matches_fast_path():
    gen = torch.Generator().manual_seed(6)
    images = torch.rand(2, 3, 15, 16, generator=gen)
    offsets = _offsets(2, 20, (15, 16), (5, 5), gen)
    fast = extract_patches(images, offsets, 5)
    slow = extract_patches(images.clone().requires_grad_(), offsets, 5)
    assert torch.equal(fast, slow.detach())


@pytest.mark.parametrize("mask_all", [False, True])  # the CPU variant and the sync-free CUDA variant
@pytest.mark.parametrize(
    "layout",
    ["contiguous", "channels_last", "transposed", "offset_view"],
)
def test_single_gather_both_variants_match_naive_loop(mask_all, layout):
    from needlework.ops.patches import _gather_rows

    gen = torch.Generator().manual_seed(7)
    images = torch.rand(3, 2, 13, 11, generator=gen)
    if layout == "channels_last":
        images = images.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        images = torch.rand(3, 2, 11, 13, generator=gen).transpose(2, 3)
    elif layout == "offset_view":
        images = torch.rand(4, 3, 16, 15, generator=gen)[1:, 1:, 2:15, 3:14]
    size = (4, 5)
    offsets = _offsets(3, 50, (13, 11), size, gen)
    # the very first and last storage rows with the corner outside along x: their clamped start moves
    offsets[0, 0] = torch.tensor([-3, 0])
    offsets[-1, -1] = torch.tensor([8, 9])
    out = _gather_rows(images, offsets.flip(-1), size, mask_all=mask_all)
    assert torch.equal(out, naive_patches(images.contiguous(), offsets, size))


@pytest.mark.parametrize("mask_all", [False, True])
def test_outside_elements_are_exact_zeros_even_next_to_nan(mask_all):
    """Border rows read the neighbouring storage; the mask must replace (not multiply) what they read."""
    from needlework.ops.patches import _gather_rows

    images = torch.full((2, 1, 6, 6), float("nan"))
    images[:, :, 1:5, 1:5] = 1.0  # NaN on the image's rim, the first thing a border row reads
    offsets = torch.tensor([[[-3, 2], [4, -2]], [[3, 4], [-1, -1]]])
    out = _gather_rows(images, offsets.flip(-1), (3, 3), mask_all=mask_all)
    ref = naive_patches(images, offsets, (3, 3))
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("mask_all", [False, True])
def test_single_gather_1d_3d_both_variants(d, mask_all):
    from needlework.ops.patches import _gather_rows

    gen = torch.Generator().manual_seed(8)
    spatial, size = ((19,), (4,)) if d == 1 else ((6, 7, 8), (2, 3, 4))
    images = torch.rand(2, 3, *spatial, generator=gen)
    offsets = _offsets(2, 30, spatial, size, gen)
    out = _gather_rows(images, offsets.flip(-1), size, mask_all=mask_all)
    assert torch.equal(out, naive_patches(images, offsets, size))


def test_sync_free_variant_runs_a_fixed_number_of_ops_whatever_the_patch_count():
    """The CUDA variant is not launch-bound: no op per patch (counted at the ATen dispatcher)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from needlework.ops.patches import _gather_rows

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(9)
    images = torch.rand(4, 3, 64, 64, generator=gen)
    counts = []
    for n in (8, 512):
        offsets = torch.randint(4, 40, (4, n, 2), generator=gen)  # inside: no fallback row
        offsets[:, 0] = -3  # a border patch in every image
        with Count() as c:
            _gather_rows(images, offsets.flip(-1), (16, 16), mask_all=True)
        counts.append(c.ops)
    assert counts[0] == counts[1] < 120  # views included; the old border path added ops per patch
