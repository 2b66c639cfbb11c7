"""``lesion_type="texture"``: lesions of enlarged, crowded nuclei that colour statistics cannot find
(issue #14, item 4). The colour check is against an independent ring, the area against the tissue mask,
and "colour does not give it away" is a cross-validated logistic regression on pooled ``color_stats``
tile features: near chance on texture lesions, near perfect on the colour lesions of the default mode."""

import json

import numpy as np
import pytest
import torch

from needlework.errors import ConfigError
from needlework.models.encoders import ColorStats
from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_cohort, render_synthetic_slide
from needlework.slides.synthetic_shapes import dilate, rasterise
from needlework.slides.synthetic_texture import COLOUR_RING_PX


def _ring_stats(
    image: np.ndarray, outline: np.ndarray, width: int = COLOUR_RING_PX
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean inside the lesion polygon and in a ring ``width`` px around it (window-local)."""
    x0, y0 = np.floor(outline.min(0)).astype(int) - width - 2
    x1, y1 = np.ceil(outline.max(0)).astype(int) + width + 2
    win = image[y0:y1, x0:x1].astype(np.float64)
    inside = rasterise(outline - [x0, y0], win.shape[:2])
    ring = dilate(inside, width) & ~inside
    return win[inside].mean(0), win[ring].mean(0)


def _texture_slide(seed: int, **kw):
    spec = SyntheticSlideSpec(width=2048, height=1536, seed=seed, n_lesions=2, lesion_type="texture", **kw)
    return render_synthetic_slide(spec)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_texture_lesions_have_the_colour_of_their_surroundings_and_are_tiny(seed):
    image, tissue, lesions = _texture_slide(seed)
    assert len(lesions) == 2
    drawn = np.zeros(tissue.shape, bool)
    for les in lesions:
        inside, ring = _ring_stats(image, les["ring"])
        assert np.all(np.abs(inside - ring) / ring < 0.02), (inside, ring)
        x0, y0, x1, y1 = les["box"]
        drawn[y0:y1, x0:x1] |= rasterise(les["ring"] - [x0, y0], (y1 - y0, x1 - x0))
        assert les["area"] == rasterise(les["ring"] - [x0, y0], (y1 - y0, x1 - x0)).sum()
    assert drawn.sum() <= 0.0005 * tissue.sum()
    assert tissue[drawn].all()  # in tissue


def test_colour_lesions_are_given_away_by_colour():
    """The check above has teeth: the default mode's lesions differ from their ring by far more than 2 %."""
    image, _, lesions = render_synthetic_slide(SyntheticSlideSpec(width=1024, height=768, seed=0))
    inside, ring = _ring_stats(image, lesions[0]["ring"])
    assert np.max(np.abs(inside - ring) / ring) > 0.2


def test_texture_mode_is_deterministic_and_keeps_the_colour_mode_unchanged():
    a, _, la = _texture_slide(5)
    b, _, lb = _texture_slide(5)
    assert np.array_equal(a, b) and [x["box"] for x in la] == [x["box"] for x in lb]
    spec = SyntheticSlideSpec(width=512, height=384, seed=1)
    img_default, _, _ = render_synthetic_slide(spec)
    spec.lesion_type = "color"
    assert np.array_equal(img_default, render_synthetic_slide(spec)[0])
    spec.lesion_type = "stripes"
    with pytest.raises(ValueError, match="lesion_type must be one of"):
        render_synthetic_slide(spec)


def test_too_small_slide_for_texture_lesions_is_a_clear_error():
    spec = SyntheticSlideSpec(width=96, height=96, seed=0, n_lesions=1, lesion_type="texture")
    with pytest.raises(ConfigError, match="larger slide or fewer lesions"):
        render_synthetic_slide(spec)


def test_texture_cohort_from_the_command_line(tmp_path, capsys):
    """``slides synth --lesion_type texture`` writes the slides and their lesion polygons; the colour
    match survives JPEG compression of the written pyramid."""
    from needlework.cli import main as cli_main
    from needlework.slides.reader import open_slide

    out = tmp_path / "cohort"
    argv = [
        "slides",
        "synth",
        "--out_dir",
        str(out),
        "--n_slides",
        "2",
        "--width",
        "2048",
        "--height",
        "1536",
    ]
    assert (
        cli_main([*argv, "--lesion_type", "texture", "--positive_fraction", "1.0", "--no_mpp_slides", "0"])
        == 0
    )
    features = json.loads((out / "annotations" / "slide_000.geojson").read_text())["features"]
    assert len(features) == 2
    with open_slide(out / "slides" / "slide_000.tif") as slide:
        w, h = slide.dimensions
        image = slide.read_region_at(0, 0, w, h, w, h)
    for feat in features:
        outline = np.asarray(feat["geometry"]["coordinates"][0], float)
        inside, ring = _ring_stats(image, outline)
        assert np.all(np.abs(inside - ring) / ring < 0.02), (inside, ring)
    capsys.readouterr()
    assert cli_main([*argv, "--lesion_type", "stripes"]) != 0
    assert "lesion_type must be one of ('color', 'texture'), got 'stripes'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lesion_type must be one of"):
        make_synthetic_cohort(tmp_path / "bad", n_slides=1, lesion_type="stripes")


