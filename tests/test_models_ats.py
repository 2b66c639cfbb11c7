"""AttentionSampling / ATSClassifier / baselines: contract, geometry, gradient end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import needlework
from needlework.ats import attention_from_logits, extract_patches
from needlework.models import (
    ATSClassifier,
    AttentionSampling,
    MultiResolutionAttentionSampling,
    route_batch,
)


class PatchSum(nn.Module):
    """A parameter-free linear feature net: the sum of a patch's pixels, (R, C, h, w) → (R, 1)."""

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True)


def test_any_modules_shapes_and_geometry():
    torch.manual_seed(0)
    att = nn.Conv2d(1, 1, 3, padding=1)
    sampler = AttentionSampling(att, PatchSum(), n_patches=5, patch_size=4, replace=False)
    x_low, x_high = torch.rand(3, 1, 6, 8), torch.rand(3, 1, 24, 32)
    out = sampler(x_low, x_high)
    assert out["features"].shape == (3, 1)
    assert out["attention"].shape == (3, 48) and out["attention_map"].shape == (3, 6, 8)
    assert (
        out["idx"].shape == (3, 5)
        and out["offsets"].shape == (3, 5, 2)
        and out["offsets"].dtype == torch.long
    )
    assert out["patches"].shape == (3, 5, 1, 4, 4)
    assert torch.equal(out["patches"], extract_patches(x_high, out["offsets"], 4))
    # each patch is centred on its cell's 4×4 high-resolution region: cell (r, c) → corner (4c, 4r)
    rows, cols = out["idx"] // 8, out["idx"] % 8
    assert torch.equal(out["offsets"], torch.stack([4 * cols, 4 * rows], -1))
    assert all(len(set(row.tolist())) == 5 for row in out["idx"])  # without replacement


class Reshaper(nn.Module):
    def forward(self, x):
        return x.mean(1)  # (B, h, w): attention nets may drop the channel axis


