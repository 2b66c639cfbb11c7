"""``PredictionCSVWriter``: the outputs of ``needlework predict`` as ``predictions.csv`` in the run folder.

One row per item, in loader order: ``id`` (the batch's ``slide_id``, else its ``index``, else the row
number), ``label`` where the batch has one (``label_<c>`` columns for multi-hot targets) and
``prob_<c>`` for every class. The file is written once, after the last batch, under a temporary name
and then renamed, so an interrupted ``predict`` leaves no half-written CSV.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = ["PredictionCSVWriter", "prediction_rows"]

ID_KEYS = ("slide_id", "image_id", "id", "index")


def _column(values: Any, n: int) -> list[Any] | None:
    """``values`` (a tensor or list of length ``n``) as a list of Python scalars or lists."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    values = list(values)
    return values if len(values) == n else None


def prediction_rows(
    output: dict[str, Any], batch: dict[str, Any], label_key: str = "label", start: int = 0
) -> list[dict[str, Any]]:
    """Rows of one predicted batch: ``output["probs"]`` ``(B, C)``; ids and labels from ``batch``."""
    probs = output["probs"].detach().float().cpu()
    n = probs.shape[0]
    ids = next((c for c in (_column(batch.get(k), n) for k in ID_KEYS) if c is not None), None)
    labels = _column(batch.get(label_key), n) if isinstance(batch, dict) else None
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": ids[i] if ids is not None else start + i}
        if labels is not None:
            if isinstance(labels[i], list):  # multi-hot
                row.update({f"label_{c}": int(v) for c, v in enumerate(labels[i])})
            else:
                row["label"] = int(labels[i])
        row.update({f"prob_{c}": float(p) for c, p in enumerate(probs[i].tolist())})
        rows.append(row)
    return rows


def write_csv_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV at ``path`` (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PredictionCSVWriter(L.Callback):
    """Collects every predicted batch and writes ``<log_dir>/<filename>`` at the end of ``predict``.

    Args:
        filename: name of the CSV in the trainer's log folder.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__()
        self.filename = filename
        self.rows: list[dict[str, Any]] = []
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "probs" not in outputs:
            return
        label_key = getattr(pl_module, "label_key", "label")
        self.rows += prediction_rows(outputs, batch if isinstance(batch, dict) else {}, label_key,
                                     start=len(self.rows))  # fmt: skip

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        root = trainer.log_dir or trainer.default_root_dir
        self.path = Path(root) / self.filename
        write_csv_atomic(self.path, self.rows)
