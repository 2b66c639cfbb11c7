"""Run-folder bookkeeping: package versions at the start, metrics at the end of each stage.

Writes into the run folder (``trainer.log_dir``, next to LightningCLI's ``config.yaml``):
``versions.json`` (needlework, torch, lightning, Python, git commit, seed, world size) and ``metrics.json``
(last validation metrics, best checkpoint and its score, test metrics when a test ran).

Under DDP only rank zero writes. ``trainer.log_dir`` is a collective there (a broadcast from rank zero),
so code that only rank zero runs must never call it: :func:`run_dir` finds the same folder locally.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def environment_info() -> dict[str, Any]:
    """Versions and commit that produced a result."""
    import lightning

    from needlework._version import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "needlework": __version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "git_commit": commit,
    }


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if k.startswith(prefix) and torch.as_tensor(v).numel() == 1
    }


def run_dir(trainer: L.Trainer) -> Path | None:
    """The run folder ``trainer.log_dir`` resolves to, computed on this process without a collective.

    ``trainer.log_dir`` broadcasts rank zero's answer, so it deadlocks when only some ranks call it (a
    callback guarded by ``trainer.is_global_zero``). This is its logic minus the broadcast; call it on
    rank zero, whose logger names the folder every rank writes checkpoints next to.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if trainer.loggers:
        logger = trainer.loggers[0]
        folder = logger.log_dir if isinstance(logger, CSVLogger | TensorBoardLogger) else logger.save_dir
    else:
        folder = trainer.default_root_dir
    return Path(folder) if folder else None


class RunInfo(L.Callback):
    """Writes ``versions.json`` and ``metrics.json`` into the run folder (rank zero only)."""

    def _folder(self, trainer: L.Trainer) -> Path | None:
        # is_global_zero first: run_dir is local, but nothing here may differ in collectives between ranks
        return run_dir(trainer) if trainer.is_global_zero else None

    def _update_metrics(self, trainer: L.Trainer, section: str, values: dict[str, Any]) -> None:
        folder = self._folder(trainer)
        if folder is None:
            return
        path = folder / "metrics.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[section] = values
        write_json(path, data)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        folder = self._folder(trainer)
        if folder is not None:
            seed = os.environ.get("PL_GLOBAL_SEED")
            info = {**environment_info(), "seed": seed}
            info.update(world_size=trainer.world_size, num_nodes=trainer.num_nodes,
                        strategy=type(trainer.strategy).__name__)
            write_json(folder / "versions.json", info)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_score", None)
        self._update_metrics(trainer, "fit", {
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "seconds": time.perf_counter() - getattr(self, "_fit_start", time.perf_counter()),
            "val_last": _scalars(trainer.callback_metrics, "val/"),
            "best_checkpoint": getattr(ckpt, "best_model_path", None),
            "best_score": float(best) if best is not None else None,
            "monitor": getattr(ckpt, "monitor", None),
        })

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update_metrics(trainer, "test", _scalars(trainer.callback_metrics, "test/"))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._update_metrics(trainer, "validate", _scalars(trainer.callback_metrics, "val/"))
