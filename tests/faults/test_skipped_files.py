"""DICOM slides and other files in a slide folder: read, or listed with the reason, never dropped silently."""

from __future__ import annotations

import shutil

import pytest

from faults.fault_helpers import tile_config
from needlework.slides import scan
from needlework.slides.jobs import run_tiling
from needlework.slides.status import format_summary


def _folder(small_cohort, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(small_cohort["slides_dir"] / "slide_000.tif", slides / "slide_000.tif")
    (slides / "notes.bin").write_bytes(b"x")
    (slides / "loose.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (slides / "empty_folder").mkdir()
    (slides / "wsi_dicom").mkdir()
    for name in ("level0.dcm", "level1.dcm"):
        (slides / "wsi_dicom" / name).write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # not a valid WSI
    (slides / "labels.csv").write_text("case_id,slide_id,label\n")  # a companion file: not reported
    return slides


def test_every_file_that_is_not_read_is_listed_with_its_reason(small_cohort, tmp_path):
    slides = _folder(small_cohort, tmp_path)
    with pytest.warns(UserWarning, match="not read"):
        summary = run_tiling(slides, tile_config(tmp_path / "job"), skip_errors=True)
    reasons = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in summary["skipped_files"]}
    assert set(reasons) == {"notes.bin", "loose.dcm", "empty_folder"}
    assert "extension" in reasons["notes.bin"] and "folder of their own" in reasons["loose.dcm"]
    text = format_summary(summary)
    assert "files not read" in text and "notes.bin" in text
    md = (tmp_path / "job" / "20x_128px_0px_overlap" / "wsi_states" / "tile" / "summary.md").read_text()
    assert "## Files not read" in md and "loose.dcm" in md
    # OpenSlide 4 reads DICOM: the DICOM folder is a slide of its own (this one is fake, so it fails clearly).
    if scan.openslide_reads_dicom()[0]:
        failed = {f["slide_id"]: f["error"] for f in summary["failures"]}
        assert "wsi_dicom" in failed and "level0.dcm" in failed["wsi_dicom"]
        assert summary["counts"]["done"] == 1


def test_dicom_without_openslide_4_is_listed_not_dropped(small_cohort, tmp_path, monkeypatch):
    slides = _folder(small_cohort, tmp_path)
    monkeypatch.setattr(scan, "openslide_reads_dicom", lambda: (False, "3.4.1"))
    with pytest.warns(UserWarning, match="not read"):
        summary = run_tiling(slides, tile_config(tmp_path / "job"), skip_errors=True)
    reasons = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in summary["skipped_files"]}
    assert "OpenSlide library 4 or newer, found 3.4.1" in reasons["wsi_dicom"]
    assert summary["counts"]["done"] == 1 and summary["counts"]["failed"] == 0


def test_doctor_lists_them_too(small_cohort, tmp_path, monkeypatch):
    from needlework.cli.doctor import slide_checks

    slides = _folder(small_cohort, tmp_path)
    monkeypatch.setattr(scan, "openslide_reads_dicom", lambda: (False, "3.4.1"))
    with pytest.warns(UserWarning, match="not read"):
        checks = slide_checks(slides)
    details = [c["detail"] for c in checks if c["name"] == "not read"]
    assert len(details) == 4 and any("wsi_dicom" in d and "3.4.1" in d for d in details)
    assert any(c["name"] == "dicom" and c["status"] == "warn" for c in checks)
