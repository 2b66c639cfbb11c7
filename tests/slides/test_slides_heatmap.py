"""Heatmap exports and GeoJSON validity."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from needlework.io.geojson import read_polygons, tiles_to_geojson, validate_geojson
from needlework.io.h5 import read_coords
from needlework.slides.heatmap_export import export_heatmap, normalise_scores, scores_from_model

# RFC 7946 subset for what we write: a FeatureCollection of Polygon features (independent of our validator).
POSITION = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
RING = {"type": "array", "items": POSITION, "minItems": 4}
GEOJSON_SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {
                            "type": {"const": "Polygon"},
                            "coordinates": {"type": "array", "items": RING, "minItems": 1},
                        },
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType"],
                        "properties": {"objectType": {"enum": ["annotation", "detection"]}},
                    },
                },
            },
        },
    },
}


def _assert_valid(obj):
    assert validate_geojson(obj) == []
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema gives an independent GeoJSON check")
    jsonschema.validate(obj, GEOJSON_SCHEMA)
    for feat in obj["features"]:
        for ring in feat["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]  # closed rings (RFC 7946 §3.1.6)


def _lesion_scores(cohort, job, slide_id):
    coords, attrs = read_coords(job["tiling_dir"] / "patches" / f"{slide_id}_patches.h5")
    ps0 = attrs["patch_size_level0"]
    boxes = cohort["slides"][slide_id]["lesions"]
    scores = np.zeros(len(coords), np.float32)
    for i, (x, y) in enumerate(coords.tolist()):
        for b in boxes:
            ix = max(0, min(x + ps0, b["box"][2]) - max(x, b["box"][0]))
            iy = max(0, min(y + ps0, b["box"][3]) - max(y, b["box"][1]))
            scores[i] += ix * iy / ps0**2
    return scores, coords, attrs


def test_export_heatmap_all_formats(cohort, job, tmp_path):
    slide_id = next(s for s, m in cohort["slides"].items() if m["label"] == 1)
    scores, coords, attrs = _lesion_scores(cohort, job, slide_id)
    assert scores.max() > 0
    out = export_heatmap(
        scores,
        coords,
        attrs["patch_size_level0"],
        cohort["slides_dir"] / f"{slide_id}.tif",
        tmp_path,
        top_k=3,
        bottom_k=2,
        max_side=512,
        attrs=attrs,
        score_name="lesion_overlap",
    )
    assert set(out) == {"png", "h5", "tiles", "geojson"}
    with h5py.File(out["h5"]) as f:
        np.testing.assert_array_equal(f["scores"][...], scores)  # raw, never rescaled
        np.testing.assert_array_equal(f["coords"][...], coords)
        assert (
            f["scores"].attrs["patch_size_level0"] == 256
            and f["scores"].attrs["score_name"] == "lesion_overlap"
        )
        assert f["attention_scores"].shape == (len(scores), 1)
    png = Image.open(out["png"])
    assert max(png.size) <= 512 + 40 and png.mode == "RGB"
    with (out["tiles"] / "index.csv").open() as f:
        index = list(csv.DictReader(f))
    top = [r for r in index if r["set"] == "top"]
    assert len(top) == 3 and len([r for r in index if r["set"] == "bottom"]) == 2
    best = top[0]
    x, y = int(best["x"]), int(best["y"])
    assert any(
        x < b["box"][2] and b["box"][0] < x + 256 and y < b["box"][3] and b["box"][1] < y + 256
        for b in cohort["slides"][slide_id]["lesions"]
    )  # the top tile overlaps a planted lesion
    name = f"000_{float(best['score']):.4f}_x{x}_y{y}.png"
    tile = Image.open(out["tiles"] / name)
    assert tile.size == (128, 128)  # at the tiling resolution
    fc = json.loads(out["geojson"].read_text())
    _assert_valid(fc)
    assert len(fc["features"]) == len(coords)
    first = fc["features"][0]
    assert first["properties"]["objectType"] == "detection"
    assert first["properties"]["measurements"]["lesion_overlap"] == pytest.approx(float(scores[0]))
    xs = [p[0] for p in first["geometry"]["coordinates"][0]]
    assert max(xs) - min(xs) == 256


def test_geojson_filters_and_multiclass_scores(cohort, job, tmp_path):
    scores, coords, _ = _lesion_scores(cohort, job, "slide_000")
    two = np.stack([1 - scores, scores], axis=1)
    out = export_heatmap(
        two,
        coords,
        256,
        cohort["slides_dir"] / "slide_000.tif",
        tmp_path,
        formats=["geojson", "h5"],
        geojson_top_k=5,
        geojson_min_score=0.0,
    )
    fc = json.loads(out["geojson"].read_text())
    assert len(fc["features"]) == 5
    with h5py.File(out["h5"]) as f:
        assert f["scores"].shape == (len(coords), 2) and "attention_scores" not in f
    with pytest.raises(ValueError, match="formats"):
        export_heatmap(scores, coords, 256, cohort["slides_dir"] / "slide_000.tif", tmp_path, formats=["pdf"])
    with pytest.raises(ValueError, match="coords"):
        export_heatmap(scores[:-1], coords, 256, cohort["slides_dir"] / "slide_000.tif", tmp_path)


def test_every_geojson_we_write_validates(cohort, job):
    for path in sorted((job["tiling_dir"] / "contours_geojson").glob("*.geojson")):
        fc = json.loads(path.read_text())
        _assert_valid(fc)
        assert all(f["properties"]["objectType"] == "annotation" for f in fc["features"])
    for path in sorted(cohort["annotations_dir"].glob("*.geojson")):
        fc = json.loads(path.read_text())
        _assert_valid(fc)
        sid = path.stem
        assert len(read_polygons(path, ["Tumor"])) == len(cohort["slides"][sid]["lesions"])
    bad = tiles_to_geojson([[0, 0]], 10)
    bad["features"][0]["geometry"]["coordinates"][0].pop()
    assert any("closed" in e for e in validate_geojson(bad))


def test_normalisation():
    s = np.array([5.0, -1.0, 100.0, 5.0])
    np.testing.assert_allclose(normalise_scores(s, "percentile"), [0.5, 0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalise_scores(s, "minmax"), (s + 1) / 101)
    np.testing.assert_allclose(normalise_scores(np.array([2.0, 3.0, 4.0]), "minmax"), [0, 0.5, 1])
    assert (normalise_scores(np.ones(3), "minmax") == 0).all()
    with pytest.raises(ValueError, match="normalisation"):
        normalise_scores(s, "zscore")


def test_scores_from_model_attention_or_instance_logits():
    class Att(torch.nn.Module):
        def forward(self, bag, mask=None):
            a = bag[..., 0].softmax(-1)
            return {"logits": torch.zeros(bag.shape[0], 2), "attention": a}

    class Inst(torch.nn.Module):
        def forward(self, bag):
            return {"logits": torch.zeros(bag.shape[0], 2), "instance_logits": bag[..., :2]}

    bag = torch.randn(6, 4)
    scores, name = scores_from_model(Att(), bag)
    np.testing.assert_allclose(scores, bag[:, 0].softmax(0).numpy(), rtol=1e-6)
    assert name == "attention"
    scores, name = scores_from_model(Inst(), bag)
    np.testing.assert_allclose(scores, bag[:, :2].softmax(-1)[:, 1].numpy(), rtol=1e-6)
    assert name == "prob_class_1"
