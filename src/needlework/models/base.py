"""The model contract shared by every needlework model.

Every model is an ``nn.Module`` whose ``forward`` takes tensors by name and returns a ``dict``
with at least ``logits`` ``(B, C)``. Optional keys, when the model has them:

* ``attention`` ``(B, N)`` — per-instance / per-position weights (0 at masked positions);
* ``instance_logits`` ``(B, N, C)`` or ``logit_map`` ``(B, C, h, w)`` — per-instance scores for heatmaps;
* ``embedding`` ``(B, D')``; ``selected_idx`` ``(B, K)``; ``selected_coords`` ``(B, K, 2)``;
* ``aux_loss`` — ``dict[str, Tensor]`` of auxiliary losses already weighted.

The argument names of ``forward`` are the keys of a batch (``image``, ``bag``, ``coords``, ``mask``,
``x_low``, ``x_high`` ...): the training task passes each batch entry to the parameter of the same name,
so one training loop serves every model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class NeedleworkModel(nn.Module):
    """Base class: default loss and batch routing. Subclasses implement ``forward``.

    Args:
        multilabel: if True, ``target`` is ``(B, C)`` in {0, 1} and the loss is binary cross-entropy
            per class; otherwise ``target`` is ``(B,)`` class indices and the loss is cross-entropy.
    """

    multilabel: bool = False

    def compute_loss(
        self, output: dict[str, Any], target: torch.Tensor, class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named parts (the task loss plus any ``output["aux_loss"]``)."""
        logits = output["logits"]
        if self.multilabel:
            task = F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=class_weight)
        else:
            task = F.cross_entropy(logits, target.long(), weight=class_weight)
        parts = {"task": task}
        total = task
        for name, value in (output.get("aux_loss") or {}).items():
            parts[name] = value
            total = total + value
        return total, parts

    def forward_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Call ``forward`` with the batch entries whose keys match its parameter names."""
        return self(**route_batch(self.forward, batch))

    @torch.no_grad()
    def predict(self, **inputs: Any) -> dict[str, Any]:
        """Eval-mode forward without gradient; adds ``probs`` (softmax, or sigmoid if multi-label)."""
        was_training = self.training
        self.eval()
        try:
            out = self(**inputs)
        finally:
            self.train(was_training)
        logits = out["logits"]
        out["probs"] = torch.sigmoid(logits) if self.multilabel else logits.softmax(-1)
        return out


def route_batch(forward: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that ``forward`` accepts as keyword arguments.

    Raises a clear error when a required parameter has no entry in the batch.
    """
    params = inspect.signature(forward).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in batch.items() if accepts_any or k in params}
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in batch
    ]
    if missing:
        raise KeyError(
            f"model.forward needs {missing} but the batch has keys {sorted(batch)}; "
            "check that the data module and the model belong together"
        )
    return kwargs
