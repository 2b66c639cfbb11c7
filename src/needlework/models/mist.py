"""MIST — Multiple Instance Spatial Transformer (Angles, Jin et al., CVPR 2021), METHODS.md §8.

Forward: heatmap network (per-scale local softmax) → E_K (pool scales, NMS, top-K, scale moments) →
bilinear sampler S cuts one patch per keypoint → task network per patch. The detector is trained by
lifting (:class:`needlework.training.mist.MISTTask`), never through the top-K.

Output dict of ``forward(image)``: ``logits (B, C)`` (log of the predicted class histogram, classification),
``instance_logits (B, K, C)``, ``boxes (B, K, 4)`` xyxy, ``scores (B, K)``, ``centres (B, K, 2)``,
``sizes (B, K)``, ``selected_coords (B, K, 2)`` (box top-left), ``heatmaps (B, S, H, W)`` (MIST only);
reconstruction adds ``reconstruction (B, C, H, W)`` and ``patch_reconstructions (B, K, C, P, P)``.

Example:
    >>> model = MIST(k=3, heatmap_width=8, classifier_widths=(8, 8), classifier_blocks=1)
    >>> out = model(torch.rand(2, 1, 40, 40))
    >>> tuple(out["logits"].shape), tuple(out["boxes"].shape)
    ((2, 10), (2, 3, 4))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from needlework.checks import check_shape
from needlework.mist.ideal import ideal_heatmap
from needlework.mist.keypoints import extract_keypoints
from needlework.mist.losses import histogram_kl_loss, histogram_loss, reconstruction_loss
from needlework.mist.sampler import boxes_xyxy, paste_patches, sample_patches
from needlework.models.base import NeedleworkModel
from needlework.models.mist_networks import HeatmapNet, MultiScaleHeatmap, PatchAutoencoder, PatchClassifier
from needlework.registry import register_model

TASKS = ("classification", "reconstruction")
HISTOGRAM_LOSSES = {"l2": histogram_loss, "kl": histogram_kl_loss}


class PatchTaskModel(NeedleworkModel):
    """Shared part of MIST and its baselines: K boxes → patches → task network.

    Subclasses implement :meth:`locate` and set ``training_mode``: ``"lifting"`` (MIST),
    ``"end_to_end"`` (gradient through the locations) or ``"task_only"`` (fixed locations).

    Args:
        task: ``"classification"`` (class-histogram loss) or ``"reconstruction"`` (auto-encoder per patch).
        num_classes: classes of the classification task.
        k: patches per image K.
        in_channels: image channels.
        patch_size: side P of the resampled patches (32 in the reference).
        anchor: box side in image pixels at scale 1 (0.25 · 80 = 20 for MNIST-hard).
        classifier_widths, classifier_blocks: :class:`PatchClassifier` levels and blocks per level.
        latent_dim, ae_width: :class:`PatchAutoencoder` code size and width.
        class_loss: ``"l2"`` (paper eq. 9, default) or ``"kl"`` (cross-entropy of the histograms, see
            :func:`~needlework.mist.losses.histogram_kl_loss`).
    """

    training_mode = "task_only"

    def __init__(
        self,
        task: str = "classification",
        num_classes: int = 10,
        k: int = 9,
        in_channels: int = 1,
        patch_size: int = 32,
        anchor: float = 20.0,
        classifier_widths: Sequence[int] = (8, 16, 32, 64, 128),
        classifier_blocks: int = 3,
        latent_dim: int = 32,
        ae_width: int = 16,
        class_loss: str = "l2",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if class_loss not in HISTOGRAM_LOSSES:
            raise ValueError(f"class_loss must be one of {sorted(HISTOGRAM_LOSSES)}, got {class_loss!r}")
        self.class_loss = class_loss
        self.task, self.num_classes, self.k = task, int(num_classes), int(k)
        self.patch_size, self.anchor = int(patch_size), float(anchor)
        if task == "classification":
            self.task_net: nn.Module = PatchClassifier(
                in_channels, num_classes, classifier_widths, classifier_blocks
            )
        else:
            self.task_net = PatchAutoencoder(in_channels, self.patch_size, latent_dim, ae_width)

    # -- to be provided by subclasses ----------------------------------------------------------
    def locate(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``centres (B, K, 2)``, ``sizes (B, K)``, ``scores (B, K)`` (+ model-specific entries)."""
        raise NotImplementedError

    def detector_parameters(self) -> list[nn.Parameter]:
        """Parameters of the location network (empty for fixed locations)."""
        return []

    # -- shared --------------------------------------------------------------------------------
    def run_task(self, image: torch.Tensor, centres: torch.Tensor, sizes: torch.Tensor) -> dict[str, Any]:
        """Sample the K patches at the boxes and run the task network on each."""
        b, _, h, w = check_shape(image, ["B", "C", "H", "W"], "image").values()
        patches = sample_patches(image, centres, sizes, self.patch_size)  # (B, K, C, P, P)
        k = patches.shape[1]
        out = self.task_net(patches.flatten(0, 1))
        if self.task == "classification":
            inst = out.reshape(b, k, -1)
            probs = inst.softmax(-1)
            return {"instance_logits": inst, "probs": probs, "logits": probs.mean(1).clamp_min(1e-8).log()}
        rec = out.reshape(patches.shape)
        return {"patch_reconstructions": rec, "reconstruction": paste_patches(rec, centres, sizes, (h, w))}

    def task_loss(
        self, out: dict[str, Any], image: torch.Tensor, counts: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-image task loss ``(B,)``: class-histogram loss or reconstruction MSE."""
        if self.task == "classification":
            if counts is None:
                raise KeyError("the classification task needs per-class counts (batch key 'label')")
            return HISTOGRAM_LOSSES[self.class_loss](out["probs"], counts)
        return reconstruction_loss(out["reconstruction"], image)

    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        loc = self.locate(image)
        out = self.run_task(image, loc["centres"], loc["sizes"])
        boxes = boxes_xyxy(loc["centres"], loc["sizes"])
        out.update(loc)
        out["boxes"] = boxes
        out["selected_coords"] = boxes[..., :2]
        if self.task == "reconstruction":
            out["logits"] = torch.zeros(image.shape[0], 0, dtype=image.dtype, device=image.device)
        return out

    def compute_loss(self, output: dict[str, Any], target: torch.Tensor, class_weight=None):
        """Mean class-histogram loss against per-class counts ``target (B, C)`` (classification only)."""
        loss = HISTOGRAM_LOSSES[self.class_loss](output["probs"], target).mean()
        return loss, {"task": loss}


@register_model("mist")
class MIST(PatchTaskModel):
    """MIST with a (multi-scale) heatmap network; see the module docstring.

    Args (besides :class:`PatchTaskModel`'s):
        scales: heatmap scales (box side = ``anchor · scale``); ``(1.0,)`` for MNIST-hard.
        softmax_window, beta: local spatial softmax window (15) and inverse temperature (10); window 0
            replaces the softmax by a sigmoid.
        softmax_padding: border handling of the local softmax (``"reflect"``; ``"zeros"`` as a plain
            box filter, which favours the border).
        nms_window: NMS window (5).
        tie_noise: amplitude of uniform noise added to the heatmap before NMS/top-K so that exact ties
            of flat regions do not all break towards the top-left: fresh noise in training, a fixed
            pattern (seed 0) in evaluation so that predictions are deterministic (0 disables).
        heatmap_width, heatmap_blocks: residual trunk of the heatmap network (32, 4).
        heatmap_stride: the heatmap network sees the image average-pooled by this factor (1 in the
            reference; 2 makes CPU training ≈ 4× cheaper). Windows count heatmap pixels; keypoints are
            returned in image pixels.
    """

    training_mode = "lifting"

    def __init__(
        self,
        task: str = "classification",
        num_classes: int = 10,
        k: int = 9,
        in_channels: int = 1,
        patch_size: int = 32,
        anchor: float = 20.0,
        scales: Sequence[float] = (1.0,),
        softmax_window: int = 15,
        beta: float = 10.0,
        softmax_padding: str = "reflect",
        nms_window: int = 5,
        tie_noise: float = 1e-6,
        heatmap_width: int = 32,
        heatmap_blocks: int = 4,
        heatmap_stride: int = 1,
        classifier_widths: Sequence[int] = (8, 16, 32, 64, 128),
        classifier_blocks: int = 3,
        latent_dim: int = 32,
        ae_width: int = 16,
        class_loss: str = "l2",
    ) -> None:
        super().__init__(
            task,
            num_classes,
            k,
            in_channels,
            patch_size,
            anchor,
            classifier_widths,
            classifier_blocks,
            latent_dim,
            ae_width,
            class_loss,
        )
        if heatmap_stride < 1:
            raise ValueError(f"heatmap_stride must be >= 1, got {heatmap_stride}")
        self.nms_window, self.heatmap_stride = int(nms_window), int(heatmap_stride)
        self.tie_noise = float(tie_noise)
        self.heatmap = MultiScaleHeatmap(
            HeatmapNet(in_channels, 1, heatmap_width, heatmap_blocks),
            scales,
            softmax_window,
            beta,
            softmax_padding,
        )

    @property
    def scales(self) -> list[float]:
        return self.heatmap.scales

    def detector_parameters(self) -> list[nn.Parameter]:
        return list(self.heatmap.parameters())

    def heatmaps(self, image: torch.Tensor) -> torch.Tensor:
        """Per-scale heatmaps ``(B, S, ⌈H/stride⌉, ⌈W/stride⌉)`` after the local softmax."""
        if self.heatmap_stride > 1:
            image = F.avg_pool2d(image, self.heatmap_stride, ceil_mode=True)
        return self.heatmap(image)

    def target_heatmaps(
        self,
        centres: torch.Tensor,
        scales: torch.Tensor,
        size: tuple[int, int],
        kind: str = "single_point",
        sigma: float | torch.Tensor = 2.5,
    ) -> torch.Tensor:
        """G at heatmap resolution for keypoints in image pixels (``sigma`` in image pixels)."""
        st = self.heatmap_stride
        return ideal_heatmap(centres / st, scales, self.scales, size, kind, sigma / st)

    def locate(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        heatmaps = self.heatmaps(image)
        noise: float | torch.Tensor = self.tie_noise
        if not self.training and self.tie_noise > 0:
            h, w = heatmaps.shape[-2:]
            pattern = torch.rand(h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            noise = self.tie_noise * pattern.to(heatmaps.device)
        kp = extract_keypoints(heatmaps.detach(), self.k, self.scales, self.nms_window, tie_noise=noise)
        return {
            "centres": kp.centres * self.heatmap_stride,
            "sizes": self.anchor * kp.scales,
            "scales": kp.scales,
            "scores": kp.scores,
            "heatmaps": heatmaps,
        }