def test_attention_net_without_channel_axis_and_errors():
    sampler = AttentionSampling(Reshaper(), PatchSum(), n_patches=2, patch_size=3)
    assert sampler(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8))["attention"].shape == (2, 16)
    two = AttentionSampling(nn.Conv2d(1, 2, 1), PatchSum(), n_patches=2, patch_size=3)
    with pytest.raises(ValueError, match="one channel"):
        two(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8))
    many = AttentionSampling(Reshaper(), PatchSum(), n_patches=17, patch_size=3)
    with pytest.raises(ValueError, match="n_patches=17"):
        many(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch size"):
        sampler(torch.rand(2, 1, 4, 4), torch.rand(3, 1, 8, 8))


@pytest.mark.parametrize("replace", [False, True])
def test_attention_gradient_unbiased_end_to_end(replace):
    """Through the whole module (attention net → sampling → cell mapping → patches → estimator), the
    per-draw gradients w.r.t. the attention logits average to the exact gradient of Σ_i a_i(ℓ) f_i,
    where f_i is the feature of the patch centred on cell i. M copies of one image form the batch."""
    torch.manual_seed(1)
    att = nn.Conv2d(1, 1, 3, padding=1).double()
    with torch.no_grad():
        att.weight.mul_(4.0)  # a peaky attention
    logits_seen = []

    def keep(module, inputs, output):
        output.retain_grad()
        logits_seen.append(output)

    att.register_forward_hook(keep)
    x_low = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    x_high = torch.rand(1, 1, 15, 15, dtype=torch.float64) - 0.5  # centred: lower variance
    sampler = AttentionSampling(att, PatchSum(), n_patches=4, patch_size=5, replace=replace, smoothing=0.01)
    M = 40_000
    out = sampler(x_low.expand(M, -1, -1, -1), x_high.expand(M, -1, -1, -1))
    out["features"].sum().backward()
    per_draw = logits_seen[0].grad.reshape(M, 25)
    # exact: every cell's patch is its 3×3 high-resolution region centred in a 5×5 window
    logits = logits_seen[0][:1].detach().reshape(1, 25).requires_grad_()
    cells = torch.arange(25).view(1, 25)
    f = (
        extract_patches(x_high, torch.stack([3 * (cells % 5) - 1, 3 * (cells // 5) - 1], -1), 5)
        .flatten(2)
        .sum(-1)
    )
    exact_value = (attention_from_logits(logits, 0.01) * f).sum()
    (exact,) = torch.autograd.grad(exact_value, logits)
    mean, se = per_draw.mean(0), per_draw.std(0) / M**0.5
    assert float((mean - exact[0]).norm() / exact.norm()) < 0.03
    assert bool(((mean - exact[0]).abs() <= 5 * se + 1e-6).all())
    value = out["features"].detach()
    assert abs(float(value.mean() - exact_value.detach())) <= 5 * float(value.std()) / M**0.5
    assert att.weight.grad is not None and float(att.weight.grad.abs().sum()) > 0


def test_ats_megapixel_mnist_model_contract():
    model = needlework.create_model("ats.megapixel_mnist", num_classes=10, n_patches=4, patch_size=20)
    assert isinstance(model, ATSClassifier)
    batch = {
        "x_low": torch.rand(2, 1, 12, 12),
        "x_high": torch.rand(2, 1, 100, 100),
        "label": torch.tensor([1, 7]),
    }
    out = model(**route_batch(model.forward, batch))
    assert out["logits"].shape == (2, 10)
    assert out["attention"].shape == (2, 144) and torch.allclose(out["attention"].sum(1), torch.ones(2))
    assert out["selected_coords"].shape == (2, 4, 2) and out["selected_idx"].shape == (2, 4)
    assert out["patches"].shape == (2, 4, 1, 20, 20)
    # zero-initialised last attention layer: uniform attention at the start
    assert torch.allclose(out["attention"], torch.full_like(out["attention"], 1 / 144))
    loss, parts = model.compute_loss(out, batch["label"])
    assert set(parts) == {"task", "entropy"}
    assert torch.isclose(parts["entropy"], torch.tensor(-1e-4 * math.log(144.0)), rtol=1e-3)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["sampler.attention_net.4.weight"].abs().sum() > 0  # the gradient reaches the attention net


def test_baselines_contract():
    dense = needlework.create_model("dense.megapixel_mnist", num_classes=10)
    out = dense(torch.rand(2, 1, 64, 64))
    assert out["logits"].shape == (2, 10) and "logit_map" not in out  # heatmap only in eval
    dense.eval()
    assert dense(torch.rand(1, 1, 64, 64))["logit_map"].shape == (1, 10, 52, 52)  # 64 − 6 − 3·2
    mil = needlework.create_model("attention_mil.megapixel_mnist", num_classes=10, patch_size=20)
    out = mil(torch.rand(2, 1, 50, 60))
    assert out["logits"].shape == (2, 10)
    assert out["attention"].shape == (2, 9) and torch.allclose(out["attention"].sum(1), torch.ones(2))
    assert out["attention_map"].shape == (2, 3, 3)
    assert out["instance_coords"][0, -1].tolist() == [40, 40]
    out["logits"].sum().backward()
    assert mil.pool.attention.score.weight.grad is not None


def test_multiresolution_offsets_and_gradients():
    torch.manual_seed(2)
    nets = [nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)]
    model = MultiResolutionAttentionSampling(nets, PatchSum(), n_patches=[3, 2], patch_sizes=[16, 8])
    x0, x1, x2 = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 32, 32), torch.rand(2, 1, 128, 128)
    out = model([x0, x1, x2])
    assert out["features"].shape == (2, 1) and out["patches"].shape == (2, 6, 1, 8, 8)
    assert [a.shape for a in out["attentions"]] == [(2, 64), (6, 256)]
    # every level-2 patch lies in (the ×4 image of) its parent level-1 patch, up to half a patch
    parent = out["offsets"][0].repeat_interleave(2, dim=1) * 4
    child = out["offsets"][1]
    assert ((child - parent >= -4) & (child - parent <= 64 - 4)).all()
    assert torch.equal(out["patches"], extract_patches(x2, child, 8))
    out["features"].sum().backward()
    assert all(float(n.weight.grad.abs().sum()) > 0 for n in nets)
    with pytest.raises(ValueError, match="resolutions"):
        model([x0, x1])


def test_megapixel_mnist_features_pool_matches_amax_in_values_and_gradients():
    """The global max pool (``adaptive_max_pool2d``, chosen for its cheap backward) against ``amax``."""
    from needlework.models.ats_networks import MegapixelMNISTFeatures

    torch.manual_seed(0)
    net = MegapixelMNISTFeatures(channels=8).double()
    x = torch.randn(3, 1, 20, 20, dtype=torch.float64)
    x[0] = -10.0  # a patch whose maps are mostly zero after the ReLU: ties in the max

    def reference(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(torch.amax(net.body(x), dim=(-2, -1)), dim=-1)

    weights = torch.randn(3, 8, dtype=torch.float64)
    got = net(x)
    grads = torch.autograd.grad((got * weights).sum(), list(net.parameters()))
    want = reference(x)
    want_grads = torch.autograd.grad((want * weights).sum(), list(net.parameters()))
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
