"""``MultiTaskClassificationTask``: train a multi-task model (IPS 4-task Megapixel MNIST) on dict labels.

The batch entry ``label_key`` (default ``"labels"``) is a dict ``{task: target}``; the model predicts
``output["task_logits"][task]`` and its ``compute_loss`` averages the task losses (cross-entropy, BCE for
multi-label tasks). Metrics are logged per task as ``{stage}/{task}/{acc,auroc,...}``; ``{stage}/acc`` is
the mean accuracy over tasks (per-label accuracy for multi-label tasks), so the default checkpoint monitor
``val/acc`` works unchanged. In a config:
``class_path: needlework.training.multitask.MultiTaskClassificationTask``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from needlework.training.distributed import is_distributed
from needlework.training.metrics import classification_metrics
from needlework.training.task import ClassificationTask


class MultiTaskClassificationTask(ClassificationTask):
    """:class:`ClassificationTask` for models with ``tasks``, ``task_multilabel`` and ``task_logits``.

    Takes the arguments of :class:`ClassificationTask` (``num_classes`` = classes of every task unless the
    model's heads say otherwise); ``label_key`` defaults to ``"labels"``.
    """

    def __init__(self, *args: Any, label_key: str = "labels", **kwargs: Any) -> None:
        super().__init__(*args, label_key=label_key, **kwargs)
        tasks = getattr(self.model, "tasks", None)
        if not tasks or not hasattr(self.model, "task_multilabel"):
            raise ValueError(
                f"model {self.hparams.model!r} is not multi-task (needs .tasks, .task_multilabel and "
                "output['task_logits']); use needlework.training.ClassificationTask instead"
            )
        self.tasks = list(tasks)
        for stage in ("train", "val", "test"):
            setattr(
                self,
                f"{stage}_metrics",
                nn.ModuleDict(
                    {
                        t: classification_metrics(
                            self.model.heads[t].out_features, self.model.task_multilabel[t]
                        )
                        for t in self.tasks
                    }
                ),
            )

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        output = self(batch)
        target = batch[self.label_key]
        if not isinstance(target, dict):
            raise TypeError(
                f"batch[{self.label_key!r}] must be a dict of task -> target for a multi-task model, got "
                f"{type(target).__name__}; set label_key to the dataset's dict of labels (e.g. 'labels')"
            )
        loss, parts = self.model.compute_loss(output, target, self.class_weight)
        batch_size = output["logits"].shape[0]
        self._record_loss(stage, loss, batch_size, batch_size)
        for name, value in parts.items():
            self.log(f"{stage}/loss_{name}", value, batch_size=batch_size, on_epoch=True, sync_dist=True)
        metrics = getattr(self, f"{stage}_metrics")
        for t in self.tasks:
            if t in target:
                logits = output["task_logits"][t].detach()
                probs = torch.sigmoid(logits) if self.model.task_multilabel[t] else logits.softmax(-1)
                metrics[t].update(probs, target[t].long())
        return loss

    def _log_epoch(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        accs = []
        for t in self.tasks:
            # compute() is a collective under DDP: skip a task only if no rank saw its labels
            if not _any_rank(any(m.update_called for m in metrics[t].values()), self.device):
                continue
            values = metrics[t].compute()
            self.log_dict({f"{stage}/{t}/{k}": v for k, v in values.items()}, sync_dist=True)
            accs.append(values["acc"])
            metrics[t].reset()
        if accs:
            self.log(f"{stage}/acc", torch.stack(accs).mean(), prog_bar=stage == "val", sync_dist=True)
        self._log_loss(stage)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        output = self(batch)
        result: dict[str, Any] = {}
        for t in self.tasks:
            logits = output["task_logits"][t]
            result[f"probs_{t}"] = (
                torch.sigmoid(logits) if self.model.task_multilabel[t] else logits.softmax(-1)
            )
        if "index" in batch:
            result["index"] = batch["index"]
        return result


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over all ranks (itself on one process)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
