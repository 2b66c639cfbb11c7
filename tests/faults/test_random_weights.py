"""Random weights under a pretrained name, and a slide smaller than one tile.

``slides embed --encoder resnet50_trunc`` without weights would embed with a random network under a
name that promises trained features: it is refused (one ``error:`` line naming ``--weights`` and the
``--random_weights`` opt-in, exit 2, nothing written). With the opt-in the run proceeds and records the
warning in every slide's status and the summary. A slide on which no tile fits is ``too_small``, not
``no_tissue``.
"""

from __future__ import annotations

import json

import pytest

from needlework.cli import main
from needlework.errors import ConfigError
from needlework.models.encoder_loading import random_weights_of
from needlework.slides.embed_job import EmbedJobConfig, run_embedding
from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_slide


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def tiled(tmp_path, capsys):
    """One 1024 × 768 slide (0.25 µm/px) tiled at 20× in 128-px tiles: a few tiles, fast to embed."""
    slides, job = tmp_path / "slides", tmp_path / "job"
    make_synthetic_slide(slides / "a.tif", SyntheticSlideSpec(width=1024, height=768, n_lesions=0))
    tile = ["slides", "tile", "--slides", str(slides), "--job_dir", str(job), "--tiling.patch_size", "128",
            "--progress", "false", "--qc_max_side", "128"]  # fmt: skip
    assert main(tile) == 0, capsys.readouterr()
    capsys.readouterr()
    return slides, job


def _embed(slides, job, *extra: str) -> list[str]:
    return ["slides", "embed", "--slides", str(slides), "--job_dir", str(job), "--num_workers", "0",
            "--batch_size", "8", "--device", "cpu", "--progress", "false", *extra]  # fmt: skip


def test_which_encoders_count_as_random_weights(tmp_path):
    # names that mean a trained model: random without weights
    for spec in ("resnet18", "resnet50", "resnet50_trunc", "timm:resnet18", "torchvision:resnet18"):
        assert random_weights_of(spec), spec
        assert not random_weights_of(spec, weights="w.pt"), spec
    assert not random_weights_of("timm:resnet18", pretrained=True)  # timm downloads the pretrained ones
    # encoders that mean nothing more than what they compute need no weights
    for spec in ("color_stats", "resnet8", "hf:org/model"):
        assert not random_weights_of(spec), spec
    # weights listed in the local-checkpoint registry count as weights
    (tmp_path / "ckpts.json").write_text(json.dumps({"resnet50_trunc": "r50.pth"}))
    assert not random_weights_of("resnet50_trunc", local_ckpts=str(tmp_path / "ckpts.json"))
    assert random_weights_of("resnet18", local_ckpts=str(tmp_path / "ckpts.json"))


@pytest.mark.parametrize("encoder", [None, "resnet50_trunc", "timm:resnet18"])
def test_pretrained_name_without_weights_is_refused_and_nothing_is_written(tiled, capsys, encoder):
    slides, job = tiled
    before = _files(job)
    args = _embed(slides, job) if encoder is None else _embed(slides, job, "--encoder", encoder)
    assert main(args) == 2  # None: the default encoder, resnet50_trunc
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("error:") == 1 and err.startswith("error: encoder") and "Traceback" not in err
    assert "--weights" in err and "--random_weights true" in err and "random weights" in err
    assert repr(encoder or "resnet50_trunc") in err
    assert "a:" not in captured.out  # reported once for the run, not per slide
    assert _files(job) == before  # no features folder, no status, no summary, no lock


def test_the_api_refuses_before_any_slide(tiled):
    slides, job = tiled
    before = _files(job)
    cfg = EmbedJobConfig(str(job), "20x_128px_0px_overlap", encoder="resnet18", device="cpu", progress=False,
                         num_workers=0)  # fmt: skip
    with pytest.raises(ConfigError, match="--random_weights"):
        run_embedding(slides, cfg)
    assert _files(job) == before


