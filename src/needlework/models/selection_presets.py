"""Registered paper-scale presets of DPS and IPS for Megapixel MNIST (1500² canvas, 50-px patches).

Keyword arguments override any preset value, e.g. ``create_model("ips.megapixel_mnist", n_keep=50)``.
"""

from __future__ import annotations

from typing import Any

from needlework.models.dps import DPS
from needlework.models.ips import IPS
from needlework.registry import register_model

IPS_MEGAPIXEL_MNIST: dict[str, Any] = dict(
    num_classes=10,
    tasks=["majority", "max", "top", "multilabel"],
    patch_size=50,
    n_keep=100,
    chunk_size=100,
    dim=128,
    encoder={"preset": "resnet18_layer2"},
    n_heads=8,
    d_k=16,
    d_inner=512,
    dropout=0.1,
    pos_encoding="1d",
)  # METHODS.md §6.2 [ref-code]

DPS_MEGAPIXEL_MNIST: dict[str, Any] = dict(
    num_classes=10,
    grid=30,
    patch_size=50,
    k=10,
    sigma=0.05,
    n_samples=500,
    sigma_schedule="cosine",
    sigma_end=1e-5,
    total_steps=150 * 313,  # 150 epochs of 5,000 images in batches of 16 (benbergner/dps schedule)
    low_scale=0.12,
    scorer_channels=(8, 16, 32),
    dim=128,
    encoder={"preset": "resnet18_layer2"},
    aggregation="transformer",
    n_layers=1,
    n_heads=8,
)  # [design]: the 30×30 grid of IPS's 50-px patches, DPS defaults of METHODS.md §4.5 / §5.3


@register_model("ips.megapixel_mnist")
def ips_megapixel_mnist(**overrides: Any) -> IPS:
    """IPS with the reference Megapixel MNIST settings (4 tasks, M = I = 100, ResNet-18 to layer2)."""
    return IPS(**(IPS_MEGAPIXEL_MNIST | overrides))


@register_model("dps.megapixel_mnist")
def dps_megapixel_mnist(**overrides: Any) -> DPS:
    """DPS on the 30×30 grid of 50-px cells of a 1500² Megapixel MNIST image (K = 10, S = 500)."""
    return DPS(**(DPS_MEGAPIXEL_MNIST | overrides))
