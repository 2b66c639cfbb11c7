"""Truncated files, reader fallbacks and OME-TIFF pyramids: never a silent change of reader or tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from faults.fault_helpers import TILING, tile_config
from needlework.io.h5 import read_coords
from needlework.slides import reader as reader_module
from needlework.slides.jobs import run_tiling
from needlework.slides.mpp import MissingMPPError, resolve_mpp


@pytest.mark.parametrize("fraction", [0.97, 0.995])
def test_truncated_slide_fails_naming_the_missing_tiles(small_cohort, tmp_path, fraction):
    slides = tmp_path / "slides"
    slides.mkdir()
    data = (small_cohort["slides_dir"] / "slide_000.tif").read_bytes()
    (slides / "cut.tif").write_bytes(data[: int(len(data) * fraction)])
    summary = run_tiling(slides, tile_config(tmp_path / "job"), skip_errors=True)
    assert summary["counts"]["failed"] == 1 and summary["counts"]["done"] == 0
    error = summary["failures"][0]["error"]
    assert "truncated" in error and "past its end" in error and f"{100 * fraction:.1f} %" in error
    assert not list((tmp_path / "job").rglob("*_patches.h5"))


def _ome_and_plain(folder, unit="nm", size=250.0):
    """The same image as an OME-TIFF with a SubIFD pyramid (PhysicalSize in ``unit``) and as a plain
    page-per-level pyramid with resolution tags (0.25 µm/px)."""
    import tifffile

    from needlework.slides.synthetic import (
        SyntheticSlideSpec,
        pyramid,
        render_synthetic_slide,
        write_pyramidal_tiff,
    )

    folder.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSlideSpec(width=1536, height=1024, seed=2)
    image = render_synthetic_slide(spec)[0]
    write_pyramidal_tiff(folder / "plain.tif", image, 0.25, 256, 90, 512)
    levels = list(pyramid(image, 512))
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit}
    meta.update(PhysicalSizeY=size, PhysicalSizeYUnit=unit)
    with tifffile.TiffWriter(folder / "ome.ome.tif", bigtiff=True, ome=True) as tif:
        kw = {
            "tile": (256, 256),
            "compression": "jpeg",
            "compressionargs": {"level": 90},
            "photometric": "rgb",
        }
        tif.write(levels[0], subifds=len(levels) - 1, metadata=meta, **kw)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **kw)
    return folder / "plain.tif", folder / "ome.ome.tif"


def test_ome_subifd_pyramid_is_read_whole_and_the_switch_is_recorded(tmp_path):
    _ome_and_plain(tmp_path / "slides")
    summary = run_tiling(tmp_path / "slides", tile_config(tmp_path / "job"))
    assert summary["counts"]["done"] == 2
    states = tmp_path / "job" / TILING.dir_name() / "wsi_states" / "tile"
    ome = json.loads((states / "ome.json").read_text())
    plain = json.loads((states / "plain.json").read_text())
    assert ome["reader"] == "tiffslide" and plain["reader"] == "openslide"
    assert ome["mpp_level0"] == pytest.approx(0.25)  # 250 nm
    assert any("1 pyramid level(s) of the 3" in w for w in ome["warnings"])
    assert "1 pyramid level(s) of the 3" in (states / "summary.md").read_text()
    pdir = tmp_path / "job" / TILING.dir_name() / "patches"
    ours, ref = read_coords(pdir / "ome_patches.h5")[0], read_coords(pdir / "plain_patches.h5")[0]
    np.testing.assert_array_equal(ours, ref)  # same pixels, same pyramid → same tiles


def test_openslide_refusal_and_tiffslide_fallback_are_recorded(small_cohort, tmp_path, monkeypatch):
    def refuse(self, path, **kwargs):
        raise RuntimeError("Unsupported or missing image file")

    monkeypatch.setattr(reader_module.OpenSlideReader, "__init__", refuse)
    summary = run_tiling(small_cohort["slides_dir"], tile_config(tmp_path))
    assert summary["counts"]["done"] == 3
    warns = summary["warnings"]["slide_000"]
    assert any("read with tiffslide, not openslide" in w and "Unsupported" in w for w in warns)
    md = (tmp_path / TILING.dir_name() / "wsi_states" / "tile" / "summary.md").read_text()
    assert "## Warnings" in md and "OpenSlide refused the file" in md


@pytest.mark.parametrize(
    ("value", "unit", "mpp"),
    [("250", "nm", 0.25), ("0.0005", "mm", 0.5), ("0.5", "µm", 0.5), ("0.5", None, 0.5), ("2500", "Å", 0.25)],
)
def test_ome_physical_size_units_are_converted(value, unit, mpp):
    unit_x = f' PhysicalSizeXUnit="{unit}"' if unit else ""
    unit_y = f' PhysicalSizeYUnit="{unit}"' if unit else ""
    desc = (
        f'<OME><Image><Pixels PhysicalSizeX="{value}"{unit_x} PhysicalSizeY="{value}"{unit_y}/></Image></OME>'
    )
    info = resolve_mpp({"tiff.ImageDescription": desc}, "a.ome.tif")
    assert info.mpp == pytest.approx(mpp) and info.source == "ome.PhysicalSizeX"


def test_unknown_ome_unit_is_an_error_naming_the_override():
    desc = '<Pixels PhysicalSizeX="3" PhysicalSizeXUnit="furlong"/>'
    with pytest.raises(MissingMPPError, match=r"'furlong'.*--mpp_csv"):
        resolve_mpp({"tiff.ImageDescription": desc}, "a.ome.tif")
