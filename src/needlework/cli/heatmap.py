"""``needlework slides heatmap``: heatmaps from a scores file, from features + a trained model, or from the
slide pixels + a model trained on them (ATS, DPS, IPS with the ``slide_images`` dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from needlework.errors import ConfigError, InputNotFoundError
from needlework.slides.reader import list_slides, slide_id_of


def read_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``scores``, ``coords`` and attributes from a heatmap h5 (ours, or CLAM's ``attention_scores``)."""
    import h5py

    with h5py.File(path, "r") as f:
        key = "scores" if "scores" in f else "attention_scores" if "attention_scores" in f else None
        if key is None or "coords" not in f:
            raise KeyError(
                f"{path}: needs 'coords' and 'scores' (or CLAM 'attention_scores'); has {sorted(f)}"
            )
        scores = np.asarray(f[key][...], dtype=np.float32)
        if key == "attention_scores":
            scores = scores.reshape(-1)
        coords = np.asarray(f["coords"][...], dtype=np.int64)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f[key].attrs.items()}
        attrs.update({k: v for k, v in f["coords"].attrs.items() if k not in attrs})
    return scores, coords, attrs


def _files(path: str, suffix: str) -> list[Path]:
    p = Path(path)
    return sorted(p.glob(f"*{suffix}")) if p.is_dir() else [p]


def run_heatmaps(
    slides: str,
    out_dir: str,
    scores: str | None = None,
    features: str | None = None,
    checkpoint: str | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    formats: tuple[str, ...] = ("png", "h5", "tiles", "geojson"),
    class_index: int = -1,
    normalisation: Literal["percentile", "minmax", "none"] = "percentile",
    cmap: str = "viridis",
    alpha: float = 0.4,
    smooth_sigma: float = 0.0,
    max_side: int = 4096,
    top_k: int = 10,
    bottom_k: int = 0,
    geojson_top_k: int | None = None,
    geojson_min_score: float | None = None,
    mpp_csv: str | None = None,
    pixel_kwargs: dict[str, Any] | None = None,
) -> int:
    """Heatmaps of every scores (or features) file whose slide is found; returns the number written.

    With ``checkpoint`` alone (no ``scores``/``features``) the checkpoint must be one of ``needlework
    fit`` on the ``slide_images`` dataset: every slide is viewed as in training (``low_mpp``,
    ``high_mpp``, ``patch_size`` ... from the checkpoint) and the model's attention over ``x_low`` is
    drawn (:mod:`needlework.slides.pixel_heatmap`).

    Args:
        slides: slide file, or folder of slides (matched to the score files by slide id).
        out_dir: output folder.
        scores: h5 file or folder with ``coords`` + ``scores`` (or CLAM's ``attention_scores``).
        features: features h5 file or folder, scored with ``checkpoint``.
        checkpoint: model state dict or Lightning checkpoint (with ``features``).
        model: registered model name (default: from the Lightning checkpoint).
        model_kwargs: model arguments, e.g. ``{"in_dim": 1024}``.
        formats: any of ``png``, ``h5``, ``tiles``, ``geojson``.
        class_index: score column (or class) drawn; -1 = the last.
        normalisation: score normalisation of the pictures (the h5 keeps the raw scores).
        cmap: matplotlib colour map.
        alpha: opacity of the overlay.
        smooth_sigma: Gaussian smoothing of the overlay, in overlay pixels.
        max_side: longest side of the overlay PNG.
        top_k: highest-scoring tiles exported as PNGs.
        bottom_k: lowest-scoring tiles exported as PNGs.
        geojson_top_k: keep only the best tiles in the GeoJSON.
        geojson_min_score: keep only tiles scoring at least this in the GeoJSON.
        mpp_csv: pixel models: per-slide level-0 µm/px overrides (default: the training run's, if the
            file is there).
        pixel_kwargs: pixel models: overrides of the training dataset's arguments, e.g.
            ``{"max_low_side": 2048, "tissue": {"min_area_um2": 0}}``.
    """
    from needlework.io.h5 import patch_size_level0_of, read_features
    from needlework.slides.heatmap_export import export_heatmap

    if scores and features:
        raise ValueError("give exactly one of --scores or --features (with --checkpoint)")
    data = _checkpoint_data(checkpoint) if checkpoint else None
    pixel = data is not None and data.get("dataset") == "slide_images"
    if not scores and not features:
        if not checkpoint:
            raise ValueError(
                "give --scores, or --features with --checkpoint, or --checkpoint of a model trained "
                "on slide pixels (dataset slide_images) alone"
            )
        if not pixel:
            what = (
                f"the {data['dataset']!r} dataset" if data and data.get("dataset") else "an unknown dataset"
            )
            raise ValueError(
                f"--checkpoint {checkpoint}: a model trained on {what}, not on slide pixels "
                "(slide_images); give its tile features with --features DIR"
            )
        return _pixel_heatmaps(
            slides, out_dir, checkpoint, data, model, model_kwargs, formats, mpp_csv, pixel_kwargs,
            dict(normalisation=normalisation, cmap=cmap, alpha=alpha, max_side=max_side,
                 smooth_sigma=smooth_sigma, top_k=top_k, bottom_k=bottom_k,
                 geojson_top_k=geojson_top_k, geojson_min_score=geojson_min_score),
        )  # fmt: skip
    if features and pixel:
        raise ValueError(
            f"--checkpoint {checkpoint} is a model of slide pixels (slide_images), not of tile "
            "features: drop --features to draw its attention over the slides"
        )
    slide_dir = Path(slides)
    if not slide_dir.exists():
        raise InputNotFoundError(f"slides not found: {slide_dir}; give a slide file or a folder of slides")
    source = Path(scores or features)  # type: ignore[arg-type]
    option = "--scores" if scores else "--features"
    if not source.exists():
        raise InputNotFoundError(f"{option} not found: {source}; give an h5 file or a folder of them")
    inputs = _files(str(source), ".h5")
    if not inputs:
        raise InputNotFoundError(f"{option} {source}: no .h5 files in that folder")
    found = (
        {slide_id_of(p): p for p in list_slides(slide_dir)}
        if slide_dir.is_dir()
        else {slide_id_of(slide_dir): slide_dir}
    )
    net = None
    if features:
        if not checkpoint:
            raise ValueError("--features needs --checkpoint (a trained model)")
        from needlework.models.checkpoint import load_model

        net = load_model(checkpoint, model, model_kwargs)
    n = 0
    unmatched = []
    for src in inputs:
        sid = src.stem.removesuffix("_scores")
        if sid not in found:
            print(f"warning: no slide for {src.name} (slide id {sid!r}); skipped")
            unmatched.append(sid)
            continue
        if net is not None:
            import torch

            from needlework.slides.heatmap_export import scores_from_model

            feats, coords, attrs = read_features(src)
            if coords is None:
                raise ValueError(f"{src}: features without coordinates cannot make a heatmap")
            values, name = scores_from_model(
                net,
                torch.from_numpy(feats),
                torch.from_numpy(coords),
                None if class_index == -1 else class_index,
            )
            attrs["model"] = model or Path(checkpoint).name  # type: ignore[arg-type]
        else:
            values, coords, attrs = read_scores(src)
            name = str(attrs.get("score_name", "score"))
        ps0 = patch_size_level0_of(attrs)
        if ps0 is None:
            raise ValueError(f"{src}: no patch_size_level0 (or CLAM patch_size + downsample) attribute")
        keep = {
            k: attrs[k]
            for k in ("level0_magnification", "target_magnification", "mpp_level0", "patch_size", "model")
            if k in attrs
        }
        written = export_heatmap(
            values,
            coords,
            ps0,
            found[sid],
            out_dir,
            slide_id=sid,
            formats=formats,
            score_name=name,
            class_index=class_index,
            normalisation=normalisation,
            cmap=cmap,
            alpha=alpha,
            max_side=max_side,
            smooth_sigma=smooth_sigma,
            top_k=top_k,
            bottom_k=bottom_k,
            geojson_top_k=geojson_top_k,
            geojson_min_score=geojson_min_score,
            attrs=keep,
        )
        print(f"{sid}: " + ", ".join(f"{k} → {v}" for k, v in written.items()))
        n += 1
    if n == 0 and unmatched:
        raise ConfigError(
            f"no slide in {slide_dir} matches the {option} files (slide ids {unmatched[:5]}, slides "
            f"{sorted(found)[:5]}); a file <slide_id>.h5 needs the slide <slide_id>.<ext>"
        )
    return n


