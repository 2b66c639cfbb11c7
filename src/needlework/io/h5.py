"""HDF5 patch and feature files: TRIDENT layout on write, TRIDENT/CLAM/STAMP on read.

Patches: ``coords`` ``(N, 2)`` int64 level-0 top-left ``(x, y)`` with attributes ``patch_size``,
``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``,
``level0_height``, ``name`` (+ ours: ``mpp_level0``, ``target_mpp``, ``reader``, ...).
Features: ``features`` ``(N, D)`` float32 and ``coords`` (same attributes + ``encoder``).
Every file is written under a temporary name, fsynced and renamed: a crash never leaves a
half-written ``.h5`` that resume logic would take for a finished one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_h5(path: str | Path) -> Iterator[h5py.File]:
    """Open ``<path>.tmp<pid>`` for writing; on success fsync and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = np.asarray(value)
        obj.attrs[key] = value


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _attrs(f: h5py.File, dataset: str) -> dict[str, Any]:
    """Attributes of ``dataset``, falling back to the file root (layouts vary across versions)."""
    out = {k: _attr_value(v) for k, v in f.attrs.items()}
    if dataset in f:
        out.update({k: _attr_value(v) for k, v in f[dataset].attrs.items()})
    return out


def write_patches_h5(
    path: str | Path,
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    extra: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write a TRIDENT-style patch file (attributes on the ``coords`` dataset)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_h5(path) as f:
        ds = f.create_dataset("coords", data=coords)
        _set_attrs(ds, attrs)
        for name, arr in (extra or {}).items():
            f.create_dataset(name, data=np.asarray(arr))
    return Path(path)


class NonFiniteFeaturesError(ValueError):
    """Features hold NaN or Inf values (an encoder or a file went wrong)."""


def check_finite(features: np.ndarray, where: str) -> None:
    """Raise :class:`NonFiniteFeaturesError` naming ``where`` when ``features (N, D)`` holds NaN or Inf.

    One NaN in a bag makes every loss NaN, and training then "runs" to chance accuracy without an error.
    """
    finite = np.isfinite(features)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.reshape(len(features), -1).all(axis=1))
    n_nan, n_inf = int(np.isnan(features).sum()), int(np.isinf(features).sum())
    raise NonFiniteFeaturesError(
        f"{where}: features hold {n_nan} NaN and {n_inf} Inf values in {len(rows)} of {len(features)} rows "
        f"(first rows {rows[:5].tolist()}); re-embed the slide (needlework slides embed --overwrite true) "
        "or remove it from the split"
    )


def write_features_h5(
    path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any]
) -> Path:
    """Write ``features (N, D)`` float32 + ``coords (N, 2)`` int64 (attributes on both datasets)."""
    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"features {features.shape} and coords {coords.shape} must be (N, D) and (N, 2)")
    check_finite(features, str(path))  # never write a bag that would poison training
    with atomic_h5(path) as f:
        _set_attrs(f.create_dataset("features", data=features), attrs)
        _set_attrs(f.create_dataset("coords", data=coords), attrs)
    return Path(path)


