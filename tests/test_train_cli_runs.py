"""Evaluating a run never modifies it (issue 15, item 7); ``predict`` writes its predictions (item 8)."""

import csv
import json

import pytest
import torch

from needlework.cli import main as cli_main
from needlework.data.needle_mnist import NeedleMNIST
from train_helpers import fit_args, only_run, snapshot


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """One finished 2-epoch fit (validated every epoch, so it has a best checkpoint)."""
    runs = tmp_path_factory.mktemp("runs")
    assert cli_main(fit_args(runs, 2, 64, "--trainer.check_val_every_n_epoch", "1")) == 0
    return runs, only_run(runs / "needle_mnist_dense")


@pytest.mark.parametrize("verb", ["test", "validate", "predict"])
def test_evaluating_a_saved_config_leaves_the_fit_run_untouched(fit_run, verb, capsys):
    runs, run = fit_run
    before = snapshot(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert "fit" in metrics and "test" in metrics and (run / "metrics.csv").exists()
    best = metrics["fit"]["best_checkpoint"]
    # the command the issue reports: the run's own config, which names the run's own log folder
    assert cli_main([verb, "--config", str(run / "config.yaml"), "--ckpt_path", best]) == 0
    assert snapshot(run) == before, f"{verb} modified the fit run {run}"
    assert sorted(p.name for p in (runs / "needle_mnist_dense").iterdir()) == [run.name]
    evaluation = only_run(runs / f"needle_mnist_dense-{verb}")
    assert (evaluation / "config.yaml").exists()
    if verb != "predict":
        section = json.loads((evaluation / "metrics.json").read_text())[verb]
        assert f"{'val' if verb == 'validate' else 'test'}/acc" in section


def test_predict_writes_probabilities_ids_and_labels(fit_run, capsys):
    runs, run = fit_run
    best = json.loads((run / "metrics.json").read_text())["fit"]["best_checkpoint"]
    out = runs / "predict_csv"
    assert cli_main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", best,
                     "--runs_dir", str(out)]) == 0  # fmt: skip
    path = only_run(out / "needle_mnist_dense-predict") / "predictions.csv"
    assert f"predictions of 32 items in {path}" in capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    # the predict split is the test split: 32 images (test_kwargs size), in order, with their labels
    test_set = NeedleMNIST(split="test", canvas=64, size=32, seed=0)
    assert [int(r["id"]) for r in rows] == list(range(32))
    assert [int(r["label"]) for r in rows] == [int(test_set[i]["label"]) for i in range(32)]
    probs = torch.tensor([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    assert torch.allclose(probs.sum(1), torch.ones(32), atol=1e-5) and (probs >= 0).all()
    # the probabilities are the model's: recompute them from the checkpoint
    from needlework.training import ClassificationTask

    task = ClassificationTask.load_from_checkpoint(best, map_location="cpu").eval()
    with torch.no_grad():
        ref = task({"image": torch.stack([test_set[i]["image"] for i in range(32)])})["logits"].softmax(-1)
    assert torch.allclose(probs, ref, atol=1e-4)
