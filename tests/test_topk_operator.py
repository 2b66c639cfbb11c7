"""Tests of needlework.topk.perturbed_topk (METHODS.md §4.6 and §12.2)."""

from __future__ import annotations

import pytest
import torch

import needlework.topk.perturbed as perturbed_mod
from needlework.profiling import saved_tensor_bytes
from needlework.topk import hard_topk, normalize_scores, perturbed_topk
from needlework.topk.perturbed import draw_noise, noise_seed, perturbed_topk_support
from needlework.topk.reference import perturbed_topk_dense


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- §12.2 finite differences


@pytest.fixture(scope="module")
def fd_setting():
    """d = 8, K = 3, σ = 0.3, 4·10⁵ common-random-number draws; central differences with ε = 0.02."""
    torch.manual_seed(0)
    d, k, sigma, n_samples, eps = 8, 3, 0.3, 400_000, 0.02
    s = torch.rand(1, d, dtype=torch.float64)
    upstream = torch.randn(1, k, d, dtype=torch.float64)

    def phi(x: torch.Tensor) -> torch.Tensor:
        return (upstream * perturbed_topk(x, k, sigma, n_samples, gen(1))).sum()

    basis = torch.eye(d, dtype=torch.float64)
    fd = torch.stack([(phi(s + eps * e) - phi(s - eps * e)) / (2 * eps) for e in basis])
    return dict(s=s, k=k, sigma=sigma, n_samples=n_samples, upstream=upstream, fd=fd)


def vjp(setting: dict, jacobian: str) -> torch.Tensor:
    x = setting["s"].clone().requires_grad_()
    y = perturbed_topk(x, setting["k"], setting["sigma"], setting["n_samples"], gen(1), jacobian=jacobian)
    (setting["upstream"] * y).sum().backward()
    return x.grad[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_vjp_matches_finite_differences(fd_setting):
    v = vjp(fd_setting, "outer")
    assert rel_err(v, fd_setting["fd"]) < 0.08
    assert torch.nn.functional.cosine_similarity(v, fd_setting["fd"], dim=0) > 0.99


@pytest.mark.parametrize("jacobian", ["diagonal", "outer_times_k"])
def test_compatibility_jacobians_fail_finite_differences(fd_setting, jacobian):
    """Negative controls: the reproductions of ZoomMIL / benbergner-dps must fail the same check."""
    assert rel_err(vjp(fd_setting, jacobian), fd_setting["fd"]) > 0.3


def test_outer_times_k_is_k_times_outer(fd_setting):
    torch.testing.assert_close(vjp(fd_setting, "outer_times_k"), fd_setting["k"] * vjp(fd_setting, "outer"))


# ---------------------------------------------------------------- dense reference, same noise


@pytest.mark.parametrize("jacobian", ["outer", "diagonal", "outer_times_k"])
@pytest.mark.parametrize("chunk_elements", [None, 1000])
def test_equals_dense_reference_on_same_noise(monkeypatch, jacobian, chunk_elements):
    if chunk_elements is not None:  # force several noise chunks
        monkeypatch.setattr(perturbed_mod, "_CHUNK_ELEMENTS", chunk_elements)
    b, n, k, s = 3, 20, 4, 300
    scores = torch.randn(b, n, dtype=torch.float64)
    upstream = torch.randn(b, k, n, dtype=torch.float64)
    noise = draw_noise(noise_seed(gen(5)), (b, s, n), scores.device, scores.dtype)
    x1, x2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    y1 = perturbed_topk(x1, k, 0.4, s, gen(5), jacobian=jacobian)
    y2 = perturbed_topk_dense(x2, k, 0.4, noise, jacobian=jacobian)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    (upstream * y1).sum().backward()
    (upstream * y2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- forward invariants


def test_rows_sum_to_one_columns_at_most_one_and_sorted_by_position():
    scores = torch.randn(4, 30)
    y = perturbed_topk(scores, 5, 0.5, 200, gen(0))
    assert y.shape == (4, 5, 30)
    torch.testing.assert_close(y.sum(-1), torch.ones(4, 5))
    assert (y.sum(1) <= 1 + 1e-6).all()
    mean_position = (y * torch.arange(30.0)).sum(-1)  # (B, k)
    assert (mean_position.diff(dim=1) > 0).all()


def test_small_sigma_equals_hard_topk():
    scores = torch.randn(3, 50, dtype=torch.float64)
    expected = hard_topk(scores, 7)
    torch.testing.assert_close(perturbed_topk(scores, 7, 1e-8, 20, gen(0)), expected)
    torch.testing.assert_close(perturbed_topk(scores, 7, 0.0, 20), expected)
    torch.testing.assert_close(perturbed_topk(scores, 7, 0.5, 20, training=False), expected)


def test_hard_topk_rows_are_one_hot_at_sorted_top_indices():
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.8, 0.5]])
    y = hard_topk(scores, 3)
    assert y.argmax(-1).tolist() == [[1, 3, 4]]  # top-3 values 0.9, 0.8, 0.5 by position
    assert (y.sum(-1) == 1).all()


