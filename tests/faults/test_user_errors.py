"""User errors: one ``error: ...`` line naming the file or option and the fix, status 2, no traceback,
nothing written. Covers an unknown encoder (a configuration error of the run, reported before any
slide), a missing weights file, wrong paths and CSVs in the slide verbs and in ``fit``.
(Random weights under a pretrained name and too-small slides: ``test_random_weights.py``.)
"""

from __future__ import annotations

import shutil

import pytest

from faults.fault_helpers import TILING, run_cli, tile_config
from needlework.cli import main
from needlework.errors import ConfigError, InputNotFoundError, UserError
from needlework.slides.jobs import run_tiling


@pytest.fixture
def one_slide_job(small_cohort, tmp_path):
    """One slide of the cohort, tiled."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(small_cohort["slides_dir"] / "slide_000.tif", slides)
    job = tmp_path / "job"
    run_tiling(slides, tile_config(job))
    return slides, job, job / TILING.dir_name()


def _embed(slides, job, *extra: str) -> list[str]:
    return [
        "slides", "embed", "--slides", str(slides), "--job_dir", str(job), "--num_workers", "0",
        "--batch_size", "16", "--device", "cpu", "--progress", "false", *extra,
    ]  # fmt: skip


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _embed_outputs(tdir) -> list[str]:
    return sorted(
        str(p.relative_to(tdir)) for p in [*tdir.glob("features_*"), *(tdir / "wsi_states").glob("embed_*")]
    )


def test_unknown_encoder_is_one_configuration_error_before_any_slide(one_slide_job, capsys):
    slides, job, tdir = one_slide_job
    assert main(_embed(slides, job, "--encoder", "resnet5O")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "encoder 'resnet5O'" in line and "Unknown encoder" in line
    assert "slide_000" not in line and "Fix or remove that slide" not in line
    assert _embed_outputs(tdir) == []
    assert main(_embed(slides, job, "--encoder", "resnet8", "--weights", str(job / "no.pt"))) == 2
    assert "weights file not found" in _one_error_line(capsys.readouterr().err)


def test_wrong_paths_and_csvs_are_one_error_line_with_status_2(small_cohort, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id\np0,slide_000\n")
    cases = [
        (["slides", "tile", "--slides", str(tmp_path / "nope"), "--job_dir", str(tmp_path / "j")],
         ["slide folder not found", str(tmp_path / "nope"), "--slides"]),
        (["slides", "embed", "--slides", str(small_cohort["slides_dir"]), "--job_dir", str(tmp_path / "j")],
         ["expected one tiling folder", "slides tile"]),
        (["slides", "splits", "--labels_csv", str(labels), "--out_dir", str(tmp_path / "s")],
         [str(labels), "missing column(s) ['label']", "label_column"]),
        (["slides", "splits", "--labels_csv", str(tmp_path / "none.csv"), "--out_dir", str(tmp_path / "s")],
         ["label CSV not found", "none.csv"]),
        (["slides", "heatmap", "--slides", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "h"),
          "--scores", str(tmp_path)], ["slides not found", str(tmp_path / "nope")]),
        (["slides", "heatmap", "--slides", str(small_cohort["slides_dir"]), "--out_dir", str(tmp_path / "h"),
          "--scores", str(tmp_path / "none.h5")], ["--scores not found", "none.h5"]),
        (["slides", "synth", "--out_dir", str(tmp_path / "c"), "--n_slides", "1", "--width", "512",
          "--height", "512", "--lesion_type", "texture", "--positive_fraction", "1"],
         ["texture lesion(s)", "smaller than one enlarged nucleus", "larger slide or fewer lesions"]),
    ]  # fmt: skip
    for argv, needles in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert all(n in line for n in needles), (line, needles)
    assert not (tmp_path / "j").exists() and not (tmp_path / "s").exists() and not (tmp_path / "h").exists()
    assert not list((tmp_path / "c").rglob("*.tif"))  # no slide of the refused cohort


def test_slide_bag_dataset_errors_are_user_errors(tmp_path):
    from needlework.data.bags import SlideBagDataset

    feats = tmp_path / "features"
    feats.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id\np0,s0\n")
    with pytest.raises(ConfigError, match=r"labels.csv: missing column\(s\) \['label'\]"):
        SlideBagDataset(features_dir=str(feats), labels_csv=str(labels), split="all")
    labels.write_text("case_id,slide_id,label\np0,s0,1\n")
    with pytest.raises(InputNotFoundError, match=r"split file not found.*splits_0\.csv"):
        SlideBagDataset(
            features_dir=str(feats),
            labels_csv=str(labels),
            split="train",
            splits_dir=str(tmp_path / "splits"),
        )
    with pytest.raises(InputNotFoundError, match="features_dir not found"):
        SlideBagDataset(features_dir=str(tmp_path / "nope"), labels_csv=str(labels), split="all")
    assert issubclass(InputNotFoundError, FileNotFoundError) and issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, UserError)


def test_fit_with_a_missing_splits_file_is_one_error_line(tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id,label\np0,s0,0\np1,s1,1\n")
    args = [
        "fit", "--config", "slides/abmil_synthetic", "--runs_dir", str(tmp_path / "runs"),
        "--data.init_args.dataset_kwargs.features_dir", str(feats),
        "--data.init_args.dataset_kwargs.labels_csv", str(labels),
        "--data.init_args.dataset_kwargs.splits_dir", str(tmp_path / "nosplits"),
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    out = run_cli(args)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _one_error_line(out.stderr)
    assert "split file not found" in line and str(tmp_path / "nosplits" / "splits_0.csv") in line
    assert "needlework slides splits" in line
