"""The MIL configs train through ``needlework fit`` and repeated runs summarise to mean ± std."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mil_helpers import one_thread  # noqa: F401  (autouse fixture)
from needlework.cli import summarize as summary

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "mil").glob("*.yaml"))
SLIDE_CONFIG = Path(__file__).parents[1] / "configs" / "mil" / "slides" / "abmil_gated.yaml"


@pytest.fixture
def clean_argv(monkeypatch):
    """LightningCLI also reads sys.argv: hide pytest's arguments from it."""
    monkeypatch.setattr(sys, "argv", ["needlework"])


def test_every_mil_model_has_a_config():
    from needlework.models.mil import list_mil_models

    names = {p.stem.replace("_", ".", 1) if p.stem.startswith(("instance_", "embedding_")) else p.stem
             for p in CONFIGS}
    names = {n.replace("abmil_gated", "abmil.gated") for n in names}
    missing = set(list_mil_models()) - names
    assert not missing, f"no configs/mil/*.yaml for {sorted(missing)}"


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds(config, clean_argv, tmp_path):
    if config.stem == "zoommil":
        pytest.importorskip("needlework.topk", reason="needlework.topk (perturbed_topk) not available")
    from needlework.cli.train import NeedleworkCLI
    from needlework.training.datamodule import DatasetDataModule
    from needlework.training.task import ClassificationTask

    cli = NeedleworkCLI(ClassificationTask, DatasetDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, run=False, auto_configure_optimizers=False,
                        args=["--config", str(config), "--runs_dir", str(tmp_path)])
    batch = cli.datamodule.collate_fn([cli.datamodule.dataset("train")[i] for i in range(3)])
    assert batch["mask"].shape == batch["bag"].shape[:2]
    out = cli.model(batch)
    assert out["logits"].shape == (3, 2)
    assert cli.model.class_weight is not None
    cli.model.train()
    loss, _ = cli.model.model.compute_loss(cli.model(batch), batch["label"], cli.model.class_weight)
    loss.backward()


def test_fit_runs_and_repeats_summarise(clean_argv, tmp_path, capsys):
    from needlework.cli import main

    for seed in (0, 1):
        rc = main(["fit", "--config", str(CONFIGS[0].parent / "abmil_gated.yaml"),
                   "--runs_dir", str(tmp_path), "--seed_everything", str(seed),
                   "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                   "--trainer.enable_model_summary", "false",
                   "--data.train_kwargs.size", "16", "--data.val_kwargs.size", "8",
                   "--data.test_kwargs.size", "8"])
        assert rc == 0
    metrics = sorted(tmp_path.rglob("metrics.json"))
    assert len(metrics) == 2
    logged = set(json.loads(metrics[0].read_text())["test"])
    assert {"test/acc", "test/auroc", "test/bacc", "test/loss"} <= logged
    out_json = tmp_path / "summary.json"
    assert main(["summarize", str(tmp_path / "mil_abmil_gated"), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "2 run(s)" in printed and "test/auroc" in printed
    data = json.loads(out_json.read_text())
    assert data["summary"]["test/acc"]["n"] == 2


def test_summary_statistics(tmp_path):
    for i, acc in enumerate([0.5, 0.7, 0.9]):
        (tmp_path / f"v{i}").mkdir()
        (tmp_path / f"v{i}" / "metrics.json").write_text(json.dumps({"test": {"test/acc": acc}}))
    s = summary.summarize(summary.collect([tmp_path]))
    assert s["test/acc"]["mean"] == pytest.approx(0.7)
    assert s["test/acc"]["std"] == pytest.approx(0.2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summary.collect([tmp_path / "nope"])


def test_slide_bag_config_trains_on_patient_level_folds(clean_argv, tmp_path, monkeypatch):
    """The slide-bag config on a tiny cohort made by the slide pipeline, as its header describes."""
    pytest.importorskip("needlework.slides", reason="needs the slide pipeline")
    import csv

    from needlework.cli import main

    monkeypatch.chdir(tmp_path)
    root = Path("runs/mil_slides")
    assert main(["slides", "synth", "--out_dir", str(root / "cohort"), "--n_slides", "8", "--width", "2048",
                 "--height", "1536", "--n_lesions", "3", "--lesion_radius", "[30, 60]"]) == 0
    assert main(["slides", "tile", "--slides", str(root / "cohort/slides"), "--job_dir", str(root / "job"),
                 "--tiling.target_magnification", "40", "--tiling.patch_size", "64", "--mpp_csv",
                 str(root / "cohort/mpp_overrides.csv"), "--progress", "false"]) == 0
    assert main(["slides", "embed", "--slides", str(root / "cohort/slides"), "--job_dir", str(root / "job"),
                 "--encoder", "color_stats", "--num_workers", "0", "--progress", "false"]) == 0
    assert main(["slides", "splits", "--labels_csv", str(root / "cohort/labels.csv"), "--out_dir",
                 str(root / "splits"), "--k", "4"]) == 0
    # patient-level: no patient has slides in two parts of a fold
    with open(root / "cohort/labels.csv") as f:
        patient = {r["slide_id"]: r["case_id"] for r in csv.DictReader(f)}
    with open(root / "splits/splits_0.csv") as f:
        rows = list(csv.DictReader(f))
    parts = {p: {patient[r[p]] for r in rows if r[p]} for p in ("train", "val", "test")}
    assert not (parts["train"] & parts["test"]) and not (parts["train"] & parts["val"])
    assert main(["fit", "--config", str(SLIDE_CONFIG), "--trainer.max_epochs", "2",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]) == 0
    metrics = json.loads(next(Path("runs/mil_slides_abmil_gated").rglob("metrics.json")).read_text())
    assert {"test/auroc", "test/bacc"} <= set(metrics["test"])
