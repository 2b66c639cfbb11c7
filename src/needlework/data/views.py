"""Multi-resolution views for any image dataset: ``image`` → ``x_high`` (the image) and ``x_low``.

Attention sampling, DPS and IPS look at a cheap low-resolution view first and read full-resolution
patches only where it points. :class:`MultiResolutionViews` makes both views from any dataset whose items
carry ``image (C, H, W)``, so every selection model trains on needle-MNIST (or any other image dataset)
through ``needlework fit``. From YAML, on the data module::

    data:
      init_args:
        transforms: [{name: views, factor: 8}]

Example:
    >>> item = {"image": torch.arange(16.0).view(1, 4, 4), "label": 1}
    >>> out = MultiResolutionViews(factor=2)(item)
    >>> out["x_low"].tolist()
    [[[2.5, 4.5], [10.5, 12.5]]]
    >>> out["x_high"] is item["image"], sorted(out)
    (True, ['image', 'label', 'x_high', 'x_low'])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from needlework.checks import check_shape
from needlework.registry import register_transform

__all__ = ["MultiResolutionViews", "area_downsample"]


def area_downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean over ``factor × factor`` blocks: ``(..., C, H, W)`` → ``(..., C, H // factor, W // factor)``.

    Trailing rows/columns that do not fill a block are dropped, so ``x_low`` cell ``(i, j)`` covers exactly
    ``x_high[..., i·f:(i+1)·f, j·f:(j+1)·f]`` — the mapping the selection models assume.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    h, w = image.shape[-2:]
    if h < factor or w < factor:
        raise ValueError(f"image of size {(h, w)} is smaller than the downsampling factor {factor}")
    lead = image.shape[:-2]
    x = image[..., : h - h % factor, : w - w % factor].reshape(-1, 1, h - h % factor, w - w % factor)
    return F.avg_pool2d(x, factor).reshape(*lead, h // factor, w // factor)


@register_transform("views")
class MultiResolutionViews:
    """Sample transform adding ``x_high`` (the ``image`` tensor itself, no copy) and ``x_low``.

    Args:
        factor: ``x_low`` is the image area-downsampled by this integer factor (mean over blocks).
        key: the entry holding the image ``(C, H, W)``.
        keep_image: keep ``key`` in the item (saliency and figures use it; it is the same tensor).
    """

    def __init__(self, factor: int = 8, key: str = "image", keep_image: bool = True) -> None:
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"views: factor must be a positive integer, got {factor!r}")
        self.factor, self.key, self.keep_image = factor, key, keep_image

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        if self.key not in item:
            raise KeyError(f"views: the item has no {self.key!r} entry (keys: {sorted(item)})")
        image = item[self.key]
        check_shape(image, ["C", "H", "W"], self.key)
        out = {k: v for k, v in item.items() if self.keep_image or k != self.key}
        out["x_high"] = image
        out["x_low"] = area_downsample(image, self.factor)
        return out

    def __repr__(self) -> str:
        return f"MultiResolutionViews(factor={self.factor}, key={self.key!r})"
