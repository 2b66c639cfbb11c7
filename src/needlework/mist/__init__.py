"""MIST — Multiple Instance Spatial Transformer (Angles, Jin et al., CVPR 2021): its pure tensor operators.

:func:`local_spatial_softmax`, :func:`pool_scales`, :func:`nms`, :func:`extract_keypoints` (E_K),
:func:`ideal_heatmap` (G), :func:`sample_patches` (S), :func:`paste_patches` (S⁻¹) and the losses.
The models live in ``needlework.models.mist`` (``"mist"``), ``needlework.models.mist_baselines``
(``"mist.channelwise"``, ``"mist.grid"``) and ``needlework.models.mist_networks``; training by lifting in
``needlework.training.mist.MISTTask``.
"""

from needlework._lazy import lazy_module_getattr
from needlework.mist.ideal import ideal_heatmap, scale_split
from needlework.mist.keypoints import Keypoints, extract_keypoints, local_spatial_softmax, nms, pool_scales
from needlework.mist.losses import histogram_kl_loss, histogram_loss, reconstruction_loss
from needlework.mist.sampler import bilinear_sample, boxes_xyxy, paste_patches, sample_patches

__all__ = [
    "Keypoints",
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
]

# the models moved to needlework.models (one release of aliases)
_MOVED = {
    "MIST": "needlework.models.mist",
    "PatchTaskModel": "needlework.models.mist",
    "ChannelwiseMIST": "needlework.models.mist_baselines",
    "GridMIST": "needlework.models.mist_baselines",
    "HeatmapNet": "needlework.models.mist_networks",
    "MultiScaleHeatmap": "needlework.models.mist_networks",
    "PatchAutoencoder": "needlework.models.mist_networks",
    "PatchClassifier": "needlework.models.mist_networks",
    "soft_argmax": "needlework.models.mist_networks",
}
__getattr__ = lazy_module_getattr(__name__, {}, _MOVED)[0]
