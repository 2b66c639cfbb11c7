"""``nn.Module`` wrapper of :func:`perturbed_topk` with σ schedules (constant, linear, cosine decay)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from needlework.topk.perturbed import JACOBIANS, perturbed_topk, perturbed_topk_support

SCHEDULES = ("constant", "linear", "cosine")


def scheduled_sigma(schedule: str, sigma: float, progress: float, sigma_end: float = 0.0) -> float:
    """σ at training ``progress`` ∈ [0, 1] (clamped) for a decay from ``sigma`` to ``sigma_end``.

    ``constant``: σ; ``linear``: σ + (σ_end − σ)·p (DPS JAX: to 0); ``cosine``:
    σ_end + (σ − σ_end)·(1 + cos πp)/2 (benbergner/dps: to 1e-5).

    Example:
        >>> scheduled_sigma("linear", 0.05, 0.5), scheduled_sigma("cosine", 0.05, 1.0, 1e-5)
        (0.025, 1e-05)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return float(sigma)
    if schedule == "linear":
        return float(sigma + (sigma_end - sigma) * p)
    return float(sigma_end + (sigma - sigma_end) * 0.5 * (1.0 + math.cos(math.pi * p)))


class PerturbedTopK(nn.Module):
    """Perturbed top-K as a module: soft indicators in training mode, hard top-K in eval mode.

    σ follows ``schedule`` over ``total_steps`` training forwards (counted in the ``step`` buffer,
    which is saved with the state dict so resumed runs continue the schedule); call
    :meth:`set_progress` to drive it from outside instead.

    Args:
        k: number of selected entries.
        sigma: initial σ.
        n_samples: noise draws S.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        total_steps: length of the decay (training forwards); required unless constant.
        sigma_end: σ at the end of the decay.
        normalize: min-max normalise the scores first (DPS).
        jacobian: see :func:`perturbed_topk`.

    Example:
        >>> op = PerturbedTopK(2, sigma=0.05, n_samples=50)
        >>> op(torch.rand(3, 10)).shape
        torch.Size([3, 2, 10])
    """

    def __init__(
        self,
        k: int,
        sigma: float = 0.05,
        n_samples: int = 500,
        schedule: str = "constant",
        total_steps: int | None = None,
        sigma_end: float = 0.0,
        normalize: bool = False,
        jacobian: str = "outer",
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule != "constant" and (total_steps is None or total_steps < 1):
            raise ValueError(f"schedule {schedule!r} needs total_steps >= 1, got {total_steps!r}")
        if jacobian not in JACOBIANS:
            raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
        self.k, self.sigma0, self.n_samples = int(k), float(sigma), int(n_samples)
        self.schedule, self.total_steps, self.sigma_end = schedule, total_steps, float(sigma_end)
        self.normalize, self.jacobian = normalize, jacobian
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._progress: float | None = None

    def set_progress(self, progress: float) -> None:
        """Fix the schedule position (fraction of training done) instead of counting forwards."""
        self._progress = float(progress)

    @property
    def sigma(self) -> float:
        """The current σ."""
        if self.schedule == "constant":
            return self.sigma0
        progress = self._progress
        if progress is None:
            progress = int(self.step) / float(self.total_steps or 1)
        return scheduled_sigma(self.schedule, self.sigma0, progress, self.sigma_end)

    def _call(self, op: Any, scores: torch.Tensor, generator: torch.Generator | None) -> Any:
        sigma = self.sigma
        if self.training and torch.is_grad_enabled():
            self.step += 1
        return op(
            scores,
            self.k,
            sigma,
            self.n_samples,
            generator,
            training=self.training,
            normalize=self.normalize,
            jacobian=self.jacobian,
        )

    def forward(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``scores (B, N)`` → indicators ``(B, k, N)``."""
        return self._call(perturbed_topk, scores, generator)

    def support(
        self, scores: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``scores (B, N)`` → ``support (B, U)``, ``weights (B, k, U)`` (see
        :func:`~needlework.topk.perturbed.perturbed_topk_support`): no ``(B, k, N)`` tensor."""
        return self._call(perturbed_topk_support, scores, generator)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, sigma={self.sigma0}, n_samples={self.n_samples}, schedule={self.schedule!r}, "
            f"total_steps={self.total_steps}, jacobian={self.jacobian!r}"
        )
