"""``AttentionPlotCallback``: Lightning callback drawing attention maps and sampled patches to PNG.

Usable from a config (``trainer.callbacks``)::

    trainer:
      callbacks:
        - class_path: needlework.training.callbacks.AttentionPlotCallback
          init_args: {max_items: 4, every_n_epochs: 5}

After validation (every ``every_n_epochs`` epochs) and after testing, it runs the model in eval mode on
the first ``max_items`` items of the first batch and writes ``<log_dir>/attention/epoch<E>_<i>.png`` (or
``test_<i>.png``) with :func:`needlework.viz.attention.plot_batch`. Models whose output has no
``attention_map`` are skipped silently. Under DDP only rank zero draws (its own first batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from needlework.training.run_info import run_dir
from needlework.viz.attention import plot_batch

__all__ = ["AttentionPlotCallback"]


def _head(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n].detach()
    if isinstance(batch, dict):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, list):
        return batch[:n]
    return batch


class AttentionPlotCallback(L.Callback):
    """Draw attention maps and sampled patches after validation / test.

    Args:
        max_items: images drawn per evaluation.
        every_n_epochs: draw after every n-th validation epoch (0: only after testing).
        dirname: sub-folder of the trainer's log directory.
    """

    def __init__(self, max_items: int = 4, every_n_epochs: int = 1, dirname: str = "attention") -> None:
        super().__init__()
        self.max_items = int(max_items)
        self.every_n_epochs = int(every_n_epochs)
        self.dirname = dirname
        self._batch: dict[str, Any] | None = None
        self.written: list[Path] = []

    def _keep(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, dict):
            self._batch = _head(batch, self.max_items)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._keep(batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._keep(batch, batch_idx, dataloader_idx)

    def _out_dir(self, trainer: L.Trainer) -> Path:
        # only rank zero draws: trainer.log_dir would be a collective that the other ranks never join
        return (run_dir(trainer) or Path(trainer.default_root_dir)) / self.dirname

    @torch.no_grad()
    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        if self._batch is None or not trainer.is_global_zero:
            return
        batch, self._batch = self._batch, None
        was_training = pl_module.training
        pl_module.eval()
        try:
            output = pl_module(batch)
        finally:
            pl_module.train(was_training)
        if not isinstance(output, dict) or "attention_map" not in output:
            return
        batch = _head(
            {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, self.max_items
        )
        output = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in output.items()}
        self.written += plot_batch(output, batch, self._out_dir(trainer), prefix, self.max_items)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            self._batch = None
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")
        self._batch = None

    def on_test_epoch_end(self, trainer, pl_module):
        self._draw(trainer, pl_module, "test")
