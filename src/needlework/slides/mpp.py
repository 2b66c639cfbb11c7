"""Microns per pixel (MPP) and magnification of a slide, from metadata or an override CSV.

Resolution order (CONVENTIONS.md §2.2): per-slide override CSV → ``openslide.mpp-x/y`` (or
``tiffslide.mpp-x/y``) → vendor keys (``aperio.MPP``, ...) → TIFF ``XResolution`` + ``ResolutionUnit``
(cm or inch) → OME ``PhysicalSizeX`` → objective power (``mpp ≈ 10 / objective``, with a warning) →
:class:`MissingMPPError` naming the slide and the override option.

Example:
    >>> resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, slide_name="a.svs").mpp
    0.25
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAUSIBLE_MPP = (0.05, 20.0)


class MissingMPPError(ValueError):
    """The slide has no usable microns-per-pixel metadata and no override was given."""


@dataclass(frozen=True)
class MPPInfo:
    """Level-0 resolution of a slide: ``mpp`` (µm/px, the mean of x and y), ``source`` (where it
    came from) and ``magnification`` (objective power from metadata, else ``10 / mpp``)."""

    mpp: float
    source: str
    magnification: float


def magnification_to_mpp(magnification: float) -> float:
    """Conventional mapping 40× ≈ 0.25, 20× ≈ 0.5, 10× ≈ 1.0 µm/px (``mpp = 10 / magnification``)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return 10.0 / magnification


def mpp_to_magnification(mpp: float) -> float:
    """Inverse of :func:`magnification_to_mpp`."""
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return 10.0 / mpp


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(str(value).strip())
    except ValueError:
        return None
    return out if out > 0 else None


_VENDOR_KEYS = ("aperio.MPP", "hamamatsu.XResolution_um", "mirax.GENERAL.MICROMETER_PER_PIXEL_X")
_UNIT_TO_UM = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "in": 25400.0, "3": 1e4, "2": 25400.0}


def _from_properties(props: Mapping[str, Any]) -> tuple[float, float, str] | None:
    for prefix in ("openslide", "tiffslide"):
        x, y = _float(props.get(f"{prefix}.mpp-x")), _float(props.get(f"{prefix}.mpp-y"))
        if x is not None:
            return x, y or x, f"{prefix}.mpp-x/y"
    for key in _VENDOR_KEYS:
        x = _float(props.get(key))
        if x is not None:
            return x, x, key
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    if unit in _UNIT_TO_UM:
        xres, yres = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
        if xres is not None:
            factor = _UNIT_TO_UM[unit]
            return factor / xres, factor / (yres or xres), "tiff.XResolution"
    desc = str(props.get("tiff.ImageDescription", ""))
    x = _ome_size(desc, "X")
    if x is not None:
        return x, _ome_size(desc, "Y") or x, "ome.PhysicalSizeX"
    return None


# OME-XML length units (UnitsLength) → µm; OME's default unit is µm.
_OME_UNITS_UM = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
    "in": 25400.0, "mil": 25.4,
}  # fmt: skip


def _ome_size(desc: str, axis: str) -> float | None:
    """``PhysicalSize<axis>`` of the first OME ``Pixels`` element, converted to µm with its unit."""
    match = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', desc)
    value = _float(match.group(1)) if match else None
    if value is None:
        return None
    unit = re.search(rf'PhysicalSize{axis}Unit="([^"]*)"', desc)
    name = unit.group(1).strip() if unit else "µm"
    name = {"μm": "µm", "Å": "Å"}.get(name, name)
    if name not in _OME_UNITS_UM:
        raise MissingMPPError(
            f"OME PhysicalSize{axis}Unit {name!r} is not a length unit needlework knows "
            f"({sorted(_OME_UNITS_UM)}); give the MPP in an override CSV with --mpp_csv"
        )
    return value * _OME_UNITS_UM[name]


def objective_power(props: Mapping[str, Any]) -> float | None:
    """Objective power from the usual metadata keys, if any."""
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        value = _float(props.get(key))
        if value is not None:
            return value
    return None


def resolve_mpp(
    props: Mapping[str, Any], slide_name: str, override: float | None = None, allow_implausible: bool = False
) -> MPPInfo:
    """Level-0 MPP of a slide from its metadata ``props`` (an OpenSlide/tiffslide property map).

    Args:
        props: the slide's properties.
        slide_name: file name, used in error messages.
        override: MPP from the override CSV; wins over metadata and skips the plausibility check.
        allow_implausible: accept values outside 0.05–20 µm/px.

    Raises:
        MissingMPPError: nothing usable in the metadata and no override.
    """
    objective = objective_power(props)
    if override is not None:
        if override <= 0:
            raise ValueError(f"MPP override for {slide_name} must be positive, got {override}")
        return MPPInfo(float(override), "override", objective or mpp_to_magnification(override))
    found = _from_properties(props)
    if found is None:
        if objective is not None:
            mpp = magnification_to_mpp(objective)
            warnings.warn(
                f"{slide_name}: no MPP in metadata; using 10/objective power = {mpp:g} µm/px. "
                "Give the true value in an MPP override CSV (columns wsi,mpp) if this is wrong.",
                stacklevel=2,
            )
            return MPPInfo(mpp, "objective-power", objective)
        raise MissingMPPError(
            f"{slide_name}: no microns-per-pixel in its metadata (no openslide.mpp-x, vendor MPP key, "
            "TIFF resolution tags or objective power). Give it in an MPP override CSV with columns "
            "'wsi,mpp' (wsi = file name with extension) and pass it with --mpp_csv (Python: mpp_csv=...)."
        )
    x, y, source = found
    if abs(x - y) > 0.01 * max(x, y):
        warnings.warn(f"{slide_name}: mpp-x {x:g} and mpp-y {y:g} differ by more than 1 %", stacklevel=2)
    mpp = (x + y) / 2
    lo, hi = PLAUSIBLE_MPP
    if not allow_implausible and not lo <= mpp <= hi:
        raise MissingMPPError(
            f"{slide_name}: implausible MPP {mpp:g} µm/px from {source} (expected {lo}–{hi}). "
            "Give the true value in an MPP override CSV (columns wsi,mpp) with --mpp_csv."
        )
    return MPPInfo(mpp, source, objective or mpp_to_magnification(mpp))


def load_mpp_overrides(path: str | Path) -> dict[str, float]:
    """Read an MPP override CSV: columns ``wsi,mpp`` (TRIDENT; ``wsi`` = file name with extension)
    or ``slide_id,mpp``. Returns ``{name: mpp}`` keyed by what the file says (file name or slide id).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MPP override CSV not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        key = "wsi" if "wsi" in fields else "slide_id" if "slide_id" in fields else None
        if key is None or "mpp" not in fields:
            raise ValueError(
                f"{path}: an MPP override CSV needs columns 'wsi,mpp' or 'slide_id,mpp'; got {fields}"
            )
        out: dict[str, float] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            value = _float(row.get("mpp"))
            if value is None:
                raise ValueError(f"{path} line {line}: mpp {row.get('mpp')!r} is not a positive number")
            out[row[key]] = value
    return out


def override_for(overrides: Mapping[str, float], file_name: str, slide_id: str) -> float | None:
    """The override for a slide, looked up by file name first, then by slide id."""
    if file_name in overrides:
        return overrides[file_name]
    return overrides.get(slide_id)


def unknown_overrides(
    overrides: Mapping[str, float], file_names: list[str], slide_ids: list[str]
) -> list[str]:
    """Entries of the override CSV that match no slide (reported, never silently ignored)."""
    known = set(file_names) | set(slide_ids)
    return sorted(k for k in overrides if k not in known)
