"""Training under a wall-clock budget: a curriculum in fractions of ``trainer.max_time`` and a cosine
learning rate that reaches zero when the time is up (the O2I sweep's protocol on any machine)."""

from types import SimpleNamespace

import lightning as L
import lightning.pytorch.callbacks.timer as timer_module
import pytest
import torch

from needlework.training import ClassificationTask, DatasetDataModule

TINY = {"receptive_field": 9, "width": 0.125, "blocks": [1, 1, 1, 1], "pooling": "max"}


class Record(L.Callback):
    """Canvas of every training epoch and the learning rate after every step."""

    def __init__(self) -> None:
        self.canvases, self.lrs, self.fractions = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.canvases.append(trainer.train_dataloader.dataset.canvas)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        timer = next(cb for cb in trainer.callbacks if isinstance(cb, L.pytorch.callbacks.Timer))
        self.fractions.append(timer.time_elapsed() / (timer.time_elapsed() + timer.time_remaining()))


def _data(schedule):
    return DatasetDataModule("needle_mnist", {"canvas": 128}, train_kwargs={"size": 16}, batch_size=8,
                             train_schedule=schedule, resample_each_epoch=True)


def test_time_stages_follow_the_budget_and_lr_anneals_to_zero(monkeypatch):
    # a fake clock for Lightning's Timer (advancing a fixed step per reading), so the test does not depend
    # on how fast a loaded CI machine trains
    clock = {"t": 0.0}

    def monotonic() -> float:
        clock["t"] += 0.05
        return clock["t"]

    monkeypatch.setattr(timer_module, "time", SimpleNamespace(monotonic=monotonic))
    L.seed_everything(0, verbose=False)
    rec = Record()
    task = ClassificationTask("bagnet", TINY, lr=1e-2, scheduler="cosine_time")
    data = _data([{"time": 0.5, "canvas": 64}, {"time": 0.5}])
    trainer = L.Trainer(max_time="00:00:00:06", max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    trainer.fit(task, data)
    assert len(rec.canvases) >= 4
    # stages in order, each chosen by the elapsed fraction at the epoch's start
    first_big = rec.canvases.index(128)
    assert set(rec.canvases[:first_big]) == {64} and set(rec.canvases[first_big:]) == {128}
    assert 0.2 < first_big / len(rec.canvases) < 0.8
    # the learning rate follows (1 + cos(pi t/T)) / 2 of the elapsed fraction t/T: falling, near 0 at the end
    lrs = torch.tensor(rec.lrs)
    assert bool((lrs[1:] <= lrs[:-1] + 1e-12).all())
    assert lrs[0] > 0.9e-2 and lrs[-1] < 0.1e-2
    expected = 0.5e-2 * (1 + torch.cos(torch.pi * torch.tensor(rec.fractions)))
    assert torch.allclose(lrs, expected, atol=0.1e-2)


def test_time_schedule_and_cosine_time_need_a_budget():
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, reload_dataloaders_every_n_epochs=1)
    with pytest.raises(ValueError, match=r"set trainer\.max_time"):
        trainer.fit(ClassificationTask("bagnet", TINY), _data([{"time": 1.0}]))
    with pytest.raises(ValueError, match="'cosine_time' anneals over the wall-clock budget"):
        trainer.fit(ClassificationTask("bagnet", TINY, scheduler="cosine_time"), _data(None))


@pytest.mark.parametrize("schedule, message", [
    ([{"time": 0.5}, {"epochs": 2}], "mixes 'epochs' and 'time'"),
    ([{"time": 0.7}, {"time": 0.6}], "add up to more than 1"),
    ([{"time": 0}], r"'time' fraction of the budget in \(0, 1\]"),
    ([{"time": 0.5, "epochs": 2}], "gives both 'epochs' and 'time'"),
    (["64"], "must be a dict"),
])  # fmt: skip
def test_bad_schedules_are_named(schedule, message):
    with pytest.raises(ValueError, match=message):
        _data(schedule)


def test_stage_lookup_by_fraction():
    data = _data([{"time": 0.2, "canvas": 32}, {"time": 0.3, "canvas": 48}, {"time": 0.5}])
    assert data.train_stage_at(0.0) == {"canvas": 32}
    assert data.train_stage_at(0.19) == {"canvas": 32}
    assert data.train_stage_at(0.2) == {"canvas": 48}
    assert data.train_stage_at(0.6) == {} and data.train_stage_at(1.5) == {}
    with pytest.raises(ValueError, match="train_stage_at"):
        data.train_stage(0)
