"""MIST — Multiple Instance Spatial Transformer (Angles, Jin et al., CVPR 2021).

Operators (pure tensors): :func:`local_spatial_softmax`, :func:`pool_scales`, :func:`nms`,
:func:`extract_keypoints` (E_K), :func:`ideal_heatmap` (G), :func:`sample_patches` (S),
:func:`paste_patches` (S⁻¹). Models: :class:`MIST` (``"mist"``), :class:`ChannelwiseMIST`
(``"mist.channelwise"``), :class:`GridMIST` (``"mist.grid"``). Training by lifting:
``needlework.mist.training.MISTTask`` (imported on demand: it pulls in Lightning).
"""

from needlework.mist.baselines import ChannelwiseMIST, GridMIST
from needlework.mist.heatmap import Keypoints, extract_keypoints, local_spatial_softmax, nms, pool_scales
from needlework.mist.ideal import ideal_heatmap, scale_split
from needlework.mist.losses import histogram_kl_loss, histogram_loss, reconstruction_loss
from needlework.mist.model import MIST, PatchTaskModel
from needlework.mist.networks import (
    HeatmapNet,
    MultiScaleHeatmap,
    PatchAutoencoder,
    PatchClassifier,
    soft_argmax,
)
from needlework.mist.sampler import bilinear_sample, boxes_xyxy, paste_patches, sample_patches

__all__ = [
    "MIST",
    "ChannelwiseMIST",
    "GridMIST",
    "HeatmapNet",
    "Keypoints",
    "MultiScaleHeatmap",
    "PatchAutoencoder",
    "PatchClassifier",
    "PatchTaskModel",
    "bilinear_sample",
    "boxes_xyxy",
    "extract_keypoints",
    "histogram_kl_loss",
    "histogram_loss",
    "ideal_heatmap",
    "local_spatial_softmax",
    "nms",
    "paste_patches",
    "pool_scales",
    "reconstruction_loss",
    "sample_patches",
    "scale_split",
    "soft_argmax",
]
