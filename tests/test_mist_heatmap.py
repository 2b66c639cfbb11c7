"""MIST heatmap operators against brute-force references, and the lifting identity E_K(G(x)) = x."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from needlework.mist import (
    extract_keypoints,
    ideal_heatmap,
    local_spatial_softmax,
    nms,
    pool_scales,
    scale_split,
)


def brute_nms(h: np.ndarray, window: int) -> np.ndarray:
    """Keep a pixel iff no pixel of its (clipped) window is larger."""
    r = window // 2
    out = np.zeros_like(h)
    for b, i, j in itertools.product(range(h.shape[0]), range(h.shape[1]), range(h.shape[2])):
        patch = h[b, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
        if h[b, i, j] >= patch.max():
            out[b, i, j] = h[b, i, j]
    return out


def brute_local_softmax(s: np.ndarray, window: int, beta: float, padding: str) -> np.ndarray:
    r = window // 2
    e = np.exp(beta * s)
    mode = {"zeros": "constant", "reflect": "reflect"}[padding]
    ep = np.pad(e, [(0, 0), (0, 0), (r, r), (r, r)], mode=mode)  # reflect: mirror without the edge pixel
    out = np.zeros_like(s)
    for b, c, i, j in itertools.product(*(range(n) for n in s.shape)):
        out[b, c, i, j] = e[b, c, i, j] / ep[b, c, i : i + window, j : j + window].sum()
    return out


@pytest.mark.parametrize("window", [1, 3, 5, 7])
@pytest.mark.parametrize("integer_valued", [False, True])
def test_nms_matches_brute_force(window, integer_valued):
    g = torch.Generator().manual_seed(window)
    h = torch.rand(3, 13, 17, generator=g, dtype=torch.float64)
    if integer_valued:  # plateaus: ties must all be kept, like the reference's h == maxpool(h)
        h = (h * 4).floor()
    got = nms(h, window).numpy()
    np.testing.assert_array_equal(got, brute_nms(h.numpy(), window))
    # the channel layout gives the same answer per channel
    got4 = nms(h[:, None], window)[:, 0].numpy()
    np.testing.assert_array_equal(got4, got)


def test_nms_rejects_even_window_and_bad_shape():
    with pytest.raises(ValueError, match="odd"):
        nms(torch.rand(1, 5, 5), 4)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        nms(torch.rand(5, 5), 3)


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
@pytest.mark.parametrize("window,beta", [(3, 1.0), (5, 10.0), (7, 10.0)])
def test_local_spatial_softmax_matches_definition(window, beta, padding):
    s = torch.randn(2, 2, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = local_spatial_softmax(s, window, beta, padding).numpy()
    want = brute_local_softmax(s.numpy(), window, beta, padding)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    # invariant to a constant shift (the stabilising max cancels)
    shifted = local_spatial_softmax(s + 100.0, window, beta, padding).numpy()
    np.testing.assert_allclose(shifted, got, rtol=1e-9, atol=1e-14)


def test_local_spatial_softmax_border_bias_only_with_zero_padding():
    flat = torch.zeros(1, 1, 20, 20)
    uniform = local_spatial_softmax(flat, 7, 10.0, "reflect")
    torch.testing.assert_close(uniform, torch.full_like(flat, 1 / 49))
    biased = local_spatial_softmax(flat, 7, 10.0, "zeros")
    assert biased[0, 0, 0, 0] == pytest.approx(1 / 16) and biased[0, 0, 10, 10] == pytest.approx(1 / 49)
    # maps smaller than the window fall back to replicate padding and stay finite
    assert torch.isfinite(local_spatial_softmax(torch.rand(1, 1, 3, 3), 15, 10.0)).all()
    with pytest.raises(ValueError, match="padding"):
        local_spatial_softmax(flat, 7, 10.0, "circular")


def test_tie_noise_breaks_flat_ties_at_random_and_keeps_real_peaks():
    h = torch.zeros(64, 1, 16, 16)  # flat maps: without noise the ties go to the first pixels
    plain = extract_keypoints(h, 3, [1.0], 3)
    assert (plain.indices == torch.arange(3)).all()
    noisy = extract_keypoints(h, 3, [1.0], 3, tie_noise=1e-6)
    rows = noisy.indices // 16
    assert rows.float().mean() > 4  # spread over the map, not piled on row 0
    assert (noisy.scores == 0).all()  # returned scores carry no noise
    pattern = torch.rand(16, 16, generator=torch.Generator().manual_seed(5)) * 1e-6
    fixed = extract_keypoints(h, 3, [1.0], 3, tie_noise=pattern)
    assert (fixed.indices == fixed.indices[:1]).all()  # a fixed pattern: same choice for every map
    assert (fixed.indices[0] // 16).float().mean() > 0  # and not the first row
    h[:, 0, 9, 4] = 0.5  # a real peak stays first
    assert (extract_keypoints(h, 3, [1.0], 3, tie_noise=1e-6).indices[:, 0] == 9 * 16 + 4).all()


def test_local_spatial_softmax_isolated_peak_reaches_one():
    s = torch.zeros(1, 1, 30, 30)
    s[0, 0, 10, 12] = 3.0  # β·3 = 30: the peak dominates its window
    p = local_spatial_softmax(s, 15, 10.0)
    assert p[0, 0, 10, 12] == pytest.approx(1.0, abs=1e-6)
    assert p.max() <= 1.0


def test_local_spatial_softmax_no_nan_for_extreme_scores():
    s = torch.zeros(1, 1, 40, 40)
    s[0, 0, 0, 0] = 1e4  # everything else underflows after the shift
    p = local_spatial_softmax(s, 5, 10.0)
    assert torch.isfinite(p).all()


def test_pool_scales_formula():
    h = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    pooled, w = pool_scales(h, eps=1e-6)
    den = (h + 1e-6).sum(1, keepdim=True)
    torch.testing.assert_close(w, h / den)
    torch.testing.assert_close(pooled, (h * h).sum(1) / den[:, 0])


@pytest.mark.parametrize("k", [1, 4, 10])
def test_extract_keypoints_is_topk_of_nms_brute_force(k):
    g = torch.Generator().manual_seed(k)
    h = torch.rand(2, 1, 12, 15, generator=g, dtype=torch.float64)
    kp = extract_keypoints(h, k, [1.0], nms_window=3)
    kept = brute_nms(h[:, 0].numpy(), 3)
    for b in range(2):
        flat = kept[b].ravel()
        order = np.argsort(-flat, kind="stable")[:k]  # continuous values: no ties among the top
        np.testing.assert_array_equal(kp.indices[b].numpy(), order)
        # single scale: the pooled score is h² / (h + ε), a monotone map of h
        np.testing.assert_allclose(kp.scores[b].numpy(), flat[order] ** 2 / (flat[order] + 1e-6))
        rows, cols = np.divmod(order, 15)
        np.testing.assert_allclose(kp.centres[b].numpy(), np.stack([cols + 0.5, rows + 0.5], 1))
    assert torch.all(kp.scales == 1.0)


def test_extract_keypoints_scale_is_weighted_first_moment():
    h = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    h[0, :, 2, 3] = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
    kp = extract_keypoints(h, 1, [1.0, 2.0, 4.0], nms_window=3)
    # weights ∝ (0.2, 0.6, 0.2) → moment (0.2·1 + 0.6·2 + 0.2·4) / 1.0 = 2.2
    assert kp.scales.item() == pytest.approx(2.2, rel=1e-9)
    assert kp.centres[0, 0].tolist() == [3.5, 2.5]


def test_extract_keypoints_errors():
    with pytest.raises(ValueError, match="scale channels"):
        extract_keypoints(torch.rand(1, 2, 5, 5), 1, [1.0])
    with pytest.raises(ValueError, match="k must be"):
        extract_keypoints(torch.rand(1, 1, 3, 3), 10, [1.0])
    with pytest.raises(ValueError, match=r"\(B, S, H, W\)"):
        extract_keypoints(torch.rand(1, 5, 5), 1, [1.0])


def separated_keypoints(rng: np.random.Generator, k: int, h: int, w: int, gap: int) -> np.ndarray:
    """K distinct pixel centres with Chebyshev distance > gap (rejection sampling)."""
    pts: list[tuple[int, int]] = []
    while len(pts) < k:
        r, c = int(rng.integers(h)), int(rng.integers(w))
        if all(max(abs(r - r2), abs(c - c2)) > gap for r2, c2 in pts):
            pts.append((r, c))
    return np.array([[c + 0.5, r + 0.5] for r, c in pts])


@pytest.mark.parametrize("levels", [[1.0], [0.5, 1.0, 2.0, 4.0], [1.0, 1.5]])
@pytest.mark.parametrize("nms_window", [3, 5])
def test_lifting_identity_ek_of_g(levels, nms_window):
    """E_K(G({x_k})) = {x_k}: positions exactly, scales to rounding, for separated integer keypoints."""
    rng = np.random.default_rng(len(levels) * 10 + nms_window)
    b, k, h, w = 3, 6, 24, 28
    centres = torch.tensor(
        np.stack([separated_keypoints(rng, k, h, w, nms_window // 2) for _ in range(b)]), dtype=torch.float64
    )
    scales = torch.tensor(rng.uniform(levels[0], levels[-1], size=(b, k)), dtype=torch.float64)
    g = ideal_heatmap(centres, scales, levels, (h, w))
    kp = extract_keypoints(g, k, levels, nms_window, eps=1e-12)
    for i in range(b):
        want = {tuple(c): s for c, s in zip(centres[i].tolist(), scales[i].tolist())}
        got = {tuple(c): s for c, s in zip(kp.centres[i].tolist(), kp.scales[i].tolist())}
        assert set(got) == set(want)
        for c, s in want.items():
            assert got[c] == pytest.approx(s if len(levels) > 1 else 1.0, abs=1e-9)


def test_lifting_identity_quantises_continuous_keypoints_to_their_pixel():
    centres = torch.tensor([[[3.9, 2.1], [12.2, 9.7]]])
    g = ideal_heatmap(centres, torch.ones(1, 2), [1.0], (16, 16))
    kp = extract_keypoints(g, 2, [1.0], 3)
    got = sorted(map(tuple, kp.centres[0].tolist()))
    assert got == [(3.5, 2.5), (12.5, 9.5)]
    # every extracted keypoint lies within half a pixel (per axis) of an input keypoint
    dist = (kp.centres[0][:, None, :] - centres[0][None, :, :]).abs().amax(-1).amin(-1)
    assert dist.max() <= 0.5


def test_scale_split_reproduces_scale_and_clamps():
    levels = [0.5, 1.0, 2.0]
    s = torch.tensor([0.5, 0.75, 1.0, 1.6, 2.0, 0.1, 9.0], dtype=torch.float64)
    idx, mass = scale_split(s, levels)
    lv = torch.tensor(levels, dtype=torch.float64)
    torch.testing.assert_close((mass * lv[idx]).sum(-1), s.clamp(0.5, 2.0))
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(s))
    assert (mass >= 0).all()
    with pytest.raises(ValueError, match="increasing"):
        scale_split(s, [1.0, 1.0])


def test_gaussian_target_peaks_at_keypoint_pixel():
    centres = torch.tensor([[[5.5, 4.5]]])
    g = ideal_heatmap(centres, torch.tensor([[1.0]]), [1.0], (10, 12), kind="gaussian", sigma=1.5)
    assert g.shape == (1, 1, 10, 12)
    assert g[0, 0].argmax().item() == 4 * 12 + 5
    assert g.max().item() == pytest.approx(1.0)
    assert g[0, 0, 4, 7].item() == pytest.approx(np.exp(-4 / (2 * 1.5**2)), rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        ideal_heatmap(centres, torch.tensor([[1.0]]), [1.0], (10, 12), kind="box")
