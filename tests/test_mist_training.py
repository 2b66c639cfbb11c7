"""MIST training by lifting: the three-step loop, the lifting step, baselines, evaluation outputs."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

import needlework
from needlework.data import GaborTextures, MultiMNIST
from needlework.training.mist import MISTTask

TINY = dict(
    k=2,
    anchor=16.0,
    patch_size=16,
    classifier_widths=(8, 16),
    classifier_blocks=1,
)
TINY_DETECTOR = dict(heatmap_width=8, heatmap_blocks=2, softmax_window=7, nms_window=5)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from 2 threads, and on a busy 2-core machine the second thread
    made these tests ~50× slower (measured: 94 s vs 1.3 s for the three-step test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_digits(size: int = 64, split: str = "train") -> MultiMNIST:
    return MultiMNIST(split, size=size, canvas=40, n_digits=2, digit_size=16, min_distance=12)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(task: MISTTask, dataset, batches: int, batch_size: int = 8, **trainer_kw) -> LossRecorder:
    torch.manual_seed(0)
    rec = LossRecorder()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    n_opt = len(task.configure_optimizers())  # manual optimisation: every optimiser step is a global step
    trainer = L.Trainer(
        max_steps=batches * n_opt,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
        **trainer_kw,
    )
    trainer.fit(task, loader)
    assert len(rec.rows) == batches
    return rec


def first_last(rows: list[dict[str, float]], key: str, n: int = 6) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def test_three_step_loop_decreases_task_and_detector_losses():
    torch.manual_seed(0)
    task = MISTTask("mist", {**TINY, **TINY_DETECTOR}, lr=3e-3, detector_lr=3e-3, keypoint_lr=1e3)
    rec = fit(task, tiny_digits(), batches=24)
    t0, t1 = first_last(rec.rows, "train/task_loss")
    d0, d1 = first_last(rec.rows, "train/detector_loss")
    assert t1 < 0.97 * t0, (t0, t1)
    assert d1 < 0.8 * d0, (d0, d1)
    assert all(r["train/keypoint_shift"] > 0 for r in rec.rows)  # the lifting moved the keypoints


def make_task(**kw) -> tuple[MISTTask, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    task = MISTTask("mist", {**TINY, **TINY_DETECTOR}, **kw)
    batch = torch.utils.data.default_collate([tiny_digits(4)[i] for i in range(4)])
    return task, batch


def test_lifting_step_lowers_the_task_loss_and_honours_the_cap():
    task, batch = make_task(keypoint_lr=2.0, keypoint_steps=2)  # small steps: plain descent
    image, counts = batch["image"], batch["label"]
    loc = task.model.locate(image)
    c0, sizes = loc["centres"], loc["sizes"]

    def loss(c):
        with torch.no_grad():
            return task.model.task_loss(task.model.run_task(image, c, sizes), image, counts).sum()

    lifted, same_sizes = task.lift_keypoints(image, counts, c0, sizes)
    assert torch.equal(same_sizes, sizes)  # sizes stay fixed unless lift_scales
    assert not torch.equal(lifted, c0)
    assert loss(lifted) < loss(c0)
    capped, _ = make_task(keypoint_lr=1e6, keypoint_steps=2, keypoint_max_step=0.75)
    moved, _ = capped.lift_keypoints(image, counts, c0, sizes)
    assert (moved - c0).norm(dim=-1).max() <= 2 * 0.75 + 1e-5


def test_detector_receives_no_gradient_from_the_task_loss():
    task, batch = make_task()
    out = task.model(batch["image"])
    task.model.task_loss(out, batch["image"], batch["label"]).mean().backward()
    assert all(p.grad is None for p in task.model.detector_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.model.task_net.parameters())


def test_target_heatmap_matches_keypoints_with_stride():
    model = needlework.create_model("mist", **TINY, **TINY_DETECTOR, heatmap_stride=2)
    centres = torch.tensor([[[9.0, 21.0], [30.0, 5.0]]])
    g = model.target_heatmaps(centres, torch.ones(1, 2), (20, 20))
    assert g.shape == (1, 1, 20, 20) and g.sum() == 2
    assert g[0, 0, 10, 4] == 1 and g[0, 0, 2, 15] == 1
    out = model(torch.rand(3, 1, 40, 40))
    assert out["heatmaps"].shape == (3, 1, 20, 20) and out["boxes"].shape == (3, 2, 4)
    assert (out["centres"] % 2 == 1).all()  # heatmap pixel centres (c + ½)·2 in image pixels


def test_step_order_and_target_are_validated():
    with pytest.raises(ValueError, match="step_order"):
        MISTTask("mist", {**TINY, **TINY_DETECTOR}, step_order=["task", "detector"])
    with pytest.raises(ValueError, match="target"):
        MISTTask("mist", {**TINY, **TINY_DETECTOR}, target="box")


@pytest.mark.parametrize("order", [("task", "keypoints", "detector"), ("detector", "keypoints", "task")])
def test_other_step_orders_run(order):
    task = MISTTask("mist", {**TINY, **TINY_DETECTOR}, step_order=order, lr=3e-3, detector_lr=3e-3)
    rec = fit(task, tiny_digits(16), batches=2)
    assert {"train/task_loss", "train/detector_loss"} <= set(rec.rows[-1])


def test_channelwise_baseline_trains_end_to_end():
    task = MISTTask(
        "mist.channelwise", {**TINY, "heatmap_width": 8, "heatmap_blocks": 2}, lr=3e-3, detector_lr=3e-3
    )
    before = [p.detach().clone() for p in task.model.detector_parameters()]
    rec = fit(task, tiny_digits(), batches=16)
    t0, t1 = first_last(rec.rows, "train/task_loss", 4)
    assert t1 < t0
    after = task.model.detector_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the heatmap net learned


def test_grid_baseline_and_errors():
    task = MISTTask("mist.grid", {**TINY, "k": 4}, lr=3e-3)
    assert len(task.configure_optimizers()) == 1
    rec = fit(task, tiny_digits(32), batches=4)
    assert "train/task_loss" in rec.rows[-1]
    with pytest.raises(ValueError, match="square"):
        needlework.create_model("mist.grid", k=3)


def test_reconstruction_task_decreases_loss_and_reports_rmse(tmp_path):
    data = GaborTextures("train", size=48, canvas=32, n_impulses=2, kernel_size=8, min_distance=8)
    model_kw = dict(
        task="reconstruction", k=2, anchor=8.0, patch_size=8, latent_dim=8, ae_width=4, **TINY_DETECTOR
    )
    task = MISTTask("mist", model_kw, lr=3e-3, detector_lr=3e-3, keypoint_lr=1e3, figure_dir=str(tmp_path))
    rec = fit(task, data, batches=18)
    t0, t1 = first_last(rec.rows, "train/task_loss", 4)
    assert t1 < t0
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = GaborTextures("val", size=8, canvas=32, n_impulses=2, kernel_size=8, min_distance=8)
    (res,) = trainer.test(task, torch.utils.data.DataLoader(val, batch_size=4), verbose=False)
    assert {"test/rmse", "test/detection", "test/ap50", "test/task_loss"} <= set(res)
    assert "test/classification" not in res
    assert 0 < res["test/rmse"] < 1
    assert (tmp_path / "detections_test.png").stat().st_size > 1000


def test_evaluation_logs_detection_metrics_and_writes_png(tmp_path):
    task = MISTTask("mist", {**TINY, **TINY_DETECTOR}, figure_dir=str(tmp_path), n_figure=4)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(tiny_digits(8, "val"), batch_size=4)
    (res,) = trainer.test(task, loader, verbose=False)
    for key in ("test/detection", "test/classification", "test/both", "test/ap50", "test/task_loss"):
        assert key in res
    assert 0 <= res["test/both"] <= res["test/detection"] <= 1
    assert (tmp_path / "detections_test.png").stat().st_size > 1000
    preds = trainer.predict(task, loader)
    assert preds[0]["boxes"].shape == (4, 2, 4)


def test_multiscale_lifting_updates_sizes_within_the_scale_range():
    torch.manual_seed(2)
    kw = {**TINY, **TINY_DETECTOR, "scales": [0.75, 1.0, 1.25]}
    task = MISTTask("mist", kw, keypoint_lr=50.0, lift_scales=True, lr=3e-3, detector_lr=3e-3)
    batch = torch.utils.data.default_collate([tiny_digits(4)[i] for i in range(4)])
    loc = task.model.locate(batch["image"])
    assert loc["heatmaps"].shape[1] == 3
    assert ((loc["scales"] >= 0.75) & (loc["scales"] <= 1.25)).all()
    _, sizes = task.lift_keypoints(batch["image"], batch["label"], loc["centres"], loc["sizes"])
    assert not torch.equal(sizes, loc["sizes"])
    assert ((sizes >= 0.75 * 16 - 1e-5) & (sizes <= 1.25 * 16 + 1e-5)).all()
    rec = fit(task, tiny_digits(16), batches=2)
    assert "train/detector_loss" in rec.rows[-1]


def test_evaluation_keypoints_are_deterministic_and_spread_on_flat_maps():
    model = needlework.create_model("mist", **{**TINY, "k": 4}, **TINY_DETECTOR).eval()
    image = torch.zeros(2, 1, 40, 40)  # blank: the heatmap is flat
    a, b = model.locate(image), model.locate(image)
    assert torch.equal(a["centres"], b["centres"])
    assert (a["centres"][..., 1] > 1).any()  # ties are not all broken towards row 0
