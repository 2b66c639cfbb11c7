"""Monte-Carlo unbiasedness of the ATS estimators (METHODS §12.1).

M independent draws sit in the batch dimension; per-draw gradients come back through leaf copies of
the attention and of the features, so each quantity gets its mean *and* its standard error. Checks per
case: relative L2 error of the mean below 0.02 and every coordinate within 5 standard errors (plus a
1e-3 absolute slack for coordinates never drawn). The attention gradient is compared in logit space,
``φ(v) = a ⊙ (v − ⟨a, v⟩)``, since softmax attention only defines it up to a constant.
"""

from __future__ import annotations

import pytest
import torch

from needlework.ats import expectation, sample

CASES = [(12, 4, 1), (12, 4, 3), (50, 10, 1), (50, 10, 3), (100, 10, 1), (100, 10, 3)]


def _logit_space(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return a * (v - (v * a).sum(-1, keepdim=True))


def _draws(N, K, power, replace, estimator="unbiased", M=100_000, D=3, weights=None, seed=0):
    """Per-draw forward values and gradients, projected on a fixed upstream vector ``up``."""
    gen = torch.Generator().manual_seed(seed + 1000 * N + 10 * K + power)
    a = torch.rand(N, generator=gen, dtype=torch.float64) ** power
    a = a / a.sum()
    f = torch.randn(N, D, generator=gen, dtype=torch.float64)
    up = torch.randn(D, generator=gen, dtype=torch.float64)
    a_rep = a.expand(M, N).clone().requires_grad_()
    idx, _ = sample(a_rep, K, replace, generator=gen)
    feats = f[idx].requires_grad_()  # (M, K, D)
    out = expectation(a_rep, idx, feats, replace, weights=weights, estimator=estimator)
    (out @ up).sum().backward()
    grad_f = torch.zeros(M, N, dtype=torch.float64).scatter_add_(1, idx, feats.grad @ up)
    return {
        "a": a,
        "value": out.detach(),  # (M, D)
        "value_exact": a @ f,
        "value_scale": (a @ f.abs()).norm(),
        "grad_f": grad_f,  # (M, N); exact a_i ⟨up, up⟩
        "grad_f_exact": a * (up @ up),
        "grad_logit": _logit_space(a, a_rep.grad),  # (M, N); exact φ(⟨f, up⟩)
        "grad_logit_exact": _logit_space(a, f @ up),
    }


def _errors(samples: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor | None = None):
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    rel = float((mean - exact).norm() / (scale if scale is not None else exact.norm()))
    slack = 1e-3 * exact.abs().max()
    excess = float(((mean - exact).abs() - 5 * se - slack).max())
    return rel, excess


def _check_unbiased(d):
    for name, scale in [("value", d["value_scale"]), ("grad_f", None), ("grad_logit", None)]:
        rel, excess = _errors(d[name], d[name + "_exact"], scale)
        assert rel < 0.02, f"{name}: relative error {rel:.4f} of the mean"
        assert excess <= 0, f"{name}: a coordinate is more than 5 standard errors off"


@pytest.mark.parametrize("replace", [True, False], ids=["with_replacement", "without_replacement"])
@pytest.mark.parametrize(("N", "K", "power"), CASES, ids=[f"N{n}-K{k}-p{p}" for n, k, p in CASES])
def test_value_and_gradients_unbiased(N, K, power, replace):
    _check_unbiased(_draws(N, K, power, replace))


@pytest.mark.parametrize("replace", [True, False], ids=["with_replacement", "without_replacement"])
def test_unbiased_with_nonuniform_weights(replace):
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    _check_unbiased(_draws(12, 4, 3, replace, weights=weights))


@pytest.mark.parametrize(("N", "K", "power"), [(12, 4, 1), (50, 10, 3), (100, 10, 1)])
def test_reference_tf_attention_gradient_is_biased(N, K, power):
    """Negative control: the TF reference's attention gradient fails the same test (proves power)."""
    d = _draws(N, K, power, replace=False, estimator="reference_tf", M=60_000)
    rel, _ = _errors(d["grad_logit"], d["grad_logit_exact"])
    assert rel > 0.1
    rel_f, _ = _errors(d["grad_f"], d["grad_f_exact"])  # its feature gradient is fine
    assert rel_f < 0.03


def test_plain_autograd_through_per_step_estimates_is_biased():
    """Negative control: autograd through F_k (no custom backward) misses the importance term."""
    gen = torch.Generator().manual_seed(3)
    N, K, M = 12, 4, 100_000
    a = torch.rand(N, generator=gen, dtype=torch.float64)
    a = a / a.sum()
    f = torch.randn(N, generator=gen, dtype=torch.float64)
    a_rep = a.expand(M, N).clone().requires_grad_()
    idx, probs = sample(a_rep, K, replace=False, generator=gen)
    pi = (1 - (torch.cumsum(probs, 1) - probs)).detach()
    fq = f[idx]
    per_step = torch.cumsum(probs * fq, 1) - probs * fq + pi * fq
    per_step.mean(1).sum().backward()
    rel = float((_logit_space(a, a_rep.grad.mean(0)) - _logit_space(a, f)).norm() / _logit_space(a, f).norm())
    assert rel > 0.1


def test_exact_when_all_positions_drawn_without_replacement():
    """Drawing all N positions makes the per-step estimate F_N exact; with weights on it, F = Σ a f."""
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 6, dtype=torch.float64), 1).requires_grad_()
    f = torch.randn(3, 6, 2, dtype=torch.float64)
    idx, _ = sample(a, 6, replace=False)
    feats = f.gather(1, idx.unsqueeze(-1).expand(3, 6, 2)).requires_grad_()
    w = torch.tensor([0, 0, 0, 0, 0, 1.0], dtype=torch.float64)
    out = expectation(a, idx, feats, replace=False, weights=w)
    torch.testing.assert_close(out, torch.einsum("bn,bnd->bd", a, f))
    up = torch.randn(3, 2, dtype=torch.float64)
    (out * up).sum().backward()
    # exact gradients: d/da_i = ⟨up, f_i⟩, d/df_{q_k} = a_{q_k} up
    torch.testing.assert_close(a.grad, torch.einsum("bnd,bd->bn", f, up))
    torch.testing.assert_close(feats.grad, a.detach().gather(1, idx).unsqueeze(-1) * up.unsqueeze(1))


