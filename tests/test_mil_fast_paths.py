"""The MIL zoo's faster code paths (issue 16) against the plain formulas they replace."""

from __future__ import annotations

import math

import pytest
import torch

import needlework
from needlework.models.mil.nystrom import NystromAttention


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def test_abmil_matches_the_plain_formula_and_its_gradients():
    torch.manual_seed(0)
    model = needlework.create_model("abmil", in_dim=12, num_classes=3, embed_dim=8, attention_dim=5)
    bag = torch.randn(2, 7, 12)
    out = model(bag)
    # written out: h = relu(W x + b); a = softmax(w·tanh(V h)); z = Σ a h; logits = C z
    h = torch.relu(model.embed[0](bag))
    scores = model.attention.score(torch.tanh(model.attention.tanh_branch[0](h))).squeeze(-1)
    a = scores.softmax(dim=1)
    ref = model.classifier((a[..., None] * h).sum(dim=1))
    torch.testing.assert_close(out["logits"], ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(_grads(model, out["logits"].square().sum()), _grads(model, ref.square().sum())):
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "num_classes, nonlinear_query, dtype",
    [(2, False, torch.float32), (2, False, torch.float64), (5, False, torch.float32),
     (2, True, torch.float32)],
)
def test_dsmil_matches_the_plain_formula_and_its_gradients(num_classes, nonlinear_query, dtype):
    """C < q with a linear query takes the reassociated scores h · (Wᵀ q_m) (the (N, q) queries never
    exist); C ≥ q and the non-linear query take the explicit ones. Both equal the written-out formula."""
    torch.manual_seed(1)
    model = needlework.create_model(
        "dsmil", in_dim=10, num_classes=num_classes, query_dim=4, nonlinear_query=nonlinear_query
    ).to(dtype)
    bag = torch.randn(3, 6, 10, dtype=dtype)
    out = model(bag)
    c = model.instance_classifier(bag)  # (B, N, C)
    crit = c.argmax(dim=1)  # (B, C)
    q = model.query(bag)
    q_crit = torch.stack([q[b, crit[b]] for b in range(3)])  # (B, C, q)
    scores = torch.einsum("bnq,bcq->bcn", q, q_crit) / math.sqrt(4)
    a = scores.softmax(dim=-1)
    ref = model.bag_classifier(torch.einsum("bcn,bnl->bcl", a, model.value(bag))).squeeze(-1)
    torch.testing.assert_close(out["logits"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["attention"], a, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(_grads(model, out["logits"].square().sum()), _grads(model, ref.square().sum())):
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_ppeg_sequence_fast_path_equals_the_scatter_path():
    torch.manual_seed(2)
    model = needlework.create_model("transmil", in_dim=8, num_classes=2, dim=16, heads=2)
    tokens = torch.randn(2, 7, 16)
    fast = model.ppeg(tokens, None, (3, 3))
    general = model.ppeg(tokens, torch.arange(7).expand(2, 7), (3, 3))
    torch.testing.assert_close(fast, general, rtol=0, atol=1e-6)


def test_transmil_unpadded_fast_path_equals_the_padded_path():
    torch.manual_seed(3)
    model = needlework.create_model("transmil", in_dim=8, num_classes=2, dim=16, heads=2, dropout=0.0).eval()
    bag = torch.randn(1, 9, 8)
    alone = model(bag)  # no padding: the direct path
    padded = torch.cat([bag, torch.randn(1, 3, 8)], dim=1)
    mask = torch.tensor([[True] * 9 + [False] * 3])
    out = model(padded, mask=mask)  # padding: the grouped, gathered path
    torch.testing.assert_close(out["logits"], alone["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["attention"][:, :9], alone["attention"], rtol=1e-5, atol=1e-6)


def test_transmil_without_projection_and_residual_conv():
    full = needlework.create_model("transmil", in_dim=8, num_classes=2, dim=16, heads=2)
    lean = needlework.create_model(
        "transmil", in_dim=8, num_classes=2, dim=16, heads=2, residual_conv=False, out_projection=False
    )
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # each of the two layers drops Linear(16 → 16) (272) and the depthwise 33×1 value conv (2 · 33)
    assert n_params(full) - n_params(lean) == 2 * (16 * 16 + 16 + 2 * 33)
    assert lean(torch.randn(1, 5, 8))["logits"].shape == (1, 2)
    with pytest.raises(ValueError, match="out_projection=False needs heads"):
        NystromAttention(16, heads=2, dim_head=4, out_projection=False)


def test_ppeg_single_convolution_equals_the_three_convolutions_and_identity():
    torch.manual_seed(4)
    model = needlework.create_model("transmil", in_dim=8, num_classes=2, dim=16, heads=2)
    ppeg = model.ppeg
    tokens = torch.randn(2, 12, 16)
    canvas = torch.nn.functional.pad(tokens, (0, 0, 0, 4)).transpose(1, 2).reshape(2, 16, 4, 4)
    ref = canvas + sum(conv(canvas) for conv in ppeg.convs)  # the reference's definition
    ref = ref.flatten(2)[:, :, :12].transpose(1, 2)
    out = ppeg(tokens, None, (4, 4))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    weights = [conv.weight for conv in ppeg.convs] + [conv.bias for conv in ppeg.convs]
    for a, b in zip(torch.autograd.grad(out, weights, g), torch.autograd.grad(ref, weights, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