def patch_size_level0_of(attrs: Mapping[str, Any]) -> int | None:
    """``patch_size_level0`` from TRIDENT attributes or from CLAM's ``patch_size · downsample``."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs and "downsample" in attrs:
        ds = np.asarray(attrs["downsample"], dtype=np.float64).reshape(-1)
        return round(float(attrs["patch_size"]) * float(ds[0]))
    if "patch_size" in attrs and int(attrs.get("patch_level", 0)) == 0:
        return int(attrs["patch_size"])
    return None


def read_coords(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``coords (N, 2)`` int64 and attributes of a TRIDENT or CLAM patch file.

    ``attrs["patch_size_level0"]`` is always filled in when it can be derived.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise KeyError(f"{path}: no 'coords' dataset (keys: {sorted(f.keys())}); not a patch file")
        coords = np.asarray(f["coords"][...], dtype=np.int64).reshape(-1, 2)
        attrs = _attrs(f, "coords")
    ps0 = patch_size_level0_of(attrs)
    if ps0 is not None:
        attrs["patch_size_level0"] = ps0
    return coords, attrs


def read_features(path: str | Path, mpp: float | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Features ``(N, D)`` float32, coords ``(N, 2)`` int64 level-0 (or None) and attributes.

    Layouts: TRIDENT / needlework / CLAM h5 (``features``, ``coords``); CLAM ``.pt`` (tensor only, no
    coords); STAMP h5 (``feats``, ``coords`` in µm when ``unit == "um"``, converted with ``mpp`` or the
    file's ``mpp`` attribute).
    """
    path = Path(path)
    if path.suffix == ".pt":
        import torch

        feats = torch.load(path, map_location="cpu", weights_only=True)
        return np.asarray(feats, dtype=np.float32), None, {"layout": "clam_pt"}
    with h5py.File(path, "r") as f:
        keys = sorted(f.keys())
        if "features" in f:
            feats = np.asarray(f["features"][...], dtype=np.float32)
            coords = np.asarray(f["coords"][...]).reshape(-1, 2) if "coords" in f else None
            attrs = _attrs(f, "coords" if "coords" in f else "features")
            attrs["layout"] = "trident" if "patch_size_level0" in attrs else "clam_h5"
        elif "feats" in f:
            feats = np.asarray(f["feats"][...], dtype=np.float32)
            coords = np.asarray(f["coords"][...], dtype=np.float64).reshape(-1, 2) if "coords" in f else None
            attrs = _attrs(f, "feats")
            attrs["layout"] = "stamp"
            if coords is not None and str(attrs.get("unit", "")).lower() in ("um", "µm", "micron"):
                scale = mpp or attrs.get("mpp")
                if scale is None:
                    raise ValueError(
                        f"{path}: STAMP coordinates are in micrometres; pass mpp= (the slide's level-0 µm/px)"
                    )
                coords = np.round(coords / float(scale))
        else:
            raise KeyError(
                f"{path}: unrecognised feature file (keys {keys}); supported: TRIDENT/CLAM h5 "
                "('features', 'coords'), STAMP h5 ('feats', 'coords'), CLAM .pt"
            )
    if feats.ndim != 2:
        raise ValueError(f"{path}: features must be (N, D), got {feats.shape}")
    if coords is not None:
        coords = coords.astype(np.int64)
        if len(coords) != len(feats):
            raise ValueError(f"{path}: {len(feats)} feature rows but {len(coords)} coords")
    ps0 = patch_size_level0_of(attrs)
    if ps0 is not None:
        attrs["patch_size_level0"] = ps0
    return feats, coords, attrs


def bag_length(path: str | Path) -> int:
    """Number of feature rows of a features file (h5: from the metadata, without reading the values)."""
    path = Path(path)
    if path.suffix == ".pt":
        return len(read_features(path)[0])
    with h5py.File(path, "r") as f:
        for key in ("features", "feats"):
            if key in f:
                return int(f[key].shape[0]) if f[key].ndim else 0
        raise KeyError(f"{path}: no 'features' or 'feats' dataset (keys: {sorted(f.keys())})")


def validate_patches_h5(path: str | Path) -> bool:
    """True when ``path`` is a complete patch file (readable, coords (N, 2), patch_size_level0 set)."""
    try:
        coords, attrs = read_coords(path)
    except Exception:
        return False
    return coords.ndim == 2 and "patch_size_level0" in attrs


def validate_features_h5(path: str | Path, n_tiles: int | None = None) -> bool:
    """True when ``path`` is a complete features file (with ``n_tiles`` rows if given)."""
    try:
        with h5py.File(path, "r") as f:
            n, m = f["features"].shape[0], f["coords"].shape[0]
            ok = f["features"].ndim == 2 and n == m
    except Exception:
        return False
    return ok and (n_tiles is None or n == n_tiles)
