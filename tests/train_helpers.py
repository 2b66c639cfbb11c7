"""The shrunk ``needlework fit`` command line the training-CLI tests share."""

from __future__ import annotations

import json
from pathlib import Path

TINY_MODEL = {"receptive_field": 33, "width": 0.25, "blocks": [1, 1, 1, 1], "pooling": "max"}


def fit_args(runs_dir: str | Path, epochs: int, train_size: int, *extra: str) -> list[str]:
    """``needlework fit`` of the packaged dense config, shrunk to seconds."""
    return [
        "fit", "--config", "needle_mnist/dense", "--runs_dir", str(runs_dir),
        "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
        "--model.init_args.model_kwargs", json.dumps(TINY_MODEL),
        "--data.init_args.dataset_kwargs", '{"canvas": 64}',
        "--data.init_args.train_kwargs", json.dumps({"size": train_size}),
        "--data.init_args.val_kwargs", '{"size": 32}',
        "--data.init_args.test_kwargs", '{"size": 32}', *extra,
    ]  # fmt: skip


def only_run(parent: Path) -> Path:
    """The one version folder below ``parent``."""
    (run,) = parent.iterdir()
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path → bytes): a run before and after must be equal."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
