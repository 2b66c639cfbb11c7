"""Tests of the PerturbedTopK module and the σ schedules."""

from __future__ import annotations

import math

import pytest
import torch

from needlework.topk import PerturbedTopK, hard_topk, perturbed_topk, scheduled_sigma


def test_module_equals_functional_in_training_and_hard_in_eval():
    scores = torch.randn(3, 12)
    op = PerturbedTopK(4, sigma=0.2, n_samples=40)
    torch.testing.assert_close(
        op(scores, torch.Generator().manual_seed(1)),
        perturbed_topk(scores, 4, 0.2, 40, torch.Generator().manual_seed(1)),
    )
    op.eval()
    torch.testing.assert_close(op(scores), hard_topk(scores, 4))


def test_module_normalize_and_jacobian_are_forwarded():
    scores = torch.randn(2, 9, requires_grad=True)
    op = PerturbedTopK(2, sigma=0.3, n_samples=30, normalize=True, jacobian="outer_times_k")
    y = op(scores, torch.Generator().manual_seed(0))
    ref = perturbed_topk(
        scores, 2, 0.3, 30, torch.Generator().manual_seed(0), normalize=True, jacobian="outer_times_k"
    )
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 1.0, 1.5])
def test_schedules_match_their_formulas(progress):
    p = min(progress, 1.0)
    assert scheduled_sigma("constant", 0.05, progress) == 0.05
    assert math.isclose(scheduled_sigma("linear", 0.05, progress), 0.05 * (1 - p))
    cos = 1e-5 + (0.05 - 1e-5) * 0.5 * (1 + math.cos(math.pi * p))
    assert math.isclose(scheduled_sigma("cosine", 0.05, progress, 1e-5), cos)


def test_module_counts_training_forwards_and_decays_sigma():
    op = PerturbedTopK(2, sigma=0.1, n_samples=5, schedule="linear", total_steps=4)
    scores = torch.randn(1, 6)
    seen = []
    for _ in range(5):
        seen.append(op.sigma)
        op(scores)
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])
    # at σ = 0 the output is the hard top-K
    torch.testing.assert_close(op(scores), hard_topk(scores, 2))
    # eval-mode and no-grad forwards do not advance the schedule
    step = int(op.step)
    op.eval()
    op(scores)
    op.train()
    with torch.no_grad():
        op(scores)
    assert int(op.step) == step


def test_schedule_position_is_saved_in_state_dict_and_can_be_set():
    op = PerturbedTopK(2, sigma=0.1, n_samples=5, schedule="cosine", total_steps=10)
    for _ in range(5):
        op(torch.randn(1, 6))
    other = PerturbedTopK(2, sigma=0.1, n_samples=5, schedule="cosine", total_steps=10)
    other.load_state_dict(op.state_dict())
    assert other.sigma == pytest.approx(0.05)
    other.set_progress(1.0)
    assert other.sigma == pytest.approx(0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="exp"), "schedule must be one of"),
        (dict(schedule="linear"), "needs total_steps"),
        (dict(jacobian="dense"), "jacobian must be one of"),
    ],
)
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerturbedTopK(2, **kwargs)
