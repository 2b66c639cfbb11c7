"""``BestCheckpoint``: Lightning's ``ModelCheckpoint`` that breaks ties and survives a resume.

A small validation set makes the monitored score coarse: with 8 items AUROC is 1.0 from the first
epoch, and ``ModelCheckpoint`` (which needs a strictly better score) keeps the *first* epoch that
reached it, often the barely trained model. Here an epoch that *equals* the kept score replaces it
when its ``tie_breaker`` (default ``val/loss``, lower is better) is lower or equal, so among equal
scores the lowest loss wins and, at equal loss, the later epoch. When the best score was reached by
more than one epoch, or the validation set has fewer than ``min_val_items`` items, a warning says
that the validation set is too small to choose.

Checkpoints are written atomically: to a temporary file beside the target, then renamed over it
(:class:`AtomicCheckpointIO`). Lightning's own writer renames from the system temporary folder, which
is a copy into the final name (not atomic) when that folder is on another file system, and leaves the
temporary file behind when the process is killed.

``last.ckpt`` is written after every epoch (Lightning writes it only when a top-k checkpoint was
written too, so after a crash it could be many epochs old).

A resumed run (``--ckpt_path .../last.ckpt``) writes a new run folder; Lightning then forgets the best
score of the interrupted run and keeps the first epoch after the resume, however poor. Here the kept
checkpoints of the interrupted run are remembered as long as their files exist.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["AtomicCheckpointIO", "BestCheckpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>`` in the checkpoint's folder, ``fsync``, then
    ``os.replace`` over the checkpoint: a checkpoint file is complete or absent, never half-written."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic write there
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        target = os.fspath(path)
        folder, name = os.path.split(target)
        os.makedirs(folder or ".", exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return None


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with tie-breaking, a small-validation-set warning and resume across folders.

    Args:
        tie_breaker: metric that decides between epochs with an equal ``monitor`` value (``None``:
            Lightning's rule, the first one stays).
        tie_breaker_mode: ``"min"`` (a loss) or ``"max"``.
        min_val_items: warn when the validation set has fewer items than this.
        *args, **kwargs: those of ``ModelCheckpoint``.
    """

    def __init__(
        self,
        *args: Any,
        tie_breaker: str | None = "val/loss",
        tie_breaker_mode: Literal["min", "max"] = "min",
        min_val_items: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tie_breaker = tie_breaker
        self.tie_breaker_mode = tie_breaker_mode
        self.min_val_items = int(min_val_items)
        self.tie_values: dict[str, float] = {}  # checkpoint path → its tie-breaker value
        self.history: list[tuple[int, float]] = []  # (epoch, monitor value) of each validation

    # -- choosing ---------------------------------------------------------------------------------

    def _tie_value(self, trainer: L.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.tie_breaker) if self.tie_breaker else None
        if value is None or not torch.isfinite(torch.as_tensor(value)).all():
            return None
        return float(value)

    def _beats(self, new: float, old: float | None) -> bool:
        """``new`` breaks the tie against ``old``; equal values go to the newer epoch."""
        if old is None:
            return True
        return new <= old if self.tie_breaker_mode == "min" else new >= old

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if current is None or self.save_top_k == -1 or not self.best_k_models:
            return False
        kth = self.best_k_models[self.kth_best_model_path]
        tie = self._tie_value(trainer)
        better = (
            tie is not None
            and float(current) == float(kth)
            and self._beats(tie, self.tie_values.get(self.kth_best_model_path))
        )
        return trainer.strategy.reduce_boolean_decision(bool(better))

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        before = set(self.best_k_models)
        super()._update_best_and_save(current, trainer, monitor_candidates)
        added = set(self.best_k_models) - before
        path = next(iter(added)) if added else self.kth_best_model_path
        tie = self._tie_value(trainer)
        self.tie_values = {p: v for p, v in self.tie_values.items() if p in self.best_k_models}
        if tie is not None and path in self.best_k_models:
            self.tie_values[path] = tie
        # among the kept checkpoints with the best score, the best is the one that wins the tie
        score = self.best_model_score
        if score is not None and len(self.best_k_models) > 1:
            equal = [p for p, s in self.best_k_models.items() if float(s) == float(score)]
            best = equal[0]
            for p in equal[1:]:
                if p in self.tie_values and self._beats(self.tie_values[p], self.tie_values.get(best)):
                    best = p
            self.best_model_path = best

    # -- warnings ---------------------------------------------------------------------------------

    def _check_size(self, trainer: L.Trainer) -> None:
        """Warn once per fit when the validation set is too small (its loader exists from now on)."""
        if getattr(self, "_size_checked", False):
            return
        self._size_checked = True
        n = _val_items(trainer)
        if self.monitor and n is not None and n < self.min_val_items:
            rank_zero_warn(
                f"the validation set has {n} items (fewer than checkpoint.min_val_items="
                f"{self.min_val_items}): {self.monitor} is too coarse to choose the best epoch reliably; "
                "use a larger validation set"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Lightning's default writer only (a user's own CheckpointIO plugin is left alone)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._size_checked = False

    def _save_last_too(self, trainer: L.Trainer) -> None:
        # Lightning (2.5+) refreshes last.ckpt only when a top-k checkpoint was saved at the same step:
        # after an epoch that did not improve, last.ckpt stays at the best epoch, and a resume after a
        # crash repeats every epoch since then. Here last.ckpt is the last epoch, always.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_too(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_too(trainer)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._check_size(trainer)
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        if value is not None:
            self.history.append((int(trainer.current_epoch), float(value)))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.best_model_score is None or not self.history:
            return
        best = float(self.best_model_score)
        epochs = sorted({e for e, v in self.history if v == best})
        if len(epochs) > 1:
            n = _val_items(trainer)
            size = f" ({n} items)" if n is not None else ""
            how = (
                f"kept {os.path.basename(self.best_model_path)}, the one with the "
                f"{'lowest' if self.tie_breaker_mode == 'min' else 'highest'} {self.tie_breaker}"
                if self.tie_breaker
                else f"kept {os.path.basename(self.best_model_path)}, the first"
            )
            rank_zero_warn(
                f"{self.monitor} reached its best value {best:g} in {len(epochs)} validation epochs "
                f"({', '.join(map(str, epochs))}): the validation set{size} is too small to choose between "
                f"them; {how}"
            )

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tie_values": dict(self.tie_values), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tie_values = dict(state_dict.get("tie_values", {}))
        self.history = [tuple(h) for h in state_dict.get("history", [])]  # type: ignore[misc]
        kept = state_dict.get("best_k_models") or {}
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        # resumed into a new run folder: the interrupted run's best still counts while its files exist
        if moved and kept and all(os.path.isfile(p) for p in kept):
            self.best_k_models = dict(kept)
            self.best_model_score = state_dict["best_model_score"]
            self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
            self.kth_value = state_dict.get("kth_value", self.kth_value)


def _val_items(trainer: L.Trainer) -> int | None:
    """Items in the (first) validation loader's dataset, when it has a length."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    try:
        return len(loader.dataset)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError):
        return None