def test_missing_weights_file_is_one_error_line(tiled, capsys, tmp_path):
    slides, job = tiled
    before = _files(job)
    missing = tmp_path / "r50.pth"
    assert main(_embed(slides, job, "--encoder", "resnet50_trunc", "--weights", str(missing))) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: weights file not found: {missing} (--weights)"
    assert _files(job) == before


def test_random_weights_opt_in_embeds_and_records_the_warning(tiled, capsys):
    slides, job = tiled
    with pytest.warns(UserWarning, match="random weights: encoder 'resnet18'"):
        assert main(_embed(slides, job, "--encoder", "resnet18", "--random_weights", "true")) == 0
    out = capsys.readouterr().out
    assert "1 done" in out and "random weights" in out  # the console summary lists the warning
    tdir = job / "20x_128px_0px_overlap"
    assert (tdir / "features_resnet18" / "a.h5").is_file()
    status = json.loads((tdir / "wsi_states" / "embed_resnet18" / "a.json").read_text())
    assert status["status"] == "done" and any("random weights" in w for w in status["warnings"])
    summary_dir = tdir / "wsi_states" / "embed_resnet18"
    summary = json.loads((summary_dir / "summary.json").read_text())
    assert any("random weights" in w for w in summary["warnings"]["a"])
    assert "random weights" in (summary_dir / "summary.md").read_text()


def test_color_stats_needs_no_opt_in(tiled, capsys):
    slides, job = tiled
    assert main(_embed(slides, job, "--encoder", "color_stats")) == 0
    status = json.loads((job / "20x_128px_0px_overlap/wsi_states/embed_color_stats/a.json").read_text())
    assert status["status"] == "done" and not any("random" in w for w in status.get("warnings", []))


def test_slide_smaller_than_one_tile_is_too_small_not_no_tissue(tmp_path, capsys):
    slides, job = tmp_path / "slides", tmp_path / "job"
    make_synthetic_slide(slides / "tiny.tif", SyntheticSlideSpec(width=200, height=150, n_lesions=0))
    make_synthetic_slide(slides / "big.tif", SyntheticSlideSpec(width=1024, height=768, n_lesions=0))
    tile = ["slides", "tile", "--slides", str(slides), "--job_dir", str(job), "--tiling.patch_size", "128",
            "--progress", "false", "--qc_max_side", "128"]  # fmt: skip
    with pytest.warns(UserWarning, match="tiny: slide too small for one tile"):
        assert main(tile) == 0
    out = capsys.readouterr().out
    assert "smaller than one tile: tiny" in out
    states = job / "20x_128px_0px_overlap" / "wsi_states" / "tile"
    status = json.loads((states / "tiny.json").read_text())
    # 128 px at 20x on a 0.25 µm/px (40x) slide is 256 px at level 0
    assert status["status"] == "too_small" and status["n_tiles"] == 0
    assert any("200 x 150 px at level 0" in w and "256 x 256 px" in w for w in status["warnings"])
    summary = json.loads((states / "summary.json").read_text())
    assert summary["too_small"] == ["tiny"] and summary["no_tissue"] == []
    assert summary["counts"]["too_small"] == 1 and summary["counts"]["done"] == 1
    # the embed stage keeps the status: no tiles because none fits, not because no tissue was found
    embed = ["slides", "embed", "--slides", str(slides), "--job_dir", str(job), "--encoder", "color_stats",
             "--num_workers", "0", "--device", "cpu", "--progress", "false"]  # fmt: skip
    assert main(embed) == 0
    assert "smaller than one tile: tiny" in capsys.readouterr().out
    states = job / "20x_128px_0px_overlap" / "wsi_states" / "embed_color_stats"
    status = json.loads((states / "tiny.json").read_text())
    assert status["status"] == "too_small" and any("200 x 150 px" in w for w in status["warnings"])
    assert json.loads((states / "summary.json").read_text())["no_tissue"] == []
