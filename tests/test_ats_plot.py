"""Attention figures: the plotting function and the Lightning callback inside a tiny training run."""

from __future__ import annotations

import pytest
import torch

import needlework
from needlework.data import MegapixelMNIST
from needlework.viz.attention import plot_attention_sampling, plot_batch


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_batch_writes_pngs(tmp_path):
    ds = MegapixelMNIST("val", size=2, preset="ci")
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ("x_high", "x_low", "boxes")}
    batch["label"] = torch.tensor([ds[0]["label"], ds[1]["label"]])
    model = needlework.create_model("ats.megapixel_mnist", n_patches=5, patch_size=40)
    with torch.no_grad():
        out = model(batch["x_low"], batch["x_high"])
    paths = plot_batch(out, batch, tmp_path / "figs", prefix="val", max_items=2)
    assert [p.name for p in paths] == ["val_0.png", "val_1.png"]
    assert all(_is_png(p) for p in paths)
    assert not list((tmp_path / "figs").glob(".*tmp"))  # atomic write leaves no temporary file
    with pytest.raises(KeyError, match="attention_map"):
        plot_batch({"logits": out["logits"]}, batch, tmp_path)


def test_plot_without_patches(tmp_path):
    path = plot_attention_sampling(torch.rand(3, 32, 48), torch.rand(4, 6), tmp_path / "a.png")
    assert _is_png(path)


@pytest.mark.filterwarnings("ignore:No positive samples")
def test_callback_in_a_training_run(tmp_path):
    L = pytest.importorskip("lightning")
    from needlework.training import ClassificationTask, DatasetDataModule
    from needlework.training.callbacks import AttentionPlotCallback

    task = ClassificationTask(
        "ats.megapixel_mnist", model_kwargs={"n_patches": 3, "patch_size": 30}, num_classes=10
    )
    data = DatasetDataModule(
        "megapixel_mnist",
        dataset_kwargs={"preset": "ci", "size": 4, "n_noise": 1},
        batch_size=2,
    )
    callback = AttentionPlotCallback(max_items=2, every_n_epochs=1)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, datamodule=data)
    trainer.test(task, datamodule=data)
    names = sorted(p.name for p in callback.written)
    assert names == ["epoch000_0.png", "epoch000_1.png", "test_0.png", "test_1.png"]
    assert all(_is_png(p) for p in callback.written)
