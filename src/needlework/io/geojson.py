"""QuPath-compatible GeoJSON: tiles as ``detection`` objects, regions as ``annotation`` objects.

Coordinates are level-0 pixels. Rings are closed (first point repeated last). ``objectType`` lives in
``properties`` (QuPath style); measurements are a name → value mapping (QuPath ≥ 0.4).

Example:
    >>> fc = tiles_to_geojson([[0, 0], [512, 0]], 512, {"attention": [0.2, 0.8]})
    >>> validate_geojson(fc)
    []
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OBJECT_TYPES = ("annotation", "detection", "tile", "cell")


def _ring(points: Sequence[Sequence[float]]) -> list[list[float]]:
    ring = [[float(x), float(y)] for x, y in points]
    if ring and ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return ring


def polygon_feature(
    rings: Sequence[Sequence[Sequence[float]]],
    object_type: str = "annotation",
    name: str | None = None,
    color: Sequence[int] = (255, 0, 0),
    measurements: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``Feature`` with a Polygon geometry (first ring = outer boundary, the others = holes)."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [int(c) for c in color]}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    if extra:
        props.update(extra)
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [_ring(r) for r in rings]},
        "properties": props,
    }


def feature_collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


def tiles_to_geojson(
    coords: Any,
    patch_size_level0: int,
    measurements: Mapping[str, Any] | None = None,
    class_name: str = "score",
    color: Sequence[int] = (255, 128, 0),
    colors: Sequence[Sequence[int]] | None = None,
    object_type: str = "detection",
) -> dict[str, Any]:
    """A FeatureCollection with one square ``detection`` per tile.

    Args:
        coords: ``(N, 2)`` level-0 top-left ``(x, y)``.
        patch_size_level0: tile side in level-0 pixels.
        measurements: ``{name: (N,) values}`` stored per tile.
        colors: optional per-tile RGB colours (e.g. from the heatmap colour map).
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    w = int(patch_size_level0)
    values = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in (measurements or {}).items()}
    for k, v in values.items():
        if len(v) != len(coords):
            raise ValueError(f"measurement {k!r} has {len(v)} values for {len(coords)} tiles")
    feats = []
    for i, (x, y) in enumerate(coords.tolist()):
        ring = [[x, y], [x + w, y], [x + w, y + w], [x, y + w]]
        feats.append(
            polygon_feature(
                [ring],
                object_type=object_type,
                name=class_name,
                color=colors[i] if colors is not None else color,
                measurements={k: v[i] for k, v in values.items()},
            )
        )
    return feature_collection(feats)


def write_geojson(path: str | Path, obj: Mapping[str, Any]) -> Path:
    """Write JSON atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_polygons(path: str | Path, class_names: Sequence[str] | None = None) -> list[list[np.ndarray]]:
    """Polygons of a GeoJSON file as lists of rings (``(P, 2)`` float arrays, level-0 ``(x, y)``).

    ``class_names`` keeps only features whose ``classification.name`` is listed (None = all).
    MultiPolygons are split into their polygons.
    """
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):  # QuPath exports a bare list of features too
        data = feature_collection(data)
    features = data["features"] if data.get("type") == "FeatureCollection" else [data]
    out: list[list[np.ndarray]] = []
    for feat in features:
        props = feat.get("properties") or {}
        name = (props.get("classification") or {}).get("name")
        if class_names is not None and name not in class_names:
            continue
        geom = feat.get("geometry") or {}
        polys = [geom["coordinates"]] if geom.get("type") == "Polygon" else []
        if geom.get("type") == "MultiPolygon":
            polys = geom["coordinates"]
        for poly in polys:
            out.append([np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in poly])
    return out


def validate_geojson(obj: Any) -> list[str]:
    """Structural problems of a QuPath-style FeatureCollection (empty list = valid)."""
    errors: list[str] = []
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        return ["top level must be an object with type 'FeatureCollection'"]
    if not isinstance(obj.get("features"), list):
        return ["'features' must be a list"]
    for i, feat in enumerate(obj["features"]):
        where = f"features[{i}]"
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            errors.append(f"{where}: type must be 'Feature'")
            continue
        geom = feat.get("geometry")
        if not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
            errors.append(f"{where}: geometry must be a Polygon or MultiPolygon")
            continue
        polys = [geom.get("coordinates")] if geom["type"] == "Polygon" else geom.get("coordinates") or []
        for poly in polys:
            if not isinstance(poly, list) or not poly:
                errors.append(f"{where}: polygon must be a non-empty list of rings")
                continue
            for ring in poly:
                if not isinstance(ring, list) or len(ring) < 4:
                    errors.append(f"{where}: a ring needs at least 4 positions")
                elif ring[0] != ring[-1]:
                    errors.append(f"{where}: ring is not closed")
                elif not all(
                    isinstance(p, list) and len(p) == 2 and all(_is_finite_number(c) for c in p) for p in ring
                ):
                    errors.append(f"{where}: positions must be [x, y] finite numbers")
        props = feat.get("properties")
        if not isinstance(props, dict):
            errors.append(f"{where}: properties must be an object")
            continue
        if props.get("objectType") not in OBJECT_TYPES:
            errors.append(f"{where}: properties.objectType must be one of {OBJECT_TYPES}")
        cls = props.get("classification")
        if cls is not None and (
            not isinstance(cls.get("name"), str)
            or not (isinstance(cls.get("color"), list) and len(cls["color"]) == 3)
        ):
            errors.append(f"{where}: classification needs a string name and an [r, g, b] color")
        meas = props.get("measurements")
        if meas is not None and not (
            isinstance(meas, dict) and all(_is_finite_number(v) for v in meas.values())
        ):
            errors.append(f"{where}: measurements must map names to finite numbers")
    return errors


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
