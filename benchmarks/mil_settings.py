"""Presets, datasets and per-dataset model settings of ``benchmarks/mil.py``."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "mnist_bags": {"train": 160, "test": 160, "epochs": 5, "batch": 8, "lr": 1e-3},
        "planted": {"train": 200, "test": 160, "epochs": 12, "batch": 16, "lr": 1e-3},
        "slides": {"slides": 80, "epochs": 25, "batch": 8, "lr": 1e-3},
        "repeats": 1,
    },
    "full": {
        "mnist_bags": {"train": 200, "test": 1000, "epochs": 20, "batch": 8, "lr": 5e-4},
        "planted": {"train": 1000, "test": 1000, "epochs": 30, "batch": 16, "lr": 1e-3},
        "slides": {"slides": 160, "epochs": 50, "batch": 8, "lr": 1e-3},
        "repeats": 4,
    },
}

DATASETS = {
    "mnist_bags": ("mnist_bags", {"mean_bag_length": 10, "std_bag_length": 2}),
    "slides": ("slide_bags", {}),  # paths filled in by mil_slides.prepare
    "planted": ("planted_bags", {"grid": 6, "levels": 3, "dim": 32, "tissue_fraction": 0.6,
                                 "lesion_size": 4, "signal": 2.0}),
}

# aggregator settings per dataset (LeNet features are 500-d; planted features 32-d)
HEAD_KWARGS: dict[str, dict[str, dict[str, Any]]] = {
    "mnist_bags": {
        "abmil": {"embed_dim": None, "attention_dim": 128},
        "abmil.gated": {"embed_dim": None, "attention_dim": 128},
        "transmil": {"dim": 128, "heads": 4},
        "sparseconvmil": {"cell_size": 28},
    },
    "planted": {
        "abmil": {"embed_dim": 128, "attention_dim": 64},
        "abmil.gated": {"embed_dim": 128, "attention_dim": 64},
        "clam_sb": {"dropout": 0.0},
        "transmil": {"dim": 128, "heads": 4, "num_landmarks": 32, "ppeg_layout": "coords",
                     "coord_stride": 256},
        "sparseconvmil": {"cell_size": 256, "rotation": "right_angles", "scale": None},
        "dsmil": {"embed_dim": 128},
        "zoommil": {"num_levels": 3, "hidden_dim": 128, "attention_dim": 64, "dropout": 0.0, "k": 4,
                    "sigma": 0.05, "n_samples": 50},
    },
    "slides": {
        "abmil": {"embed_dim": 128, "attention_dim": 64},
        "abmil.gated": {"embed_dim": 128, "attention_dim": 64},
        "clam_sb": {"dropout": 0.0},
        "transmil": {"dim": 128, "heads": 4, "num_landmarks": 32, "ppeg_layout": "coords",
                     "coord_stride": 64},
        # raw color_stats features (tiny spread around large means): without input_norm SparseConvMIL
        # and ZoomMIL stayed at the constant prediction (accuracy 0.50) in 25 epochs
        "sparseconvmil": {"cell_size": 64, "rotation": "right_angles", "scale": None, "input_norm": True},
        "dsmil": {"embed_dim": 128},
        # 10× → 20× → 40× (mil_slides.MULTIMAG): 8×6 tiles at 10× on a 2048×1536 slide; the reference's
        # k = 12, σ = 0.002, 100 draws (k = 4 ranked the slides at AUROC 0.33-0.65 in a quick check)
        "zoommil": {"num_levels": 3, "hidden_dim": 128, "attention_dim": 64, "dropout": 0.0, "k": 12,
                    "sigma": 0.002, "n_samples": 100, "input_norm": True},
    },
}
# settings whose multi-level models read other bags than the single-level ones: setting -> dataset name
MULTI_LEVEL_DATASETS = {"slides": "slide_bags_multimag"}
MULTI_LEVEL = {"zoommil"}  # models that take every magnification; the others get the highest one
