"""``ClassificationTask``: the one LightningModule that trains every registered classifier.

The model is built by registry name; each batch entry is passed to the model's ``forward`` parameter of
the same name; the loss is ``model.compute_loss`` (cross-entropy or BCE plus the model's auxiliary
losses). Metrics are logged as ``{train,val,test}/{loss,acc,bacc,auroc,f1}``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from torchmetrics import MeanMetric

import needlework.models  # noqa: F401  (registers the built-in models)
from needlework.models.base import NeedleworkModel, route_batch
from needlework.registry import create_model
from needlework.training.metrics import classification_metrics

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


class ClassificationTask(L.LightningModule):
    """Train a registered model on batches of dicts.

    Args:
        model: registry name (see ``needlework list models``).
        model_kwargs: keyword arguments of the model factory (``num_classes`` is added).
        num_classes: number of classes (or labels, when ``multilabel``).
        multilabel: targets are ``(B, C)`` multi-hot and the loss is BCE.
        label_key: batch key of the target.
        optimizer: ``adam``, ``adamw``, ``sgd`` or ``rmsprop``.
        lr, weight_decay, momentum, eps: optimiser settings (momentum for SGD/RMSprop).
        scheduler: ``None``, ``"cosine"`` (per step, to zero at the last step), ``"cosine_time"``
            (cosine over the wall-clock budget ``trainer.max_time``: zero when the time is up, whatever
            the machine's speed) or ``"multistep"`` (``milestones`` in epochs, ``gamma``).
        class_weight: per-class loss weights (class imbalance).
    """

    def __init__(
        self,
        model: str,
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 2,
        multilabel: bool = False,
        label_key: str = "label",
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eps: float = 1e-8,
        scheduler: str | None = None,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        class_weight: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if scheduler not in (None, "cosine", "cosine_time", "multistep"):
            raise ValueError(
                f"scheduler must be None, 'cosine', 'cosine_time' or 'multistep', got {scheduler!r}"
            )
        if class_weight is not None and len(class_weight) != num_classes:
            raise ValueError(f"class_weight has {len(class_weight)} entries for {num_classes} classes")
        self.model = create_model(model, num_classes=num_classes, **(model_kwargs or {}))
        if multilabel and isinstance(self.model, NeedleworkModel):
            self.model.multilabel = True
        self.multilabel, self.label_key = multilabel, label_key
        self.register_buffer(
            "class_weight", torch.tensor(class_weight, dtype=torch.float32) if class_weight else None,
            persistent=False,
        )
        # one collection per stage (attribute names: a ModuleDict key "train" would shadow Module.train)
        self.train_metrics = classification_metrics(num_classes, multilabel)
        self.val_metrics = classification_metrics(num_classes, multilabel)
        self.test_metrics = classification_metrics(num_classes, multilabel)
        self._eval_loss = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model(**route_batch(self.model.forward, batch))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(-1)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        output = self(batch)
        target = batch[self.label_key]
        if isinstance(self.model, NeedleworkModel):
            loss, parts = self.model.compute_loss(output, target, self.class_weight)
        else:  # any nn.Module returning a dict with logits
            loss = torch.nn.functional.cross_entropy(output["logits"], target, weight=self.class_weight)
            parts = {}
        batch_size = target.shape[0]
        weight = batch_size
        if self.class_weight is not None and not self.multilabel:
            # cross-entropy with class weights is Σ w_y l / Σ w_y over the batch: weighting the batch by
            # Σ w_y makes the epoch value that of the whole split, however it is cut into batches
            weight = self.class_weight[target.long()].sum()
        self._record_loss(stage, loss, batch_size, weight)
        for name, value in parts.items():
            if len(parts) > 1:
                self.log(f"{stage}/loss_{name}", value, batch_size=batch_size, on_epoch=True, sync_dist=True)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(self.probabilities(output["logits"].detach()), target.long())
        return loss

    def _record_loss(self, stage: str, loss: torch.Tensor, batch_size: int, weight: Any) -> None:
        """Log the training loss per step; accumulate the evaluation loss for :meth:`_log_loss`.

        Evaluation losses go through a ``MeanMetric`` weighted by ``weight`` (the batch size, or the
        summed class weights): synced over DDP ranks, whose batches differ from one process's, the epoch
        value still equals the one-process value.
        """
        if stage == "train":
            # sync_dist: the epoch value is the batch-size-weighted mean over every rank's items
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, on_step=True, on_epoch=True,
                     sync_dist=True)  # fmt: skip
            return
        weight = torch.as_tensor(weight, dtype=torch.float32, device=loss.device)
        self._eval_loss[stage].update(loss.detach().float(), weight)

    def _log_loss(self, stage: str) -> None:
        if stage == "train":
            return
        mean = self._eval_loss[stage]
        # an epoch's loss is logged once; sync_dist is a no-op average of the already synced value
        self.log(f"{stage}/loss", mean.compute(), prog_bar=stage == "val", sync_dist=True)
        mean.reset()

    def _log_epoch(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()  # a collective under DDP: torchmetrics syncs the states of all ranks
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=True)
        metrics.reset()
        self._log_loss(stage)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        output = self(batch)
        result = {"probs": self.probabilities(output["logits"])}
        if "index" in batch:
            result["index"] = batch["index"]
        return result

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> Any:
        h = self.hparams
        kwargs: dict[str, Any] = {"lr": h.lr, "weight_decay": h.weight_decay}
        if h.optimizer in ("sgd", "rmsprop"):
            kwargs["momentum"] = h.momentum
        if h.optimizer != "sgd":
            kwargs["eps"] = h.eps
        optimizer = OPTIMIZERS[h.optimizer](self.parameters(), **kwargs)
        if h.scheduler is None:
            return optimizer
        if h.scheduler == "cosine":
            # per optimiser step, so short runs and max_steps budgets decay smoothly to zero
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if h.scheduler == "cosine_time":
            sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _time_cosine(self.trainer))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=h.milestones or [], gamma=h.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _time_cosine(trainer: Any) -> Any:
    """LR factor ``(1 + cos(π t / T)) / 2`` at elapsed wall-clock time ``t`` of the budget ``T``."""
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    if timer is None or timer.time_remaining() is None:
        raise ValueError(
            "scheduler 'cosine_time' anneals over the wall-clock budget: set trainer.max_time "
            "(e.g. --trainer.max_time 00:00:15:00) or use scheduler 'cosine'"
        )

    def factor(_step: int) -> float:
        elapsed = timer.time_elapsed()
        frac = min(1.0, elapsed / max(elapsed + timer.time_remaining(), 1e-9))
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor
