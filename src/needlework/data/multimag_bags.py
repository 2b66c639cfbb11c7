"""Multi-magnification slide bags for ZoomMIL, from one features folder per magnification.

Each folder is the output of ``needlework slides tile`` + ``slides embed`` at one magnification (e.g.
``10x_64px_0px_overlap/features_color_stats``, then 20×, then 40×; **lowest first**, same
``--tiling.patch_size`` so that footprints nest). Per slide the level-0 coordinates of every level are
matched by :func:`needlework.data.zoom_index.build_zoom_index`: a child belongs to the level-0 tile
containing its centre, ``f²`` slots per parent per level, children lost to tissue filtering are zero rows
with ``mask_<l> = False``.

Items (the keys of :class:`needlework.data.planted_bags.PlantedBags` multi-level items, batched by
:func:`needlework.data.level_collate.pad_bag_levels`, read by ``zoommil``):

* ``bag`` ``(N, D)`` float32, ``coords`` ``(N, 2)`` int64 — the lowest magnification's tiles;
* for ``l = 1 … L−1``: ``bag_<l>`` ``(N·F_l², D)`` (depth-first, zeros where no tile), ``coords_<l>``
  ``(N·F_l², 2)`` level-0 top-left of each slot, ``mask_<l>`` ``(N·F_l²,)`` bool (True = a tile exists);
* ``label`` int, ``index`` int, ``slide_id``, ``case_id``. (No ``instance_labels``: slides carry none.)

Example (paths from ``configs/mil/slides/zoommil.yaml``)::

    ds = SlideBagsMultiMag("train", features_dirs=[d10, d20, d40], labels_csv=..., splits_dir=...)
    ds[0]["bag_2"].shape   # (N·16, D)
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from needlework.data.bags import SlideBagDataset
from needlework.data.zoom_index import ZoomIndex, build_zoom_index
from needlework.registry import register_dataset

_Level = tuple[np.ndarray, np.ndarray, dict[str, Any]]


def _level_file(folder: Path, slide_id: str) -> Path:
    """``<slide_id>.h5`` (features) in ``folder``, else a tiling's ``<slide_id>_patches.h5``."""
    patches = folder / f"{slide_id}_patches.h5"
    features = folder / f"{slide_id}.h5"
    return patches if not features.is_file() and patches.is_file() else features


