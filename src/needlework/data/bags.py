"""Bags of tile embeddings for MIL training: features h5 files + a slide-label CSV + a split file.

``SlideBagDataset`` (registered as ``"slide_bags"``) yields ``{"bag": (N, D) float32, "coords": (N, 2)
int64, "label": int64, "slide_id": str, "case_id": str}``; batch them with
:func:`needlework.data.collate.pad_bags`. Features are read from TRIDENT/needlework or CLAM h5 files
(``features``, ``coords``), STAMP h5 or CLAM ``.pt`` files, named ``<slide_id>.h5`` / ``.pt``.

Bag sub-sampling (``max_instances``) is a training-time regulariser: it is applied only when
``split == "train"`` and never at evaluation.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from needlework.data.splits import SPLITS, build_label_map, read_label_csv, select_split
from needlework.errors import ConfigError, InputNotFoundError
from needlework.registry import register_dataset


@register_dataset("slide_bags")
class SlideBagDataset(Dataset):
    """Slide-level bags.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` (slides listed in that column of the split file) or
            ``"all"`` (every slide of the label CSV).
        features_dir: folder with ``<slide_id>.h5``
            (e.g. ``<job>/20x_256px_0px_overlap/features_resnet50_trunc``).
        labels_csv: ``case_id, slide_id, label`` (column names configurable).
        split_file: a CLAM-style ``splits_<k>.csv``; or ``splits_dir`` + ``fold`` (→ ``splits_<fold>.csv``).
        label_map: ``{label string: class index}``; default: integer labels as-is, strings sorted.
        max_instances: sub-sample training bags to at most this many tiles (fresh draw per access).
        seed: seeds the sub-sampling generator (per item and draw).
        size: keep only the first ``size`` bags.
        on_missing: ``"error"`` (default) or ``"skip"`` (warn) for slides without a features file.
        cache: keep loaded bags in memory (MIL training is IO-bound).
        mpp: level-0 µm/px, needed only for STAMP files whose coordinates are in µm.
    """

    def __init__(
        self,
        split: str = "train",
        features_dir: str = "",
        labels_csv: str = "",
        split_file: str | None = None,
        splits_dir: str | None = None,
        fold: int = 0,
        label_map: dict[str, int] | None = None,
        max_instances: int | None = None,
        seed: int = 0,
        size: int | None = None,
        on_missing: str = "error",
        cache: bool = False,
        case_column: str = "case_id",
        slide_column: str = "slide_id",
        label_column: str = "label",
        mpp: float | None = None,
    ):
        if split not in (*SPLITS, "all"):
            raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        if not features_dir or not labels_csv:
            raise ConfigError("slide_bags needs features_dir= (folder of <slide_id>.h5) and labels_csv=")
        self.split, self.seed, self.mpp = split, seed, mpp
        self.max_instances = max_instances if split == "train" else None
        self.features_dir = Path(features_dir)
        if not self.features_dir.is_dir():
            raise InputNotFoundError(
                f"features_dir not found: {self.features_dir} (run `needlework slides embed`)"
            )
        rows = read_label_csv(labels_csv, case_column, slide_column, label_column)
        self.label_map = build_label_map([r["label"] for r in rows], label_map)
        rows = select_split(rows, split, split_file, splits_dir, fold, labels_csv)
        items, missing = [], []
        for r in rows:
            path = self._find(r["slide_id"])
            if path is None:
                missing.append(r["slide_id"])
            else:
                items.append({**r, "path": path, "y": self.label_map[str(r["label"])]})
        if missing:
            msg = (
                f"{len(missing)} slide(s) of split {split!r} have no features file in {self.features_dir}: "
                f"{missing[:10]}"
            )
            if on_missing == "error":
                raise InputNotFoundError(msg + " (pass on_missing='skip' to leave them out)")
            warnings.warn(msg + "; left out", stacklevel=2)
        self.items = items[:size] if size is not None else items
        self._check_bags(split)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
        self._draws = 0

    def _check_bags(self, split: str) -> None:
        """Fail now, not after the training epochs, on bags that are empty or unreadable (file metadata
        only: the values are checked for NaN/Inf when each bag is loaded)."""
        from needlework.io.h5 import bag_length

        bad = []
        for it in self.items:
            try:
                n = bag_length(it["path"])
            except Exception as exc:
                bad.append(f"{it['path']}: unreadable ({type(exc).__name__}: {exc})")
                continue
            if n == 0:
                bad.append(f"{it['path']}: empty bag (0 tiles)")
        if bad:
            raise ConfigError(
                f"{len(bad)} bag(s) of split {split!r} cannot be used: "
                + "; ".join(bad[:10])
                + ". Re-embed those slides or remove them from the split / label CSV."
            )

    def _find(self, slide_id: str) -> Path | None:
        for ext in (".h5", ".pt"):
            path = self.features_dir / f"{slide_id}{ext}"
            if path.is_file():
                return path
        return None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [it["y"] for it in self.items]

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        from needlework.io.h5 import check_finite, read_features

        path = self.items[i]["path"]
        feats, coords, _ = read_features(path, mpp=self.mpp)
        if len(feats) == 0:
            raise ValueError(f"{path}: empty bag (0 tiles); remove the slide from the split")
        check_finite(feats, str(path))
        if coords is None:
            coords = np.zeros((len(feats), 2), np.int64)
        if self._cache is not None:
            self._cache[i] = (feats, coords)
        return feats, coords

    def __getitem__(self, i: int) -> dict[str, Any]:
        feats, coords = self._load(i)
        if self.max_instances is not None and len(feats) > self.max_instances:
            self._draws += 1
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed, i, self._draws, torch.initial_seed()])
            )
            keep = np.sort(rng.choice(len(feats), self.max_instances, replace=False))
            feats, coords = feats[keep], coords[keep]
        item = self.items[i]
        return {
            "bag": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
            "coords": torch.from_numpy(np.ascontiguousarray(coords, dtype=np.int64)),
            "label": torch.tensor(item["y"], dtype=torch.int64),
            "slide_id": item["slide_id"],
            "case_id": item["case_id"],
        }
