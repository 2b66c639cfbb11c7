"""``needlework slides heatmap``: heatmaps from a scores file, or from features + a trained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from needlework.io.h5 import patch_size_level0_of, read_features
from needlework.models.checkpoint import load_model
from needlework.slides.heatmap_export import export_heatmap, scores_from_model
from needlework.slides.reader import list_slides, slide_id_of


def read_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``scores``, ``coords`` and attributes from a heatmap h5 (ours, or CLAM's ``attention_scores``)."""
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


def run_heatmaps(args: argparse.Namespace) -> int:
    if bool(args.scores) == bool(args.features):
        raise SystemExit("give exactly one of --scores or --features (with --checkpoint)")
    slide_dir = Path(args.slide)
    slides = (
        {slide_id_of(p): p for p in list_slides(slide_dir)}
        if slide_dir.is_dir()
        else {slide_id_of(slide_dir): slide_dir}
    )
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    net = None
    if args.features:
        if not args.checkpoint:
            raise SystemExit("--features needs --checkpoint (a trained model)")
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
        net = load_model(args.checkpoint, args.model, kwargs)
    sources = _files(args.scores or args.features, ".h5")
    n = 0
    for src in sources:
        sid = src.stem.removesuffix("_scores")
        if sid not in slides:
            print(f"warning: no slide for {src.name} (slide id {sid!r}); skipped")
            continue
        if net is not None:
            feats, coords, attrs = read_features(src)
            if coords is None:
                raise SystemExit(f"{src}: features without coordinates cannot make a heatmap")
            scores, name = scores_from_model(
                net,
                torch.from_numpy(feats),
                torch.from_numpy(coords),
                None if args.class_index == -1 else args.class_index,
            )
            attrs["model"] = args.model or Path(args.checkpoint).name
        else:
            scores, coords, attrs = read_scores(src)
            name = str(attrs.get("score_name", "score"))
        ps0 = patch_size_level0_of(attrs)
        if ps0 is None:
            raise SystemExit(f"{src}: no patch_size_level0 (or CLAM patch_size + downsample) attribute")
        keep = {
            k: attrs[k]
            for k in ("level0_magnification", "target_magnification", "mpp_level0", "patch_size", "model")
            if k in attrs
        }
        written = export_heatmap(
            scores,
            coords,
            ps0,
            slides[sid],
            args.out,
            sid,
            formats,
            name,
            args.class_index,
            args.normalisation,
            args.cmap,
            args.alpha,
            args.max_side,
            args.smooth,
            args.top_k,
            args.bottom_k,
            None,
            args.geojson_top_k,
            args.geojson_min_score,
            keep,
        )
        print(f"{sid}: " + ", ".join(f"{k} → {v}" for k, v in written.items()))
        n += 1
    return 0 if n else 1