# ------------------------------------------------------------- colour statistics cannot find them


def _tile_features(image: np.ndarray, tissue: np.ndarray, tile: int = 64) -> np.ndarray:
    """``color_stats`` ``(n, 39)`` of the tissue tiles of one slide (64 px at 40×, as benchmarks/mil.py)."""
    h, w = tissue.shape
    tiles = [
        image[y : y + tile, x : x + tile]
        for y in range(0, h - tile + 1, tile)
        for x in range(0, w - tile + 1, tile)
        if tissue[y : y + tile, x : x + tile].mean() >= 0.5
    ]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return ColorStats(8)(x).numpy()


def _cv_auroc(lesion_type: str, n_slides: int, size: tuple[int, int], n_lesions: int, lesion_radius) -> float:
    """Slide AUROC of a simple MIL on ``color_stats``: a logistic regression on tiles labelled with their
    slide's label, a slide scored by its highest tile; 4-fold cross-validated over slides."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    labels = np.arange(n_slides) % 2
    bags = []
    for i, y in enumerate(labels):
        spec = SyntheticSlideSpec(
            width=size[0],
            height=size[1],
            seed=1000 + i,
            n_lesions=n_lesions if y else 0,
            lesion_radius=lesion_radius,
            lesion_type=lesion_type,
        )
        image, tissue, _ = render_synthetic_slide(spec)
        bags.append(_tile_features(image, tissue))
    scores = np.zeros(n_slides)
    for train, test in StratifiedKFold(4, shuffle=True, random_state=0).split(bags, labels):
        x = np.concatenate([bags[i] for i in train])
        y = np.concatenate([np.full(len(bags[i]), labels[i]) for i in train])
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(x), y)
        for i in test:
            scores[i] = clf.decision_function(scaler.transform(bags[i])).max()
    return float(roc_auc_score(labels, scores))


def test_color_stats_find_colour_lesions_but_not_texture_lesions():
    colour = _cv_auroc("color", 16, (1024, 768), 2, (30, 48))
    texture = _cv_auroc("texture", 16, (1536, 1024), 1, (20, 48))
    assert colour >= 0.85, colour  # measured 0.89
    # One-sided: on signal-free data a cross-validated AUROC leans below 0.5 (each held-out slide is scored by
    # a model fitted on folds short of its own class), and 16 slides spread it about ±0.15; measured 0.20.
    # "Not found" means no better than chance; the slow test checks closeness to 0.5 on 64 slides.
    assert texture <= 0.75, texture


@pytest.mark.slow
def test_color_stats_stay_near_chance_on_a_larger_texture_cohort():
    colour = _cv_auroc("color", 64, (1024, 768), 2, (30, 48))
    texture = _cv_auroc("texture", 64, (1536, 1024), 1, (20, 48))
    big = _cv_auroc("texture", 32, (3072, 2048), 2, (20, 48))
    assert colour >= 0.95, colour
    assert abs(texture - 0.5) <= 0.17, texture  # 64 slides: a chance AUROC spreads about ±0.07
    assert abs(big - 0.5) <= 0.25, big  # 32 slides, lesions 4x larger (same 0.05 % budget)