def test_eval_output_has_no_gradient_path():
    scores = torch.randn(2, 10, requires_grad=True)
    assert not perturbed_topk(scores, 3, 0.1, 10, training=False).requires_grad


def test_same_generator_seed_reproduces_forward_and_backward():
    scores = torch.randn(2, 15)
    outs = []
    for _ in range(2):
        x = scores.clone().requires_grad_()
        y = perturbed_topk(x, 3, 0.2, 50, gen(3))
        (y * torch.arange(45.0).view(1, 3, 15)).sum().backward()
        outs.append((y, x.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


def test_shift_invariance_gradient_sums_to_zero_within_mc_error():
    """Adding a constant to all scores leaves Ŷ unchanged, so E[Σ_e grad_e] = 0."""
    n, k, s, sigma = 12, 3, 20_000, 0.2
    scores = torch.rand(1, n, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(1, k, n, dtype=torch.float64)
    y = perturbed_topk(scores, k, sigma, s, gen(2))
    (upstream * y).sum().backward()
    # per-sample terms of Σ_e grad_e = mean_n c_n Σ_e Z_n[e] / σ, to get the standard error
    noise = draw_noise(noise_seed(gen(2)), (1, s, n), scores.device, scores.dtype)[0]
    idx = (scores.detach() + sigma * noise).topk(k, dim=-1).indices.sort(-1).values
    c = upstream[0].gather(1, idx.T).sum(0)
    terms = c * noise.sum(-1) / sigma
    torch.testing.assert_close(scores.grad.sum(), terms.mean())
    assert abs(float(terms.mean())) < 4 * float(terms.std() / s**0.5)


def test_normalize_makes_output_invariant_to_affine_rescaling():
    scores = torch.randn(2, 25)
    y1 = perturbed_topk(scores, 4, 0.1, 100, gen(0), normalize=True)
    y2 = perturbed_topk(3 * scores + 7, 4, 0.1, 100, gen(0), normalize=True)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=0)
    z = normalize_scores(scores)
    torch.testing.assert_close(z.min(-1).values, torch.zeros(2))
    assert (z.max(-1).values < 1).all() and (z.max(-1).values > 0.999).all()


def test_gradient_flows_through_normalisation():
    x = torch.randn(2, 10, requires_grad=True)
    y = perturbed_topk(x, 3, 0.1, 50, gen(0), normalize=True)
    (y * torch.randn(2, 3, 10)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_noncontiguous_and_float32_match_contiguous():
    base = torch.randn(20, 3).T  # non-contiguous (3, 20)
    y1 = perturbed_topk(base, 4, 0.3, 64, gen(9))
    y2 = perturbed_topk(base.contiguous(), 4, 0.3, 64, gen(9))
    torch.testing.assert_close(y1, y2)
    assert y1.dtype == torch.float32


# ---------------------------------------------------------------- memory


def test_backward_saves_only_sampled_indices_never_dense_tensors():
    b, n, k, s = 2, 2000, 5, 100
    x = torch.randn(b, n, requires_grad=True)
    y, nbytes = saved_tensor_bytes(lambda: perturbed_topk(x, k, 0.1, s, gen(0)))
    assert nbytes == b * s * k * 8  # int64 indices (B, S, k) only
    assert nbytes < b * s * n * 4 / 10  # not even the noise (B, S, N)
    _, dense_bytes = saved_tensor_bytes(lambda: perturbed_topk_dense(x, k, 0.1, torch.randn(b, s, n)))
    assert dense_bytes >= b * s * k * n * 4  # the dense formulation keeps the one-hot tensor
    y.sum().backward()  # backward must run without the saved noise


def test_no_operation_allocates_more_than_order_n(monkeypatch):
    """Every tensor produced by forward and backward has at most max(B·S·k, B·chunk·N) elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(perturbed_mod, "_CHUNK_ELEMENTS", 10_000)
    b, n, k, s = 1, 3000, 4, 50
    sizes: list[int] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    x = torch.randn(b, n, requires_grad=True)
    upstream = torch.randn(b, k, n)
    with Spy():
        y = perturbed_topk(x, k, 0.1, s, gen(0))
        (y * upstream).sum().backward()
    chunk = max(1, 10_000 // (b * n)) * b * n  # one noise chunk
    assert max(sizes) <= max(chunk, b * k * n, b * s * k)
    assert max(sizes) < b * s * n  # never the full noise, let alone (B, S, k, N) or (B, k, N, N)


# ---------------------------------------------------------------- the support form


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("jacobian", ["outer", "diagonal", "outer_times_k"])
def test_support_form_equals_the_dense_operator(dtype, jacobian):
    """Same seed: the weights are the dense indicators at the support, every other column of the dense
    output is zero, and the gradient for the same upstream (on the support) is identical."""
    b, n, k, s = 3, 400, 4, 30
    torch.manual_seed(0)
    x = torch.randn(b, n, dtype=dtype)
    x[1, :k] += 10.0  # row 1 always picks its first k: a support of k columns, padded to U
    upstream = torch.randn(b, k, n, dtype=dtype)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense = perturbed_topk(xd, k, 0.2, s, gen(3), jacobian=jacobian)
    support, weights = perturbed_topk_support(xs, k, 0.2, s, gen(3), jacobian=jacobian)
    assert support.dtype == torch.int64 and weights.shape == (b, k, support.shape[1])
    assert support.shape[1] <= s * k
    for r in range(b):
        real = torch.unique(support[r])
        assert torch.equal(support[r], torch.sort(support[r]).values)
        outside = torch.ones(n, dtype=torch.bool)
        outside[real] = False
        assert not dense[r][:, outside].any()  # the support holds every non-zero column
        torch.testing.assert_close(weights[r][:, : len(real)], dense[r][:, real], rtol=0, atol=0)
        assert not weights[r][:, len(real) :].any()  # padding weighs nothing
    assert torch.equal(support[1, :k], torch.arange(k)) and (support[1, k:] == k - 1).all()
    (dense * upstream).sum().backward()
    (weights * upstream.gather(2, support.unsqueeze(1).expand(-1, k, -1))).sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad)


def test_support_form_hard_path_and_memory():
    x = torch.randn(2, 50, requires_grad=True)
    support, weights = perturbed_topk_support(x, 3, 0.1, 20, training=False)
    assert torch.equal(support, hard_topk(x.detach(), 3).argmax(-1))
    assert torch.equal(weights, torch.eye(3).expand(2, 3, 3)) and not weights.requires_grad
    support, weights = perturbed_topk_support(x, 3, 0.0, 20)
    assert support.shape == (2, 3)
    b, n, k, s = 1, 100_000, 8, 50
    x = torch.randn(b, n, requires_grad=True)
    (support, weights), nbytes = saved_tensor_bytes(lambda: perturbed_topk_support(x, k, 0.05, s, gen(0)))
    assert nbytes == 2 * b * s * k * 8  # sampled indices and their positions in the support
    assert weights.numel() <= b * k * s * k  # never (B, k, N)
    weights.sum().backward()
    assert x.grad.shape == (b, n)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(k=0), "k must be"), (dict(sigma=-1.0), "sigma must be"), (dict(jacobian="x"), "jacobian")],
)
def test_support_form_checks_its_arguments(kwargs, match):
    args = dict(scores=torch.randn(2, 5), k=2, sigma=0.1, n_samples=10) | kwargs
    with pytest.raises(ValueError, match=match):
        perturbed_topk_support(**args)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores=torch.randn(5)), "scores must have shape"),
        (dict(scores=torch.randint(0, 3, (2, 5))), "floating-point"),
        (dict(k=0), "k must be"),
        (dict(k=6), "k must be"),
        (dict(sigma=-0.1), "sigma must be"),
        (dict(n_samples=0), "n_samples"),
        (dict(jacobian="transposed"), "jacobian must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(scores=torch.randn(2, 5), k=2, sigma=0.1, n_samples=10) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        perturbed_topk(**args)
