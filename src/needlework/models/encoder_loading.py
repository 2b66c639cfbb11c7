"""Loading tile encoders: local state dicts, timm, torchvision and Hugging Face models.

``build_tile_encoder(spec, weights=None)`` accepts

* a registered name (``"resnet50_trunc"``, ``"resnet8"``, ``"color_stats"``; ``needlework list encoders``),
  with an optional local state-dict file;
* ``"timm:<model>"`` (also ``"timm:hf_hub:<repo>"``) — needs ``pip install 'needlework[timm]'``;
* ``"torchvision:<model>"`` — torchvision's architecture, weights from a local file;
* ``"hf:<repo or local folder>"`` — a ``transformers`` vision model (CLS token or pooler output).

timm, torchvision and transformers are optional and are imported only here, inside the functions. Weights
are never downloaded unless ``pretrained=True`` is asked for. A local-checkpoint registry (JSON
``{name: path}``, path in ``$NEEDLEWORK_LOCAL_CKPTS``; TRIDENT's ``local_ckpts.json`` idea) supplies
weights to offline users by encoder name.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from needlework.io.checkpoints import (  # noqa: F401  (re-exported: the old home)
    HEAD_PREFIXES,
    EncoderUnavailableError,
    load_state_dict_file,
    load_weights_into,
)
from needlework.io.local_checkpoints import LOCAL_CKPTS_ENV, local_checkpoints  # noqa: F401
from needlework.models.encoders import IMAGENET_MEAN, IMAGENET_STD, TileEncoder
from needlework.registry import create_encoder


def _dry_dim(net: nn.Module, size: int) -> int:
    with torch.no_grad():
        return int(net(torch.zeros(1, 3, size, size)).reshape(1, -1).shape[1])


def timm_encoder(model_name: str, weights: str | None = None, pretrained: bool = False) -> TileEncoder:
    """A timm model without its head (``num_classes=0``); normalisation from timm's data config."""
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision's operator error on CPU-only torch
        raise EncoderUnavailableError(
            f"encoder 'timm:{model_name}' needs timm: pip install 'needlework[timm]' "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    try:
        net = timm.create_model(model_name, pretrained=pretrained and weights is None, num_classes=0)
    except Exception as exc:
        raise RuntimeError(
            f"timm could not build {model_name!r} ({exc}). Offline? Pass a local state dict with --weights."
        ) from exc
    if weights is not None:
        load_weights_into(net, weights)
    cfg = timm.data.resolve_data_config({}, model=net)
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    enc = TileEncoder(
        net,
        int(getattr(net, "num_features", 0)) or _dry_dim(net, size),
        f"timm:{model_name}",
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
        size,
        version=f"timm-{timm.__version__}:"
        + (f"weights:{weights}" if weights else "pretrained" if pretrained else "random-init"),
    )
    return enc.eval()


def torchvision_encoder(model_name: str, weights: str | None = None) -> TileEncoder:
    """A torchvision architecture with its classifier replaced by ``Identity``; weights from a local file."""
    try:
        import torchvision
    except Exception as exc:
        raise EncoderUnavailableError(
            f"encoder 'torchvision:{model_name}' needs a torchvision that imports with this torch "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    net = torchvision.models.get_model(model_name, weights=None)
    if weights is not None:
        load_weights_into(net, weights)
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(net, head):
            setattr(net, head, nn.Identity())
            break
    enc = TileEncoder(
        net,
        _dry_dim(net.eval(), 224),
        f"torchvision:{model_name}",
        version=f"torchvision-{torchvision.__version__}:"
        + (f"weights:{weights}" if weights else "random-init"),
    )
    return enc.eval()


class _HFWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.reshape(pooled.shape[0], -1)
        return out.last_hidden_state[:, 0]


def hf_encoder(repo: str, weights: str | None = None) -> TileEncoder:
    """A Hugging Face ``transformers`` vision model (local folder or cached repo; no implicit download)."""
    try:
        import transformers
    except Exception as exc:
        raise EncoderUnavailableError(
            f"encoder 'hf:{repo}' needs `pip install transformers` ({exc})"
        ) from exc
    local_only = not os.environ.get("NEEDLEWORK_ALLOW_DOWNLOAD")
    try:
        model = transformers.AutoModel.from_pretrained(repo, local_files_only=local_only)
    except Exception as exc:
        raise RuntimeError(
            f"could not load {repo!r} from local files ({exc}); give a local folder, or set "
            "NEEDLEWORK_ALLOW_DOWNLOAD=1 to allow a download"
        ) from exc
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(repo, local_files_only=local_only)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        size = int(proc.size.get("shortest_edge") or proc.size.get("height") or 224)
    except Exception:
        pass  # no processor config: ImageNet statistics
    net = _HFWrapper(model)
    if weights is not None:
        load_weights_into(model, weights)
    return TileEncoder(
        net,
        _dry_dim(net.eval(), size),
        f"hf:{repo}",
        mean,
        std,
        size,
        version=f"transformers-{transformers.__version__}",
    ).eval()


# Registered encoders whose name promises trained features (ImageNet / histology ResNets): without
# weights they are random networks. resnet8 and color_stats mean nothing more than they compute.
PRETRAINED_ENCODERS = frozenset({"resnet18", "resnet50", "resnet50_trunc"})


def random_weights_of(
    spec: str, weights: str | None = None, pretrained: bool = False, local_ckpts: str | None = None
) -> bool:
    """Whether ``spec`` would be built with random weights although its name means a trained model.

    True for the ResNets of :data:`PRETRAINED_ENCODERS` and ``timm:`` / ``torchvision:`` models when
    no weights are given (``weights``, the local-checkpoint registry, or ``pretrained=True`` for timm).
    ``hf:`` models always load their repository's weights.
    """
    if weights or local_checkpoints(local_ckpts).get(spec):
        return False
    if spec.startswith("timm:"):
        return not pretrained
    if spec.startswith("torchvision:"):
        return True
    return spec in PRETRAINED_ENCODERS


def build_tile_encoder(
    spec: str,
    weights: str | None = None,
    pretrained: bool = False,
    local_ckpts: str | None = None,
    **kwargs: Any,
) -> TileEncoder:
    """Build an encoder from a registered name or a ``timm:`` / ``torchvision:`` / ``hf:`` spec.

    ``weights`` defaults to the local-checkpoint registry entry for ``spec`` when there is one.
    """
    if weights is None:
        weights = local_checkpoints(local_ckpts).get(spec)
    if spec.startswith("timm:"):
        return timm_encoder(spec[5:], weights, pretrained)
    if spec.startswith("torchvision:"):
        return torchvision_encoder(spec[12:], weights)
    if spec.startswith("hf:"):
        return hf_encoder(spec[3:], weights)
    return create_encoder(spec, weights=weights, **kwargs)
