"""Issue #13: multi-resolution views, the patch-grid MIL baseline, the needle-MNIST configs of every method,
and the O2I sweep script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import needlework
from needlework.cli import main as cli_main
from needlework.data.views import MultiResolutionViews, area_downsample
from needlework.metrics import attention_peaks
from needlework.training import DatasetDataModule

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- the views
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_x_low_is_an_area_downsample(factor, dtype):
    image = torch.rand(3, 64, 48, dtype=dtype)
    out = MultiResolutionViews(factor=factor)({"image": image, "label": 1})
    assert out["x_high"] is image and out["image"] is image and out["label"] == 1
    assert out["x_low"].shape == (3, 64 // factor, 48 // factor) and out["x_low"].dtype == dtype
    ref = F.interpolate(image[None], size=(64 // factor, 48 // factor), mode="area")[0]
    torch.testing.assert_close(out["x_low"], ref)
    # block (i, j) of x_high averages to x_low[i, j], by hand
    block = image[1, 2 * factor : 3 * factor, 3 * factor : 4 * factor]
    torch.testing.assert_close(out["x_low"][1, 2, 3], block.mean())


def test_views_drop_partial_blocks_and_check_inputs():
    x_low = area_downsample(torch.ones(1, 10, 10), 4)
    assert x_low.shape == (1, 2, 2) and torch.all(x_low == 1)
    with pytest.raises(ValueError, match="positive integer"):
        MultiResolutionViews(factor=0)
    with pytest.raises(KeyError, match="no 'image' entry"):
        MultiResolutionViews()({"bag": torch.zeros(3)})
    with pytest.raises(ValueError, match="image"):
        MultiResolutionViews()({"image": torch.zeros(8, 8)})
    with pytest.raises(ValueError, match="smaller than the downsampling factor"):
        area_downsample(torch.zeros(1, 4, 4), 8)
    out = MultiResolutionViews(keep_image=False)({"image": torch.zeros(1, 16, 16)})
    assert "image" not in out and out["x_low"].shape == (1, 2, 2)


def test_views_from_the_data_module_are_deterministic():
    def item():
        dm = DatasetDataModule("needle_mnist", {"canvas": 128, "seed": 3}, val_kwargs={"size": 4},
                               transforms=[{"name": "views", "factor": 4}])
        return dm.dataset("val")[1]

    a, b = item(), item()
    assert a["x_low"].shape == (1, 32, 32) and a["x_high"].shape == (1, 128, 128)
    torch.testing.assert_close(a["x_low"], b["x_low"])
    torch.testing.assert_close(a["x_low"], area_downsample(a["image"], 4))
    dm = DatasetDataModule("needle_mnist", {"canvas": 128}, val_kwargs={"size": 4},
                           transforms=[{"name": "views"}])
    assert dm.dataset("val").o2i == pytest.approx(28**2 / 128**2)  # attributes pass through the wrapper
    with pytest.raises(ValueError, match="a transform is a mapping with a 'name'"):
        DatasetDataModule("needle_mnist", transforms=[{"factor": 8}])
    with pytest.raises(KeyError, match="Unknown transform 'nope'"):
        DatasetDataModule("needle_mnist", transforms=[{"name": "nope"}])


def test_curriculum_stages_are_capped_at_the_target_canvas():
    schedule = [{"epochs": 1, "canvas": 64}, {"epochs": 1, "canvas": 256}, {"epochs": 1}]
    dm = DatasetDataModule("needle_mnist", {"canvas": 128}, train_schedule=schedule, resample_each_epoch=True)
    canvases = []
    for epoch in range(3):
        dm.trainer = type("T", (), {"current_epoch": epoch, "reload_dataloaders_every_n_epochs": 1})()
        dm.train_dataloader()
        canvases.append(dm.dataset("train").canvas)
    assert canvases == [64, 128, 128]


# ------------------------------------------------------------------------------------ patch-grid MIL
def test_patch_mil_attention_is_over_the_grid_and_pads_partial_patches():
    torch.manual_seed(0)
    model = needlework.create_model("patch_mil", patch_size=16, dim=16,
                                    encoder={"widths": [8, 8], "strides": [1, 2]})  # fmt: skip
    out = model(image=torch.rand(2, 1, 40, 64))
    assert out["attention"].shape == (2, 12) and out["attention_map"].shape == (2, 3, 4)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2))
    assert out["instance_coords"][0, -1].tolist() == [48, 32]
    # the patch-grid MIL is a bag model: permuting nothing but the image content moves the attention
    img = torch.zeros(1, 1, 64, 64)
    img[..., 16:32, 48:64] = 1.0
    peak = attention_peaks(model(image=img), (64, 64))
    assert peak.shape == (1, 2)
    with pytest.raises(ValueError, match="image"):
        model(image=torch.rand(2, 3, 32, 32))


def test_patch_mil_takes_any_mil_head():
    model = needlework.create_model("patch_mil", patch_size=16, dim=16, mil="transmil",
                                    encoder={"widths": [8], "strides": [2]})  # fmt: skip
    out = model(image=torch.rand(2, 1, 32, 32))
    assert out["logits"].shape == (2, 2) and out["attention"].shape == (2, 4)


def test_attention_peaks_by_hand():
    amap = torch.zeros(1, 2, 4)
    amap[0, 1, 2] = 1.0
    assert attention_peaks({"attention_map": amap}, (100, 200)).tolist() == [[125.0, 75.0]]
    att = torch.tensor([[0.1, 0.6, 0.3]])
    out = {"attention": att, "selected_idx": torch.tensor([[2, 1]]),
           "selected_coords": torch.tensor([[[10, 20], [30, 40]]])}  # fmt: skip
    assert attention_peaks(out, (100, 100), patch_size=8).tolist() == [[34.0, 44.0]]
    with pytest.raises(KeyError, match="no attention_map or selected patches"):
        attention_peaks({"logits": torch.zeros(1, 2)}, (8, 8))


# ------------------------------------------------------------------------- every config, one step
@pytest.mark.parametrize("method", ["dense", "ats", "dps", "ips", "patch_mil"])
def test_needle_mnist_config_runs_one_step_at_canvas_256(method, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = ["fit", "--config", f"needle_mnist/{method}", "--data.init_args.dataset_kwargs.canvas", "256",
            "--trainer.fast_dev_run", "true", "--runs_dir", str(tmp_path), "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
    assert cli_main(args) == 0
    # fast_dev_run has no logger: its checkpoint goes under the runs folder, not the working directory
    assert not any(cwd.iterdir()) and list(tmp_path.rglob("last.ckpt"))


def test_packaged_config_names_resolve_and_unknown_names_are_clear(capsys):
    from needlework.configs import list_configs, resolve_config

    assert {f"needle_mnist/{m}" for m in ("dense", "ats", "dps", "ips", "patch_mil")} <= set(list_configs())
    assert resolve_config("configs/needle_mnist/ips.yaml").is_file()
    with pytest.raises(SystemExit, match=r"neither a file nor a packaged config.*needle_mnist/ips"):
        cli_main(["fit", "--config", "needle_mnist/ipz"])


# --------------------------------------------------------------------------------------- the sweep
def test_o2i_sweep_micro_grid_writes_rows_and_figure_and_resumes(tmp_path):
    out, fig = tmp_path / "sweep.json", tmp_path / "sweep.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "o2i_sweep.py"), "--methods", "ips", "patch_mil",
           "--canvas", "64", "128", "--minutes", "0.05", "--test-size", "8", "--val-size", "8", "--jobs", "2",
           "--out", str(out), "--figure", str(fig), "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and fig.stat().st_size > 10_000
    for row in rows:
        for field in ("method", "config", "canvas", "o2i", "seed", "test_acc", "test_auroc", "loc_ap",
                      "train_seconds", "steps", "images_seen", "peak_mem_mb", "device"):  # fmt: skip
            assert field in row, field
        assert row["o2i"] == pytest.approx(28**2 / row["canvas"] ** 2, rel=1e-3)
        assert 0 <= row["test_acc"] <= 1 and row["n_test"] == 8 and row["device"] == "cpu"
        assert row["images_seen"] == row["steps"] * 16 and row["peak_mem_mb"] > 50
        # the time protocol: the final weights after the time-cosine, a curriculum within the budget
        assert row["schedule"] == "time" and row["checkpoint"] == "last" and row["steps"] > 0
    log = (tmp_path / "runs" / "logs" / "o2i_ips_c128_s0.log").read_text()
    assert "--model.init_args.scheduler cosine_time" in log and "curriculum: from epoch" in log
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 runs to go" in again.stdout  # a finished sweep resumes to nothing


def test_ips_demo_end_to_end_in_a_subprocess(tmp_path):
    """``needlework demo --method ips``: the tiny-regime demo on its default wall-clock curriculum, shortened
    to 15 s of training (a crash fails with its signal); the final weights are tested."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "needlework", "demo", "--method", "ips", "--canvas", "128",
           "--stages", "64:0.5", "--max-minutes", "0.25", "--epoch-size", "32",
           "--test-size", "16", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["method"] == "ips" and metrics["n_test"] == 16 and metrics["epochs"] >= 1
    assert metrics["args"]["time_stages"] is True and metrics["args"]["val_every"] == 0
    assert 12 <= metrics["train_seconds"] < 60  # stopped by --max-minutes, not by an epoch count
    assert 0 <= metrics["localisation_ap"] <= 1
    assert (out / "selection.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "IPS in the tiny regime" in report and "64 px for 50% of the time" in report
    assert "final weights" in report


def test_demo_stage_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--method", "ips", "--stages", "64x4"])
    assert "--stages takes CANVAS:EPOCHS or CANVAS:FRACTION pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["demo", "--method", "ips", "--stages", "64:4,128:14", "--epochs", "10"])
    assert "the curriculum has 18 of 10 epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["demo", "--method", "ips", "--stages", "64:0.5,128:0.6"])
    assert "fractions of the time budget add up to 1.1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["demo", "--val-every", "-1"])
    assert "--val-every must be >= 0" in capsys.readouterr().err
