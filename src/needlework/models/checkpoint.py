"""``load_model(path)``: rebuild a registered model from a Lightning checkpoint or a plain state dict."""

from __future__ import annotations

from pathlib import Path

import torch

import needlework.models  # noqa: F401  (registers the built-in models)
from needlework.models.encoder_loading import load_state_dict_file
from needlework.registry import create_model

__all__ = ["load_model"]


def load_model(
    checkpoint: str | Path, model: str | None = None, model_kwargs: dict | None = None
) -> torch.nn.Module:
    """A registered model with weights from a state dict or a Lightning checkpoint, in eval mode.

    Example (any ``fit`` run): ``net = needlework.load_model("runs/abmil/version_0/checkpoints/best.ckpt")``.

    For a Lightning checkpoint of ``ClassificationTask`` the model name and kwargs default to the
    checkpoint's ``hyper_parameters`` (``model``, ``model_kwargs``) and ``model.`` prefixes are stripped.
    """
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = raw.get("hyper_parameters", {}) if isinstance(raw, dict) else {}
    name = model or hparams.get("model")
    kwargs = model_kwargs if model_kwargs is not None else dict(hparams.get("model_kwargs") or {})
    if "num_classes" in hparams and "num_classes" not in kwargs:
        kwargs["num_classes"] = hparams["num_classes"]
    if not name:
        raise ValueError(
            f"{checkpoint}: no model name in the checkpoint; pass --model NAME (and --model_kwargs)"
        )
    net = create_model(name, **kwargs)
    state = load_state_dict_file(checkpoint)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise KeyError(
            f"{checkpoint} does not fit model {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return net.eval()
