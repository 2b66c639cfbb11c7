"""Choosing the best checkpoint (issue 15, item 11): ties broken by validation loss then the later
epoch, a warning when the validation set is too small to choose, the best kept across a resume."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from needlework.training.checkpointing import BestCheckpoint


class Scripted(L.LightningModule):
    """Logs the given validation metrics, epoch by epoch (training itself is a dummy)."""

    def __init__(self, script: dict[str, list[float]]):
        super().__init__()
        self.script = script
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        for name, values in self.script.items():
            self.log(name, values[self.current_epoch], on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n):
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=4)


def _fit(tmp_path, script, callback, epochs, n_val=8, ckpt_path=None):
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Scripted(script), _loader(8), _loader(n_val), ckpt_path=ckpt_path)
    return trainer


def _epoch(path):
    return int(torch.load(path, weights_only=False)["epoch"])


AUROC_ALWAYS_1 = {"val/auroc": [1.0, 1.0, 1.0, 1.0], "val/loss": [0.9, 0.4, 0.6, 0.4]}


def test_tie_goes_to_the_lower_loss_then_the_later_epoch(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/auroc", mode="max", filename="best-{epoch}")
    with pytest.warns(UserWarning, match=r"val/auroc reached its best value 1 in 4 validation epochs"):
        _fit(tmp_path, AUROC_ALWAYS_1, cb, 4)
    # epochs 1 and 3 share the lowest loss 0.4: the later one; never the untrained epoch 0
    assert cb.best_model_path.endswith("best-epoch=3.ckpt") and _epoch(cb.best_model_path) == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best-epoch=3.ckpt"]


def test_lightning_alone_keeps_the_untrained_epoch(tmp_path):
    """The failure this fixes, as Lightning's own callback shows it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/auroc", mode="max", filename="best-{epoch}")
    _fit(tmp_path, AUROC_ALWAYS_1, cb, 4)
    assert cb.best_model_path.endswith("best-epoch=0.ckpt")


def test_a_strictly_better_score_wins_over_a_lower_loss(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", filename="best-{epoch}")
    _fit(tmp_path, {"val/acc": [0.5, 0.75, 0.5], "val/loss": [0.1, 0.9, 0.05]}, cb, 3, n_val=40)
    assert cb.best_model_path.endswith("best-epoch=1.ckpt")


def test_small_validation_set_warns(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", min_val_items=20)
    with pytest.warns(UserWarning, match=r"the validation set has 8 items"):
        _fit(tmp_path, {"val/acc": [0.5], "val/loss": [0.5]}, cb, 1)


def test_resume_in_a_new_folder_keeps_the_interrupted_runs_best(tmp_path):
    script = {"val/acc": [0.5, 0.9, 0.6, 0.7], "val/loss": [0.5, 0.2, 0.4, 0.3]}
    first = BestCheckpoint(dirpath=tmp_path / "a", monitor="val/acc", mode="max", save_last=True,
                           filename="best-{epoch}", min_val_items=0)  # fmt: skip
    _fit(tmp_path, script, first, 2, n_val=40)
    assert first.best_model_path.endswith("a/best-epoch=1.ckpt")
    resumed = BestCheckpoint(dirpath=tmp_path / "b", monitor="val/acc", mode="max", save_last=True,
                             filename="best-{epoch}", min_val_items=0)  # fmt: skip
    with pytest.warns(UserWarning, match="dirpath has changed"):
        _fit(tmp_path, script, resumed, 4, n_val=40, ckpt_path=tmp_path / "a" / "last.ckpt")
    assert resumed.best_model_path == first.best_model_path and float(
        resumed.best_model_score
    ) == pytest.approx(0.9)
    assert (tmp_path / "a" / "best-epoch=1.ckpt").exists()  # the interrupted run's files stay
