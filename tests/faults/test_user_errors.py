"""User errors: one ``error: ...`` line naming the file or option and the fix, status 2, no traceback,
nothing written. Covers random weights under a pretrained name, an unknown encoder (a configuration
error of the run, reported before any slide), wrong paths and CSVs, and a slide smaller than one tile.
"""

from __future__ import annotations

import json
import shutil

import pytest

from faults.fault_helpers import TILING, run_cli, tile_config
from needlework.cli import main
from needlework.errors import ConfigError, InputNotFoundError, UserError
from needlework.slides.jobs import run_tiling
from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_slide


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
        str(p.relative_to(tdir))
        for p in [*tdir.glob("features_*"), *(tdir / "wsi_states").glob("embed_*")]
    )


def test_pretrained_name_without_weights_is_refused_before_anything_is_written(one_slide_job, capsys):
    slides, job, tdir = one_slide_job
    for encoder in ("resnet50_trunc", "resnet18", "torchvision:resnet18"):
        assert main(_embed(slides, job, "--encoder", encoder)) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert encoder in line and "--weights" in line and "--random_weights true" in line
    assert _embed_outputs(tdir) == []
    # an encoder that means nothing more than it computes needs no weights
    assert main(_embed(slides, job, "--encoder", "color_stats")) == 0
    assert _embed_outputs(tdir) == ["features_color_stats", "wsi_states/embed_color_stats"]


def test_random_weights_opt_in_embeds_and_records_a_warning(one_slide_job, capsys):
    slides, job, tdir = one_slide_job
    assert main(_embed(slides, job, "--encoder", "resnet8", "--random_weights", "true")) == 0
    state_dir = tdir / "wsi_states" / "embed_resnet8"
    status = json.loads((state_dir / "slide_000.json").read_text())
    assert status["status"] == "done" and not status.get("warnings")  # resnet8 promises no pretraining
    with pytest.warns(UserWarning, match="random weights: encoder 'resnet18'"):
        assert main(_embed(slides, job, "--encoder", "resnet18", "--random_weights")) == 0
    state_dir = tdir / "wsi_states" / "embed_resnet18"
    status = json.loads((state_dir / "slide_000.json").read_text())
    assert status["status"] == "done" and status["n_tiles"] > 0
    assert any("random weights" in w and "resnet18" in w for w in status["warnings"])
    summary = json.loads((state_dir / "summary.json").read_text())
    assert any("random weights" in w for w in summary["warnings"]["slide_000"])
    assert "random weights" in (state_dir / "summary.md").read_text()
    assert "random weights" in capsys.readouterr().out  # in the console summary


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
    ]  # fmt: skip
    for argv, needles in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert all(n in line for n in needles), (line, needles)
    assert not (tmp_path / "j").exists() and not (tmp_path / "s").exists() and not (tmp_path / "h").exists()


def test_slide_bag_dataset_errors_are_user_errors(tmp_path):
    from needlework.data.bags import SlideBagDataset

    feats = tmp_path / "features"
    feats.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id\np0,s0\n")
    with pytest.raises(ConfigError, match=r"labels.csv: missing column\(s\) \['label'\]"):
        SlideBagDataset(features_dir=str(feats), labels_csv=str(labels), split="all")
    labels.write_text("case_id,slide_id,label\np0,s0,1\n")
    with pytest.raises(InputNotFoundError, match="split file not found.*splits_0.csv"):
        SlideBagDataset(features_dir=str(feats), labels_csv=str(labels), split="train", splits_dir=str(tmp_path / "splits"))
    with pytest.raises(InputNotFoundError, match="features_dir not found"):
        SlideBagDataset(features_dir=str(tmp_path / "nope"), labels_csv=str(labels), split="all")
    assert issubclass(InputNotFoundError, FileNotFoundError) and issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, UserError)


def test_fit_with_a_missing_splits_file_is_one_error_line(tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id,label\np0,s0,0\np1,s1,1\n")
    out = run_cli(
        [
            "fit", "--config", "slides/abmil_synthetic", "--runs_dir", str(tmp_path / "runs"),
            "--data.init_args.dataset_kwargs.features_dir", str(feats),
            "--data.init_args.dataset_kwargs.labels_csv", str(labels),
            "--data.init_args.dataset_kwargs.splits_dir", str(tmp_path / "nosplits"),
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        ]  # fmt: skip
    )
    assert out.returncode == 2, out.stderr[-3000:]
    line = _one_error_line(out.stderr)
    assert "split file not found" in line and str(tmp_path / "nosplits" / "splits_0.csv") in line
    assert "needlework slides splits" in line


def test_slide_smaller_than_one_tile_gets_its_own_status(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    make_synthetic_slide(slides / "tiny.tif", SyntheticSlideSpec(width=96, height=80, n_lesions=0))
    job = tmp_path / "job"
    argv = ["slides", "tile", "--slides", str(slides), "--job_dir", str(job), "--tiling.patch_size", "128"]
    with pytest.warns(UserWarning, match="too small for one tile") as caught:
        assert main([*argv, "--progress", "false"]) == 0
    assert not any("no tissue" in str(w.message) for w in caught)
    tdir = job / "20x_128px_0px_overlap"
    status = json.loads((tdir / "wsi_states" / "tile" / "tiny.json").read_text())
    assert status["status"] == "too_small" and status["n_tiles"] == 0
    ps0 = status["patch_size_level0"]
    assert any(f"96 x 80 px at level 0, a tile is {ps0} x {ps0} px" in w for w in status["warnings"])
    summary = json.loads((tdir / "wsi_states" / "tile" / "summary.json").read_text())
    assert summary["counts"]["too_small"] == 1 and summary["counts"]["no_tissue"] == 0
    assert summary["too_small"] == ["tiny"] and summary["no_tissue"] == []
    out = capsys.readouterr().out
    assert "1 too_small" in out and "smaller than one tile: tiny" in out
    assert "Smaller than one tile" in (tdir / "wsi_states" / "tile" / "summary.md").read_text()
