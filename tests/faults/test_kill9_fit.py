"""``kill -9`` during ``needlework fit``, then a resume from ``last.ckpt``.

The killed run must leave only complete checkpoints (each one loads); the resumed run must continue
where the checkpoint stopped (epochs and global steps go on, none is repeated), finish and write
``metrics.json``.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import torch

from faults.fault_helpers import env, run_cli

STEPS_PER_EPOCH = 4  # 64 training images, batches of 16


def _fit_args(runs, max_epochs: int) -> list[str]:
    return [
        "fit", "--config", "needle_mnist/dense", "--runs_dir", str(runs), "--run_name", "k9",
        "--data.init_args.dataset_kwargs.canvas", "64", "--data.init_args.train_kwargs.size", "64",
        "--data.init_args.val_kwargs.size", "16", "--data.init_args.batch_size", "16",
        "--trainer.max_epochs", str(max_epochs), "--trainer.check_val_every_n_epoch", "1",
        "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_kill9_during_fit_then_resume_from_last_ckpt(tmp_path):
    runs = tmp_path / "runs"
    child = subprocess.Popen(
        [sys.executable, "-m", "needlework", *_fit_args(runs, max_epochs=500)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env(),
        cwd=tmp_path,
    )
    try:
        deadline = time.time() + 90
        last = None
        while time.time() < deadline and child.poll() is None:
            found = list(runs.glob("k9/*/checkpoints/last.ckpt"))
            if found:
                last = found[0]
                break
            time.sleep(0.05)
        assert last is not None, f"no last.ckpt before the deadline: {child.stderr.read().decode()[-2000:]}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    run = last.parents[1]
    assert not (run / "metrics.json").exists(), "the killed run did not get to write its metrics"
    # every checkpoint file the killed run left is complete (atomic writes); at most a temporary
    # .<name>.tmp-<pid> of a write in progress, which is not a checkpoint name
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert last in ckpts
    states = {p.name: _load(p) for p in ckpts}
    epoch, step = states["last.ckpt"]["epoch"], states["last.ckpt"]["global_step"]
    assert step == STEPS_PER_EPOCH * (epoch + 1)  # saved at the end of epoch `epoch`

    max_epochs = epoch + 3
    resumed = run_cli([*_fit_args(runs, max_epochs), "--ckpt_path", str(last)], timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    others = [p for p in (runs / "k9").iterdir() if p != run]
    assert len(others) == 1, "the resume writes a run folder of its own beside the killed one"
    new = others[0]
    assert (new / "metrics.json").is_file()
    final = _load(new / "checkpoints" / "last.ckpt")
    assert final["epoch"] == max_epochs - 1
    assert final["global_step"] == STEPS_PER_EPOCH * max_epochs
    # the resumed run logged only the epochs after the checkpoint: it did not start again from 0
    with (new / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    epochs = {int(r["epoch"]) for r in rows}
    steps = [int(r["step"]) for r in rows]
    assert epochs == set(range(epoch + 1, max_epochs)), epochs
    assert min(steps) >= step
