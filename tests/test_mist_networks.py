"""MIST networks: size-preserving heatmap net, multi-scale heatmaps, soft-argmax, task networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from needlework.mist import local_spatial_softmax
from needlework.models.mist_networks import (
    HeatmapNet,
    MultiScaleHeatmap,
    PatchAutoencoder,
    PatchClassifier,
    soft_argmax,
)


@pytest.mark.parametrize("blocks", [0, 2, 4])
def test_heatmap_net_preserves_size(blocks):
    net = HeatmapNet(3, 2, width=4, n_blocks=blocks)
    assert net(torch.rand(2, 3, 23, 31)).shape == (2, 2, 23, 31)
    if blocks:
        with pytest.raises(ValueError, match="too small"):
            net(torch.rand(1, 3, 2 * blocks, 40))


def test_multiscale_heatmap_channels_follow_their_definition():
    torch.manual_seed(0)
    net = HeatmapNet(1, 1, width=4, n_blocks=1).eval()
    ms = MultiScaleHeatmap(net, scales=[1.0, 2.0], softmax_window=5, beta=3.0).eval()
    image = torch.rand(2, 1, 24, 24)
    out = ms(image)
    assert out.shape == (2, 2, 24, 24) and (out >= 0).all() and (out <= 1).all()
    torch.testing.assert_close(out[:, :1], local_spatial_softmax(net(image), 5, 3.0))
    small = F.interpolate(image, size=(12, 12), mode="bilinear", align_corners=False, antialias=True)
    coarse = F.interpolate(net(small), size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, 1:], local_spatial_softmax(coarse, 5, 3.0))
    with pytest.raises(ValueError, match="increasing"):
        MultiScaleHeatmap(net, scales=[2.0, 1.0])


def test_soft_argmax_locates_peaks_and_is_differentiable():
    scores = torch.full((1, 2, 10, 12), -50.0)
    scores[0, 0, 3, 7] = 50.0
    scores[0, 1, 8, 1] = 50.0
    centres, peak = soft_argmax(scores)
    torch.testing.assert_close(centres, torch.tensor([[[7.5, 3.5], [1.5, 8.5]]]))
    torch.testing.assert_close(peak, torch.ones(1, 2))
    flat = torch.zeros(1, 1, 4, 6, requires_grad=True)
    c, _ = soft_argmax(flat)
    torch.testing.assert_close(c, torch.tensor([[[3.0, 2.0]]]))  # uniform → image centre
    c.sum().backward()
    assert flat.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [16, 32])
def test_task_networks_shapes(p):
    clf = PatchClassifier(2, 7, widths=(4, 8), blocks_per_level=1)
    assert clf(torch.rand(5, 2, p, p)).shape == (5, 7)
    ae = PatchAutoencoder(2, p, latent_dim=6, width=4)
    rec = ae(torch.rand(3, 2, p, p))
    assert rec.shape == (3, 2, p, p) and (rec >= 0).all() and (rec <= 1).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        PatchAutoencoder(1, 18)


def test_histogram_losses_hand_values_and_zero_at_the_target():
    from needlework.mist import histogram_kl_loss, histogram_loss

    counts = torch.tensor([[2, 1, 0]])
    perfect = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]])
    uniform = torch.full((1, 3, 3), 1 / 3)
    assert histogram_loss(perfect, counts).item() == pytest.approx(0.0)
    assert histogram_kl_loss(perfect, counts).item() == pytest.approx(0.0, abs=1e-6)
    h = torch.tensor([2 / 3, 1 / 3, 0.0])
    assert histogram_loss(uniform, counts).item() == pytest.approx(0.5 * ((h - 1 / 3) ** 2).sum().item())
    want = (2 / 3) * torch.log(torch.tensor(2.0)) + (1 / 3) * 0.0  # Σ h log(h / (1/3))
    assert histogram_kl_loss(uniform, counts).item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        histogram_loss(uniform, torch.zeros(1, 3, dtype=torch.long))