def test_feature_gradient_is_the_exact_derivative():
    """With attention fixed the estimator is linear in the features: gradcheck the custom backward."""
    torch.manual_seed(1)
    a = torch.softmax(torch.randn(2, 7, dtype=torch.float64), 1)
    idx, _ = sample(a, 4, replace=False)
    f = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    for replace in (True, False):
        assert torch.autograd.gradcheck(lambda x, r=replace: expectation(a, idx, x, r), (f,))


def test_float32_and_dtype_promotion():
    a = torch.softmax(torch.randn(2, 9), 1).requires_grad_()
    idx, _ = sample(a, 3, replace=False)
    f = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    out = expectation(a, idx, f, replace=False)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


def test_shape_and_argument_errors():
    a = torch.softmax(torch.randn(2, 5), 1)
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="features"):
        expectation(a, idx, torch.randn(2, 4, 1), replace=True)
    with pytest.raises(ValueError, match="idx"):
        expectation(a, idx[:1], torch.randn(2, 3, 1), replace=True)
    with pytest.raises(TypeError, match="idx must be an integer"):
        expectation(a, idx.float(), torch.randn(2, 3, 1), replace=True)
    with pytest.raises(ValueError, match="estimator"):
        expectation(a, idx, torch.randn(2, 3, 1), replace=False, estimator="tf")
    with pytest.raises(ValueError, match="only without replacement"):
        expectation(a, idx, torch.randn(2, 3, 1), replace=True, estimator="reference_tf")
    with pytest.raises(ValueError, match="weights"):
        expectation(a, idx, torch.randn(2, 3, 1), replace=True, weights=torch.ones(4) / 4)