def _checkpoint_data(checkpoint: str) -> dict[str, Any] | None:
    """The ``datamodule_hyper_parameters`` of a Lightning checkpoint (``None`` for a plain state dict)."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file (a .ckpt of `needlework fit`)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: one clear message
        raise ValueError(
            f"--checkpoint {checkpoint}: not a PyTorch checkpoint ({type(exc).__name__})"
        ) from None
    data = raw.get("datamodule_hyper_parameters") if isinstance(raw, dict) else None
    return dict(data) if data is not None else None


def _pixel_heatmaps(
    slides: str,
    out_dir: str,
    checkpoint: str,
    data: dict[str, Any],
    model: str | None,
    model_kwargs: dict[str, Any] | None,
    formats: tuple[str, ...],
    mpp_csv: str | None,
    pixel_kwargs: dict[str, Any] | None,
    export: dict[str, Any],
) -> int:
    """Attention heatmaps of a pixel model over every slide of ``slides``; returns the number written."""
    from needlework.models.checkpoint import load_model
    from needlework.slides.mpp import load_mpp_overrides, override_for
    from needlework.slides.pixel_heatmap import export_pixel_heatmap, slide_pixel_batch

    kwargs = {**dict(data.get("dataset_kwargs") or {}), **(pixel_kwargs or {})}
    view = {
        k: kwargs[k]
        for k in ("low_mpp", "high_mpp", "patch_size", "max_low_side", "tissue", "mask_low", "reader")
        if k in kwargs
    }
    if mpp_csv is None and kwargs.get("mpp_csv") and Path(kwargs["mpp_csv"]).is_file():
        mpp_csv = kwargs["mpp_csv"]
    overrides = load_mpp_overrides(mpp_csv) if mpp_csv else {}
    net = load_model(checkpoint, model, model_kwargs)
    slide_dir = Path(slides)
    paths = list_slides(slide_dir) if slide_dir.is_dir() else [slide_dir]
    if not paths:
        raise FileNotFoundError(f"--slides {slides}: no slide files")
    name = model or Path(checkpoint).name
    n = 0
    for path in paths:
        sid = slide_id_of(path)
        batch = slide_pixel_batch(
            path, mpp_override=override_for(overrides, path.name, sid), slide_id=sid, **view
        )
        written = export_pixel_heatmap(net, batch, out_dir, formats=formats, attrs={"model": name}, **export)
        print(f"{sid}: " + ", ".join(f"{k} → {v}" for k, v in written.items()))
        n += 1
    return n
