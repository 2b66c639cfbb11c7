"""configs/mist/*.yaml parse and build through the CLI; a tiny `needlework fit` writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from needlework.cli import main as cli_main
from needlework.cli.train import NeedleworkCLI
from needlework.training.datamodule import DatasetDataModule
from needlework.training.mist import MISTTask
from needlework.training.task import ClassificationTask

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "mist").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from 2 threads, and on a busy 2-core machine the second thread
    made these tests ~50× slower (measured: 94 s vs 1.3 s for the three-step test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"mnist_hard.yaml", "mnist_hard_channelwise.yaml", "gabor_reconstruction.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_task_and_data(config, tmp_path):
    cli = NeedleworkCLI(
        ClassificationTask,
        DatasetDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(config), "--runs_dir", str(tmp_path), "--trainer.logger", "false"],
        run=False,
    )
    assert isinstance(cli.model, MISTTask)
    item = cli.datamodule.dataset("val")[0]
    assert {"image", "label", "boxes", "box_labels"} <= set(item)
    out = cli.model.model(item["image"][None])
    assert out["boxes"].shape == (1, cli.model.model.k, 4)


def test_tiny_fit_through_the_cli_writes_metrics_and_detections(tmp_path):
    args = [
        "fit",
        "--config",
        str(Path(__file__).parents[1] / "configs" / "mist" / "mnist_hard.yaml"),
        "--runs_dir",
        str(tmp_path),
        "--trainer.max_steps",
        "4",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.train_kwargs.size",
        "16",
        "--data.val_kwargs.size",
        "8",
        "--data.test_kwargs.size",
        "8",
        "--data.batch_size",
        "8",
    ]
    assert cli_main(args) == 0
    (run,) = (tmp_path / "mist_mnist_hard").iterdir()
    assert (run / "detections_val.png").exists() and (run / "detections_test.png").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "test/both" in text and "test/detection" in text
