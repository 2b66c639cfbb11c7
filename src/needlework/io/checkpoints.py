"""State-dict files: read any common checkpoint container, load it into a module with clear errors.

``load_state_dict_file`` reads ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``) and
``.safetensors``; ``load_weights_into`` checks keys and shapes before loading. Rebuilding a whole
registered model from a checkpoint is ``needlework.load_model`` (``models/checkpoint.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HEAD_PREFIXES", "EncoderUnavailableError", "load_state_dict_file", "load_weights_into"]

HEAD_PREFIXES = ("fc.", "head.", "classifier.", "heads.", "head_drop.", "layer4.")


class EncoderUnavailableError(ImportError):
    """An optional package needed for this encoder is not installed (or does not import)."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``, ``.safetensors``)
    and unwrap the usual containers (``state_dict``, ``model``, ``module.`` / ``model.`` prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise EncoderUnavailableError(
                f"{path}: reading .safetensors needs `pip install safetensors`"
            ) from exc
        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def load_weights_into(module: nn.Module, weights: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load a state dict into ``module``; checkpoint keys of classifier heads (and of stages the module
    does not have, e.g. ``layer4`` of a truncated ResNet) are ignored and returned.

    Raises:
        KeyError: parameters of ``module`` missing from the checkpoint, or unexpected keys that are
            not heads (listing a few of each) — usually the wrong architecture.
        ValueError: a parameter's shape differs.
    """
    state = load_state_dict_file(weights) if not isinstance(weights, Mapping) else dict(weights)
    own = module.state_dict()
    ignored = [k for k in state if k not in own and k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own and k not in ignored]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match the encoder: {len(missing)} missing keys (e.g. {missing[:4]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]}); is it the right architecture?"
        )
    for k in own:
        if k in state and state[k].shape != own[k].shape:
            raise ValueError(
                f"checkpoint key {k!r} has shape {tuple(state[k].shape)}, encoder expects "
                f"{tuple(own[k].shape)}"
            )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return ignored
