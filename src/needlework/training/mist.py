"""Lightning module training MIST by lifting (METHODS.md §8.2), and its baselines.

Per batch, in ``step_order`` (reference order by default):

1. ``"keypoints"`` — lifting: start from ``x_k = E_K(H_η(I))`` and take ``keypoint_steps`` gradient steps
   of size ``keypoint_lr`` on the task loss w.r.t. the keypoint centres only (task network fixed, box sizes
   fixed). The loss is *summed* over the batch, so the step does not depend on the batch size (the reference
   averages it; multiply its ``lr_k`` by 1/B to compare). ``keypoint_max_step`` optionally caps each
   keypoint's move per step (pixels). With ``lift_scales`` the box sizes are lifted too (scale = size /
   anchor, clamped to the heatmap scales).
2. ``"task"`` — one optimiser step of the task network on patches at the current keypoints.
3. ``"detector"`` — one optimiser step of the heatmap network regressing the ideal heatmap ``G(x_k)``,
   weighted per image by ``exp(−loss_weight_temperature · L_task)``.

The detector never receives gradient from the task loss. Baselines: ``"end_to_end"`` models (channel-wise)
take one step of both networks on the task loss; ``"task_only"`` models (grid) train the task network only.

Evaluation logs ``{stage}/task_loss``, ``{stage}/detection``, ``{stage}/classification``, ``{stage}/both``,
``{stage}/ap50`` (and ``{stage}/rmse`` for reconstruction) and writes ``detections_{stage}.png`` to
``figure_dir`` (default: the trainer's log directory). Under DDP the evaluation state of every rank is
gathered before the metrics are computed, and rank zero alone draws the figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from needlework.metrics.detection import DetectionMetrics, reconstruction_rmse
from needlework.training.distributed import gather_objects, is_distributed
from needlework.training.run_info import run_dir
from needlework.training.task import ClassificationTask
from needlework.viz.mist import draw_detections

STEPS = ("keypoints", "task", "detector")


class MISTTask(ClassificationTask):
    """Manual-optimisation training of MIST (``model="mist"``) or a baseline (``"mist.channelwise"``,
    ``"mist.grid"``) on batches with keys ``image``, ``label`` (per-class counts), ``boxes``, ``box_labels``.

    A :class:`~needlework.training.ClassificationTask` (so LightningCLI accepts it by ``class_path``) whose
    optimisation, metrics and evaluation are its own; its ``optimizer`` / ``scheduler`` options are unused.

    Args:
        model: registry name of the model.
        model_kwargs: keyword arguments of the model (without ``num_classes``).
        num_classes: classes of the task network (10 digits; ignored by the reconstruction task).
        lr: Adam learning rate of the task network (1e-4).
        detector_lr: Adam learning rate of the heatmap network (1e-4).
        weight_decay: Adam weight decay of both networks.
        keypoint_lr: step size of the keypoint lifting (pixels per unit gradient of the summed loss).
        keypoint_steps: number of lifting steps (``k_iter = 2``).
        keypoint_max_step: optional cap on each keypoint's move per step, in pixels.
        lift_scales: also lift the box sizes (multi-scale heatmaps: G then splits each keypoint between
            the two nearest scales); ``scale_lr`` is their step size (default ``keypoint_lr``).
        step_order: permutation of ``("keypoints", "task", "detector")``.
        target: ideal heatmap ``"single_point"`` or ``"gaussian"``; ``target_sigma`` is the Gaussian std as
            a fraction of the box side (0.125 as the reference).
        loss_weight_temperature: T of the detector weights ``exp(−T · L_task)`` (5; 0 disables).
        iou_threshold: IoU needed for a detection to match (0.5).
        figure_dir: where ``detections_{stage}.png`` goes (default: the trainer's log dir); ``n_figure``
            images are drawn (0 disables).
    """

    def __init__(
        self,
        model: str = "mist",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        lr: float = 1e-4,
        detector_lr: float = 1e-4,
        weight_decay: float = 0.0,
        keypoint_lr: float = 1e3,
        keypoint_steps: int = 2,
        keypoint_max_step: float | None = None,
        lift_scales: bool = False,
        scale_lr: float | None = None,
        step_order: Sequence[str] = STEPS,
        target: str = "single_point",
        target_sigma: float = 0.125,
        loss_weight_temperature: float = 5.0,
        iou_threshold: float = 0.5,
        figure_dir: str | None = None,
        n_figure: int = 8,
    ) -> None:
        if "num_classes" in (model_kwargs or {}):
            raise ValueError("give num_classes as an argument of MISTTask, not inside model_kwargs")
        super().__init__(
            model=model, model_kwargs=model_kwargs, num_classes=num_classes, lr=lr, weight_decay=weight_decay
        )
        self.save_hyperparameters()
        if sorted(step_order) != sorted(STEPS):
            raise ValueError(f"step_order must be a permutation of {STEPS}, got {list(step_order)}")
        if target not in ("single_point", "gaussian"):
            raise ValueError(f"target must be 'single_point' or 'gaussian', got {target!r}")
        self.step_order = tuple(step_order)
        self.automatic_optimization = False
        self._metrics = DetectionMetrics(iou_threshold)
        self._eval_losses: list[torch.Tensor] = []
        self._rmse: list[torch.Tensor] = []
        self._figure_batch: dict[str, torch.Tensor] | None = None

    # -- optimisers ----------------------------------------------------------------------------
    def configure_optimizers(self):
        det = self.model.detector_parameters()
        det_ids = {id(p) for p in det}
        task = [p for p in self.model.parameters() if id(p) not in det_ids]
        wd = self.hparams.weight_decay
        opts = [torch.optim.Adam(task, lr=self.hparams.lr, weight_decay=wd)]
        if det:
            opts.append(torch.optim.Adam(det, lr=self.hparams.detector_lr, weight_decay=wd))
        return opts

    def _optimizers(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, list | tuple) else [opts]

    # -- the three steps -----------------------------------------------------------------------
    def lift_keypoints(
        self, image: torch.Tensor, counts: torch.Tensor | None, centres: torch.Tensor, sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoint lifting: gradient steps on the task loss w.r.t. the centres ``(B, K, 2)`` (and the box
        sizes ``(B, K)`` with ``lift_scales``). Returns the detached ``(centres, sizes)``."""
        h, w = image.shape[-2:]
        hp = self.hparams
        x, s = centres.detach().clone(), sizes.detach().clone()
        scales = getattr(self.model, "scales", [1.0])
        s_lo, s_hi = self.model.anchor * min(scales), self.model.anchor * max(scales)
        for _ in range(hp.keypoint_steps):
            x.requires_grad_(True)
            s.requires_grad_(hp.lift_scales)
            with torch.enable_grad():
                out = self.model.run_task(image, x, s)
                loss = self.model.task_loss(out, image, counts).sum()
                grads = torch.autograd.grad(loss, [x, s] if hp.lift_scales else [x])
            step = hp.keypoint_lr * grads[0]
            if hp.keypoint_max_step:
                norm = step.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                step = step * (hp.keypoint_max_step / norm).clamp(max=1.0)
            x = x.detach() - step
            x[..., 0].clamp_(0, w)
            x[..., 1].clamp_(0, h)
            if hp.lift_scales:
                ds = (hp.scale_lr or hp.keypoint_lr) * grads[1]
                if hp.keypoint_max_step:
                    ds = ds.clamp(-hp.keypoint_max_step, hp.keypoint_max_step)
                s = (s.detach() - ds).clamp(s_lo, s_hi)
        return x.detach(), s.detach()

    def detector_loss(
        self,
        heatmaps: torch.Tensor,
        centres: torch.Tensor,
        scales: torch.Tensor,
        sizes: torch.Tensor,
        task_loss: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted regression of the heatmaps ``(B, S, H, W)`` onto ``G(centres, scales)``."""
        target = self.model.target_heatmaps(
            centres,
            scales,
            tuple(heatmaps.shape[-2:]),
            self.hparams.target,
            self.hparams.target_sigma * sizes,
        ).to(heatmaps.dtype)
        mse = (heatmaps - target).pow(2).flatten(1).mean(1)
        weight = torch.exp(-self.hparams.loss_weight_temperature * task_loss.detach())
        return (weight * mse).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image, counts = batch["image"], batch.get("label")
        opts = self._optimizers()
        mode = self.model.training_mode
        if mode != "lifting":
            out = self.model(image)
            loss = self.model.task_loss(out, image, counts).mean()
            for opt in opts:
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in opts:
                opt.step()
            self.log("train/task_loss", loss.detach(), prog_bar=True, batch_size=len(image), sync_dist=True)
            return loss.detach()

        loc = self.model.locate(image)  # heatmaps with gradient, keypoints without
        centres0, sizes, scales = loc["centres"], loc["sizes"], loc["scales"]
        centres, per_image = centres0, None
        logs: dict[str, torch.Tensor] = {}
        for step in self.step_order:
            if step == "keypoints":
                centres, sizes = self.lift_keypoints(image, counts, centres, sizes)
                scales = sizes / self.model.anchor
                per_image = None
            elif step == "task":
                out = self.model.run_task(image, centres, sizes)
                per_image = self.model.task_loss(out, image, counts)
                opts[0].zero_grad()
                self.manual_backward(per_image.mean())
                opts[0].step()
                logs["train/task_loss"] = per_image.mean().detach()
            else:
                if per_image is None:
                    with torch.no_grad():
                        per_image = self.model.task_loss(
                            self.model.run_task(image, centres, sizes), image, counts
                        )
                loss = self.detector_loss(loc["heatmaps"], centres, scales, sizes, per_image)
                opts[1].zero_grad()
                self.manual_backward(loss)
                opts[1].step()
                logs["train/detector_loss"] = loss.detach()
        logs["train/keypoint_shift"] = (centres - centres0).norm(dim=-1).mean()
        for name, value in logs.items():
            bar = name != "train/keypoint_shift"
            self.log(name, value, prog_bar=bar, batch_size=len(image), sync_dist=True)
        return logs["train/task_loss"]

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        image = batch["image"]
        out = self.model(image)
        per_image = self.model.task_loss(out, image, batch.get("label"))
        self._eval_losses.append(per_image.detach().cpu())
        if self.model.task == "classification":
            labels = out["instance_logits"].argmax(-1)
        else:
            labels = torch.full(out["scores"].shape, -2, dtype=torch.long, device=image.device)
            self._rmse.append(reconstruction_rmse(out["reconstruction"], image).cpu())
        if "boxes" in batch:
            self._metrics.update(out["boxes"], labels, out["scores"], batch["boxes"], batch["box_labels"])
        if self._figure_batch is None and self.hparams.n_figure > 0:
            n = self.hparams.n_figure
            self._figure_batch = {
                "image": image[:n].cpu(),
                "boxes": out["boxes"][:n].cpu(),
                "labels": labels[:n].cpu() if self.model.task == "classification" else None,
                "scores": out["scores"][:n].cpu(),
                "gt_boxes": batch["boxes"][:n].cpu() if "boxes" in batch else None,
                "gt_labels": batch["box_labels"][:n].cpu() if "box_labels" in batch else None,
            }

    def _gather_eval(self) -> None:
        """Under DDP, make every rank hold the evaluation state of all ranks (one collective), so the
        metrics are those of the whole split whatever the number of processes."""
        if not is_distributed():
            return
        mine = {
            "loss": torch.cat(self._eval_losses) if self._eval_losses else torch.zeros(0),
            "rmse": torch.cat(self._rmse) if self._rmse else torch.zeros(0),
            "det": self._metrics.state(),
        }
        states = gather_objects(mine)
        losses = [st["loss"] for st in states if len(st["loss"])]
        rmse = [st["rmse"] for st in states if len(st["rmse"])]
        self._eval_losses, self._rmse = losses, rmse
        self._metrics.merge([st["det"] for st in states])

    def _eval_end(self, stage: str) -> dict[str, float]:
        self._gather_eval()
        results = {"task_loss": float(torch.cat(self._eval_losses).mean())} if self._eval_losses else {}
        if self._metrics.n_gt:
            m = self._metrics.compute()
            keys = ("detection", "classification", "both", "ap50")
            if self.model.task != "classification":
                keys = ("detection", "ap50")
            results.update({k: m[k] for k in keys})
        if self._rmse:
            results["rmse"] = float(torch.cat(self._rmse).mean())
        for name, value in results.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("both", "rmse"))
        trainer = self.trainer
        if self._figure_batch is not None and not trainer.sanity_checking and trainer.is_global_zero:
            self._write_figure(stage, results)
        self._metrics.reset()
        self._eval_losses, self._rmse, self._figure_batch = [], [], None
        return results

    def _write_figure(self, stage: str, results: dict[str, float]) -> None:
        # rank zero only: trainer.log_dir would be a collective the other ranks never join
        folder = self.hparams.figure_dir or run_dir(self.trainer)
        if folder is None:
            return
        fb = self._figure_batch
        title = " ".join(f"{k}={v:.3f}" for k, v in results.items())
        draw_detections(
            fb["image"],
            fb["boxes"],
            fb["labels"],
            Path(folder) / f"detections_{stage}.png",
            gt_boxes=fb["gt_boxes"],
            gt_labels=fb["gt_labels"],
            scores=fb["scores"],
            title=f"{stage}: {title}",
        )

    def on_train_epoch_end(self) -> None:
        pass  # training metrics are logged per step

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self.model(batch["image"])
        keep = ("boxes", "scores", "centres", "sizes", "instance_logits", "reconstruction")
        return {k: out[k] for k in keep if k in out}
