"""Training on several processes (Lightning DDP, CPU gloo) finishes, writes one run folder, and evaluates
every item once: its validation and test metrics equal a one-process evaluation of the same checkpoint.

Each DDP run is a ``needlework fit`` in a subprocess (its own process group, killed on timeout after a
stack dump), so a deadlock fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from needlework.cli import main as cli_main
from needlework.training.distributed import UnpaddedDistributedSampler

SRC = Path(__file__).resolve().parents[1] / "src"
MIL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mil" / "abmil.yaml"
TINY_MODEL = {"receptive_field": 33, "width": 0.25, "blocks": [1, 1, 1, 1], "pooling": "max"}
# odd split sizes: Lightning's padded sampler would count one item twice on 2 processes
VAL, TEST = 17, 33
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.fixture
def clean_argv(monkeypatch):
    """LightningCLI also reads sys.argv: hide pytest's arguments from it."""
    monkeypatch.setattr(sys, "argv", ["needlework"])


def run_ddp(args: list[str], timeout: float = 150) -> str:
    """``python -m needlework ARGS`` in a new session; on timeout the whole group (the launched ranks too)
    gets SIGABRT (faulthandler prints every rank's stack), then SIGKILL, and the test fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # fmt: skip
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "NEEDLEWORK_RUN_VERSION"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "needlework", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"DDP run hung for {timeout} s (deadlock?); its stacks:\n{out[-6000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # a rank left behind by a crash
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"DDP run failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out


def dense_args(runs: Path, epochs: int, *extra: str) -> list[str]:
    """The packaged dense needle-MNIST config shrunk to seconds: 32 training images of 64², batch 8."""
    return [
        "fit", "--config", "needle_mnist/dense", "--runs_dir", str(runs),
        "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.check_val_every_n_epoch", "1",
        "--model.init_args.model_kwargs", json.dumps(TINY_MODEL),
        "--data.init_args.dataset_kwargs", '{"canvas": 64}', "--data.init_args.batch_size", "8",
        "--data.init_args.eval_batch_size", "4",
        "--data.init_args.train_kwargs", '{"size": 32}',
        "--data.init_args.val_kwargs", json.dumps({"size": VAL}),
        "--data.init_args.test_kwargs", json.dumps({"size": TEST}), *extra,
    ]  # fmt: skip


def mil_args(runs: Path) -> list[str]:
    """ABMIL on MNIST bags of variable size (pad_bag_levels collate), shrunk to seconds."""
    return [
        "fit", "--config", str(MIL_CONFIG), "--runs_dir", str(runs),
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.dataset_kwargs", json.dumps({"mean_bag_length": 5, "std_bag_length": 2,
                                                       "target_digit": 9, "seed": 0}),
        "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4",
        "--data.init_args.train_kwargs", '{"size": 16}',
        "--data.init_args.val_kwargs", json.dumps({"size": VAL}),
        "--data.init_args.test_kwargs", json.dumps({"size": TEST}),
    ]  # fmt: skip


def one_run(parent: Path) -> Path:
    runs = [p for p in parent.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder, found {runs}"  # all ranks agreed on the version
    return runs[0]


def one_process_eval(subcommand: str, run: Path, ckpt: Path, out: Path) -> dict[str, float]:
    """``needlework validate|test`` of the run's config on one process, in this process."""
    # the saved config names the training run's loggers: log elsewhere, or the numbers compared below
    # would be the ones this evaluation writes into the training run's metrics.json
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}}
    args = [subcommand, "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
            "--trainer.logger", json.dumps(logger),
            "--trainer.strategy", "auto", "--trainer.devices", "1"]  # fmt: skip
    assert cli_main(args) == 0
    (path,) = out.rglob("metrics.json")
    return json.loads(path.read_text())[subcommand]