@register_dataset("slide_bags_multimag")
class SlideBagsMultiMag(SlideBagDataset):
    """Slide-level bags at several magnifications (see the module docstring).

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (as in ``slide_bags``).
        features_dirs: one folder of ``<slide_id>.h5`` per magnification, lowest magnification first.
            Above the lowest, a tiling's ``patches`` folder (``<slide_id>_patches.h5``, coordinates only)
            gives zero-width ``bag_<l>``: for ``slide_bags_multimag_pixels``, which embeds them on the fly.
        labels_csv, split_file, splits_dir, fold, label_map, seed, size, cache, *_column: as in
            ``slide_bags``.
        on_missing: ``"error"`` (default) or ``"skip"`` (warn) for slides without a features file at
            some magnification.
        max_instances: sub-sample training bags to at most this many lowest-magnification tiles (their
            children follow); never at evaluation.
    """

    def __init__(
        self,
        split: str = "train",
        features_dirs: Sequence[str] = (),
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
    ) -> None:
        if isinstance(features_dirs, (str, Path)) or len(features_dirs) < 2:
            raise ValueError(
                "slide_bags_multimag needs features_dirs= with one folder per magnification (at least "
                f"two, lowest magnification first), got {features_dirs!r}; use slide_bags for one"
            )
        self.features_dirs = [Path(d) for d in features_dirs]
        for d in self.features_dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"features folder not found: {d} (run `needlework slides embed`)")
        super().__init__(
            split, str(self.features_dirs[0]), labels_csv, split_file, splits_dir, fold, label_map,
            max_instances, seed, None, on_missing, False, case_column, slide_column, label_column,
        )
        kept, missing = [], []
        for item in self.items:
            paths = [_level_file(d, item["slide_id"]) for d in self.features_dirs]
            absent = [str(p) for p in paths if not p.is_file()]
            if absent:
                missing.append(f"{item['slide_id']} (no {', '.join(absent)})")
            else:
                kept.append({**item, "paths": paths})
        if missing:
            msg = f"{len(missing)} slide(s) of split {split!r} miss a magnification: {missing[:5]}"
            if on_missing == "error":
                raise FileNotFoundError(msg + " (embed every level, or pass on_missing='skip')")
            warnings.warn(msg + "; left out", stacklevel=2)
        self.items = kept[:size] if size is not None else kept
        self._levels_cache: dict[int, tuple[list[_Level], ZoomIndex]] | None = {} if cache else None
        if self.items:  # fail early on folders in the wrong order or tiles that do not nest
            self._load_levels(0)

    @property
    def num_levels(self) -> int:
        return len(self.features_dirs)

    def _read_level(self, path: Path) -> _Level:
        import h5py

        from needlework.io.h5 import read_coords, read_features

        with h5py.File(path, "r") as f:
            has_features = "features" in f
        if has_features:
            feats, coords, attrs = read_features(path)
        else:  # a tiling patch file: coordinates only (tiles embedded on the fly), zero-width features
            coords, attrs = read_coords(path)
            feats = np.zeros((len(coords), 0), np.float32)
        if coords is None or "patch_size_level0" not in attrs:
            raise ValueError(
                f"{path}: multi-magnification bags need level-0 coords and a patch_size_level0 attribute "
                "(features written by `needlework slides embed`)"
            )
        stride = attrs.get("stride_level0", attrs["patch_size_level0"])
        if int(attrs.get("overlap", 0)) or int(stride) != int(attrs["patch_size_level0"]):
            raise ValueError(f"{path}: tiles overlap; tile every magnification with --overlap 0")
        return feats, coords, attrs

    def _load_levels(self, i: int) -> tuple[list[_Level], ZoomIndex]:
        if self._levels_cache is not None and i in self._levels_cache:
            return self._levels_cache[i]
        item = self.items[i]
        levels = [self._read_level(p) for p in item["paths"]]
        names = [str(p) for p in item["paths"]]
        mags = [a.get("target_magnification") for _, _, a in levels]
        if all(m is not None for m in mags) and any(b <= a for a, b in itertools.pairwise(mags)):
            raise ValueError(
                f"slide {item['slide_id']}: features_dirs must go from low to high magnification, got "
                + ", ".join(f"{m:g}x ({n})" for m, n in zip(mags, names))
            )
        if levels[0][0].shape[1] == 0:
            raise ValueError(f"{names[0]}: the lowest magnification needs features (run `slides embed`)")
        dims = {f.shape[1] for f, _, _ in levels if f.shape[1]}
        if len(dims) > 1:
            raise ValueError(
                f"slide {item['slide_id']}: feature widths differ across magnifications "
                f"({[f.shape[1] for f, _, _ in levels]} in {names}); embed every level with one encoder"
            )
        if len(levels[0][0]) == 0:
            raise ValueError(
                f"{names[0]}: empty bag (0 tiles); remove slide {item['slide_id']} from the split"
            )
        sizes = [int(a["patch_size_level0"]) for _, _, a in levels]
        try:
            index = build_zoom_index([c for _, c, _ in levels], sizes, names)
        except ValueError as e:
            raise ValueError(f"slide {item['slide_id']}: {e}") from None
        if self._levels_cache is not None:
            self._levels_cache[i] = (levels, index)
        return levels, index

    def __getitem__(self, i: int) -> dict[str, Any]:
        levels, index = self._load_levels(i)
        n0 = len(index.rows[0])
        parents = np.arange(n0)
        if self.max_instances is not None and n0 > self.max_instances:
            self._draws += 1
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed, i, self._draws, torch.initial_seed()])
            )
            parents = np.sort(rng.choice(n0, self.max_instances, replace=False))
        item = self.items[i]
        out: dict[str, Any] = {}
        for level, ((feats, _, _), rows, slots) in enumerate(zip(levels, index.rows, index.slot_coords)):
            per_parent = len(rows) // n0
            keep = (parents[:, None] * per_parent + np.arange(per_parent)).ravel()
            rows, slots = rows[keep], slots[keep]
            present = rows >= 0
            bag = np.zeros((len(rows), feats.shape[1]), np.float32)
            bag[present] = feats[rows[present]]
            suffix = "" if level == 0 else f"_{level}"
            out[f"bag{suffix}"] = torch.from_numpy(bag)
            out[f"coords{suffix}"] = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64))
            if level > 0:
                out[f"mask{suffix}"] = torch.from_numpy(present)
        out.update(label=int(item["y"]), index=int(i), slide_id=item["slide_id"], case_id=item["case_id"])
        return out
