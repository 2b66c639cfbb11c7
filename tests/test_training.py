import json

import lightning as L
import pytest
import torch

from needlework.cli import main as cli_main
from needlework.training import ClassificationTask, DatasetDataModule

TINY_MODEL = {"receptive_field": 33, "width": 0.25, "blocks": [1, 1, 1, 1], "pooling": "max"}


def test_tiny_training_run_learns():
    """A needle without clutter (canvas 64, one digit per image): a few epochs get well above chance."""
    L.seed_everything(0, verbose=False)
    task = ClassificationTask("bagnet", TINY_MODEL, lr=1e-3)
    data = DatasetDataModule("needle_mnist", {"canvas": 64, "n_clutter": 0}, train_kwargs={"size": 640},
                             val_kwargs={"size": 200}, batch_size=32)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, data)
    metrics = trainer.validate(task, data, verbose=False)[0]
    assert metrics["val/acc"] > 0.7, metrics
    assert metrics["val/auroc"] > 0.85, metrics


def test_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ClassificationTask("bagnet", TINY_MODEL, optimizer="adamx")
    with pytest.raises(ValueError, match="class_weight has 3 entries for 2 classes"):
        ClassificationTask("bagnet", TINY_MODEL, class_weight=[1, 1, 1])
    with pytest.raises(KeyError, match="Unknown model"):
        ClassificationTask("no_such_model")


def test_batch_routing_error_names_missing_key():
    task = ClassificationTask("bagnet", TINY_MODEL)
    with pytest.raises(KeyError, match=r"needs \['image'\]"):
        task({"bag": torch.zeros(1, 2, 3), "label": torch.zeros(1)})


def _fit_args(tmp_path, epochs: int, train_size: int, *extra: str) -> list[str]:
    """``needlework fit`` of the packaged dense config, shrunk to seconds."""
    return [
        "fit", "--config", "needle_mnist/dense", "--runs_dir", str(tmp_path),
        "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
        "--model.init_args.model_kwargs", json.dumps(TINY_MODEL),
        "--data.init_args.dataset_kwargs", '{"canvas": 64}',
        "--data.init_args.train_kwargs", json.dumps({"size": train_size}),
        "--data.init_args.val_kwargs", '{"size": 32}',
        "--data.init_args.test_kwargs", '{"size": 32}', *extra,
    ]  # fmt: skip


def test_fit_cli_writes_run_folder_and_tests_best_checkpoint(tmp_path, capsys):
    args = _fit_args(tmp_path, 2, 64, "--trainer.accumulate_grad_batches", "2",
                     "--trainer.check_val_every_n_epoch", "1")  # fmt: skip
    assert cli_main(args) == 0
    (run,) = (tmp_path / "needle_mnist_dense").iterdir()
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard log missing"
    versions = json.loads((run / "versions.json").read_text())
    assert versions["needlework"] and versions["torch"] == torch.__version__
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fit"]["monitor"] == "val/acc" and "best-" in metrics["fit"]["best_checkpoint"]
    assert set(metrics["test"]) >= {"test/acc", "test/bacc", "test/auroc", "test/f1", "test/loss"}
    # the saved config re-runs evaluation on the best checkpoint
    best = metrics["fit"]["best_checkpoint"]
    assert cli_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", best,
                     "--runs_dir", str(tmp_path / "eval")]) == 0


def test_fit_without_validation_tests_final_weights(tmp_path, capsys):
    """The packaged config validates every 9 epochs: a 1-epoch fit has no best checkpoint and says so."""
    assert cli_main(_fit_args(tmp_path, 1, 32)) == 0
    assert "no best checkpoint" in capsys.readouterr().err
    (run,) = (tmp_path / "needle_mnist_dense").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert not metrics["fit"]["best_checkpoint"] and "test/acc" in metrics["test"]


def test_cli_dispatch(capsys):
    assert cli_main(["--help"]) == 0
    assert "fit" in capsys.readouterr().out
    assert cli_main(["list", "models"]) == 0
    assert "bagnet.rf33" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["demo", "--epochs", "0"])
    assert err.value.code == 2 and "--epochs must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli_main(["demo", "--epochs", "3", "--warmup-epochs", "3"])
    assert err.value.code == 2 and "--warmup-epochs must lie in [0, --epochs)" in capsys.readouterr().err
