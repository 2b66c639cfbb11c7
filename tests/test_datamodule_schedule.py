"""Curriculum stages, per-epoch resampling and the per-step cosine schedule of the training layer."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from needlework.training import ClassificationTask, DatasetDataModule


def _module(**kwargs):
    dm = DatasetDataModule(
        "needle_mnist", {"canvas": 128, "seed": 0}, train_kwargs={"size": 8}, batch_size=4, **kwargs
    )
    dm.trainer = SimpleNamespace(current_epoch=0, reload_dataloaders_every_n_epochs=1)
    return dm


def _first_images(dm, epoch):
    dm.trainer.current_epoch = epoch
    return dm.train_dataloader().dataset[0]["image"]


def test_train_schedule_switches_stages_by_epoch():
    dm = _module(train_schedule=[{"epochs": 2, "canvas": 64}, {"epochs": 1}])
    assert [dm.train_stage(e) for e in range(5)] == [{"canvas": 64}, {"canvas": 64}, {}, {}, {}]
    assert _first_images(dm, 1).shape == (1, 64, 64)
    assert _first_images(dm, 2).shape == (1, 128, 128)
    assert _first_images(dm, 7).shape == (1, 128, 128)  # the last stage runs to the end
    assert dm.dataset("val")[0]["image"].shape == (1, 128, 128)  # evaluation is never scheduled


def test_resample_each_epoch_draws_fresh_images():
    dm = _module(resample_each_epoch=True)
    first, again, second = _first_images(dm, 0), _first_images(dm, 0), _first_images(dm, 1)
    assert torch.equal(first, again) and not torch.equal(first, second)
    plain = _module()
    assert torch.equal(_first_images(plain, 0), _first_images(plain, 3))  # without it: the same set


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"train_schedule\[1\].*'epochs'"):
        _module(train_schedule=[{"epochs": 1}, {"canvas": 64}])
    dm = _module(resample_each_epoch=True)
    dm.trainer.reload_dataloaders_every_n_epochs = 0
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs to 1"):
        dm.train_dataloader()


def test_cosine_scheduler_decays_per_step_to_zero():
    model_kwargs = {"width": 0.25, "blocks": [1, 1, 1, 1]}
    task = ClassificationTask("bagnet.rf9", model_kwargs, lr=0.1, scheduler="cosine")
    task._trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = task.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in itertools.pairwise(lrs))