def assert_same(ddp: dict[str, float], single: dict[str, float]) -> None:
    assert set(ddp) == set(single), (ddp, single)
    for key, value in single.items():
        assert math.isclose(ddp[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, ddp[key], value)


def check_ddp_run(parent: Path, tmp_path: Path) -> dict:
    run = one_run(parent)
    assert (run / "config.yaml").exists() and (run / "hparams.yaml").exists()
    versions = json.loads((run / "versions.json").read_text())
    assert versions["world_size"] == 2 and versions["strategy"] == "DDPStrategy"
    metrics = json.loads((run / "metrics.json").read_text())
    ckpts = run / "checkpoints"
    # test after fit ran on the best checkpoint; validation at the last epoch saw the last weights
    test = one_process_eval("test", run, Path(metrics["fit"]["best_checkpoint"]), tmp_path / "test1")
    assert_same(metrics["test"], test)
    val = one_process_eval("validate", run, ckpts / "last.ckpt", tmp_path / "val1")
    assert_same(metrics["fit"]["val_last"], val)
    return metrics


def test_unpadded_sampler_partitions_the_split():
    for n, world in [(33, 2), (17, 3), (4, 4), (10, 2)]:
        shares = [list(UnpaddedDistributedSampler(range(n), world, r)) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(n))  # each item exactly once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert [len(UnpaddedDistributedSampler(range(n), world, r)) for r in range(world)] == list(
            map(len, shares)
        )
    with pytest.raises(ValueError, match="test split has 1 items for 2 processes"):
        UnpaddedDistributedSampler(range(1), 2, 0, "test split")


def test_datamodule_gives_eval_loaders_the_unpadded_sampler():
    from types import SimpleNamespace

    from needlework.training import DatasetDataModule

    data = DatasetDataModule("needle_mnist", {"canvas": 64}, val_kwargs={"size": VAL}, batch_size=4)
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = data.val_dataloader()
    assert isinstance(loader.sampler, UnpaddedDistributedSampler)
    assert list(loader.sampler) == list(range(1, VAL, 2))


def test_ddp_fit_and_test_equal_one_process(tmp_path, clean_argv):
    """2-process DDP fit + test of a tiny BagNet: metrics equal one process on the same checkpoints."""
    run_ddp([*dense_args(tmp_path / "ddp", 1), *DDP])
    metrics = check_ddp_run(tmp_path / "ddp" / "needle_mnist_dense", tmp_path)
    assert metrics["fit"]["steps"] == 2  # 32 images, 2 ranks x batch 8: DDP shares the epoch


def test_ddp_mil_bags_with_padding_equal_one_process(tmp_path, clean_argv):
    """Same for ABMIL on variable-size pixel bags padded per batch (pad_bag_levels)."""
    run_ddp([*mil_args(tmp_path / "ddp"), *DDP])
    check_ddp_run(tmp_path / "ddp" / "mil_abmil", tmp_path)


@pytest.mark.slow
def test_ddp_resume_continues_the_run(tmp_path):
    """1 epoch, then resume from last.ckpt to 2 epochs = 2 epochs without interruption (same weights)."""
    fixed = ["--model.init_args.scheduler", "null"]  # a cosine schedule would be sized to the 1-epoch run
    run_ddp([*dense_args(tmp_path / "full", 2, *fixed), *DDP])
    run_ddp([*dense_args(tmp_path / "part", 1, *fixed), *DDP])
    first = one_run(tmp_path / "part" / "needle_mnist_dense")
    run_ddp([*dense_args(tmp_path / "resumed", 2, *fixed), *DDP,
             "--ckpt_path", str(first / "checkpoints" / "last.ckpt")])  # fmt: skip
    full = one_run(tmp_path / "full" / "needle_mnist_dense") / "checkpoints" / "last.ckpt"
    resumed = one_run(tmp_path / "resumed" / "needle_mnist_dense") / "checkpoints" / "last.ckpt"
    a = torch.load(full, map_location="cpu", weights_only=False)
    b = torch.load(resumed, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4 and a["epoch"] == b["epoch"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
