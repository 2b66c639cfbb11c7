"""DPS / IPS configs build, and the multi-task Lightning task trains on dict labels."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from needlework import list_datasets, register_dataset
from needlework.training import DatasetDataModule
from needlework.training.multitask import MultiTaskClassificationTask

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "megapixel_mnist").glob("[di]ps*.yaml"))


def build_task(path: Path):
    cfg = yaml.safe_load(path.read_text())
    module, name = cfg["model"]["class_path"].rsplit(".", 1)
    return cfg, getattr(importlib.import_module(module), name)(**cfg["model"]["init_args"])


def test_there_are_dps_and_ips_configs_for_both_variants_and_scales():
    names = {p.stem for p in CONFIGS}
    assert {"dps", "dps_ats", "dps_multilabel", "dps_1500", "ips", "ips_ats", "ips_1500"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_model_and_cpu_configs_run_a_forward(path):
    cfg, task = build_task(path)
    data = cfg["data"]["init_args"]
    assert data["dataset"] in ("megapixel_mnist", "megapixel_mnist_ips")
    if data["dataset"] in list_datasets():  # registered once branch `ats` is merged
        ds = DatasetDataModule(**data).dataset("val")
        assert "x_high" in ds[0]
    if path.stem.endswith("_1500"):
        return  # 1500² forward is GPU work
    kwargs = cfg["model"]["init_args"]["model_kwargs"]
    if "total_steps" in kwargs:  # σ decays over exactly the planned training steps
        size = {"small": 2000}[data["dataset_kwargs"]["preset"]]
        steps = cfg["trainer"]["max_epochs"] * -(-size // data["batch_size"])
        assert kwargs["total_steps"] == steps
    batch = {"x_high": torch.rand(2, 1, 256, 256), "x_low": torch.rand(2, 1, 64, 64)}
    out = task(batch)
    assert out["logits"].shape == (2, 10)


class ToyMultiTask(torch.utils.data.Dataset):
    """Two tasks on 32² images: "bright" (top half brighter: class 0 or 1) and "multilabel" (3)."""

    def __init__(self, split: str = "train", seed: int = 0, size: int = 8) -> None:
        self.size, self.seed = size, seed + {"train": 0, "val": 1, "test": 2}[split]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        x = torch.rand(1, 32, 32, generator=g)
        multi = (torch.rand(3, generator=g) > 0.5).float()
        bright = int(x[:, :16].mean() > x[:, 16:].mean())
        return {"x_high": x, "label": bright, "labels": {"bright": bright, "multilabel": multi}}


register_dataset("test_toy_multitask")(ToyMultiTask)


def test_multitask_lightning_task_fits_and_logs_every_task(tmp_path):
    task = MultiTaskClassificationTask(
        model="ips",
        model_kwargs=dict(
            tasks=["bright", "multilabel"],
            patch_size=8,
            n_keep=4,
            chunk_size=4,
            dim=16,
            n_heads=2,
            d_k=8,
            d_inner=32,
            encoder=dict(widths=(8,), strides=(1,)),
        ),
        num_classes=3,
    )
    data = DatasetDataModule("test_toy_multitask", batch_size=4)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, data)
    metrics = trainer.validate(task, data, verbose=False)[0]
    assert {"val/acc", "val/bright/acc", "val/multilabel/acc", "val/loss_task_multilabel"} <= set(metrics)
    expected = (metrics["val/bright/acc"] + metrics["val/multilabel/acc"]) / 2
    assert metrics["val/acc"] == pytest.approx(expected, abs=1e-6)


def test_multitask_task_rejects_single_task_models_and_tensor_labels():
    with pytest.raises(ValueError, match="not multi-task"):
        MultiTaskClassificationTask(model="dps", model_kwargs=dict(grid=4, patch_size=8, k=2), num_classes=2)
    task = MultiTaskClassificationTask(
        model="ips",
        model_kwargs=dict(patch_size=8, n_keep=2, dim=16, d_k=8, n_heads=2),
        num_classes=2,
        label_key="label",
    )
    batch = {"x_high": torch.rand(2, 1, 16, 16), "label": torch.tensor([0, 1])}
    with pytest.raises(TypeError, match="must be a dict"):
        task.training_step(batch, 0)
