"""ZoomMIL with its higher magnifications read from the slide and embedded on the fly.

``slide_bags_multimag`` gives ZoomMIL precomputed features at every magnification. With
``slide_bags_multimag_pixels`` (same arguments plus ``slides_dir``) only the lowest magnification is
precomputed: every level ``l ≥ 1`` becomes ``tiles_<l>``, a :class:`SlideTiles` over the level-0 boxes of
its slots, and ZoomMIL's ``child_encoder`` embeds only the children it zooms into
(:func:`needlework.ops.zoom.embed_rows`), read through
:class:`~needlework.slides.patch_reader.SlidePatchReader`
exactly as ``needlework slides embed`` reads them — the same encoder gives the same features as the
precomputed ones, so the higher levels never need embedding in full: above the lowest magnification,
``features_dirs`` may name the tiling's ``patches`` folders (coordinates only).

Batch with the ``pad_bag_levels_tiles`` collate; use ``zoommil`` with ``child_encoder`` (e.g.
``color_stats``, whose ``embed_dim`` must equal ``in_dim``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from needlework.data.level_collate import pad_bag_levels
from needlework.data.multimag_bags import SlideBagsMultiMag
from needlework.registry import register_collate, register_dataset
from needlework.slides.mpp import load_mpp_overrides, override_for
from needlework.slides.patch_reader import SlidePatchReader
from needlework.slides.reader import list_slides, slide_id_of

__all__ = ["SlideBagsMultiMagPixels", "SlideTiles", "pad_bag_levels_tiles"]

_TILES_KEY = re.compile(r"^tiles_(\d+)$")


class SlideTiles:
    """Child tiles of ``B`` bags read from their slides (a :class:`needlework.ops.zoom.ChildTiles`).

    Args:
        readers: one reader per bag.
        coords: ``(B, N, 2)`` int64 level-0 top-left of every slot.
        present: ``(B, N)`` bool, False for slots without a tile (and padding): those are zeros, never read.
        patch_size_level0: tile side in level-0 pixels, per bag.
        tile_size: side of the tiles given to the encoder, per bag (one value for a batch).
    """

    def __init__(
        self,
        readers: Sequence[SlidePatchReader],
        coords: torch.Tensor,
        present: torch.Tensor,
        patch_size_level0: Sequence[int],
        tile_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if coords.dim() != 3 or coords.shape[:1] != (len(readers),) or coords.shape[2] != 2:
            raise ValueError(f"coords must be ({len(readers)}, N, 2), got {tuple(coords.shape)}")
        if present.shape != coords.shape[:2]:
            raise ValueError(f"present must be {tuple(coords.shape[:2])}, got {tuple(present.shape)}")
        self.readers = list(readers)
        self.coords, self.present = coords.long().cpu(), present.bool().cpu()
        self.patch_size_level0 = [int(p) for p in patch_size_level0]
        self.tile_size = int(tile_size)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.coords.shape[1]

    def __repr__(self) -> str:
        return f"SlideTiles({len(self.readers)} slides, {len(self)} slots, {self.tile_size} px)"

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> SlideTiles:
        return SlideTiles(
            self.readers, self.coords, self.present, self.patch_size_level0, self.tile_size, device
        )

    def gather(self, batch_idx: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Tiles ``(U, 3, P, P)`` float32 in [0, 1] of slots ``index`` of bags ``batch_idx``."""
        b, i = batch_idx.cpu().long(), index.cpu().long()
        p = self.tile_size
        out = np.zeros((len(b), p, p, 3), np.uint8)
        live = self.present[b, i].numpy()
        for bag in torch.unique(b[torch.from_numpy(live)]).tolist():
            rows = np.flatnonzero(live & (b.numpy() == bag))
            xy = self.coords[bag, i[rows]].numpy()
            out[rows] = self.readers[bag].read_level0(xy, self.patch_size_level0[bag], p)
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(self.device, torch.float32).div_(255.0)

    @classmethod
    def cat(cls, items: Sequence[SlideTiles]) -> SlideTiles:
        """One source for a batch: slots zero-padded (absent) to the longest."""
        sizes = {it.tile_size for it in items}
        if len(sizes) != 1:
            raise ValueError(f"cannot batch tiles of different sizes {sorted(sizes)}")
        n = max(len(it) for it in items)
        b = sum(len(it.readers) for it in items)
        coords = torch.zeros(b, n, 2, dtype=torch.long)
        present = torch.zeros(b, n, dtype=torch.bool)
        row = 0
        for it in items:
            k, m = len(it.readers), len(it)
            coords[row : row + k, :m], present[row : row + k, :m] = it.coords, it.present
            row += k
        readers = [r for it in items for r in it.readers]
        sizes0 = [s for it in items for s in it.patch_size_level0]
        return cls(readers, coords, present, sizes0, sizes.pop(), items[0].device)


@register_dataset("slide_bags_multimag_pixels")
class SlideBagsMultiMagPixels(SlideBagsMultiMag):
    """``slide_bags_multimag`` whose levels ≥ 1 are ``tiles_<l>`` read from the slides (see the module).

    Args:
        slides_dir: folder of the slide files (``<slide_id>.<ext>``) the features were made from.
        mpp_csv: per-slide µm/px overrides (only for opening slides without resolution tags).
        reader: ``"auto"``, ``"openslide"`` or ``"tiffslide"``.
        num_threads: threads reading the tiles of one call.
        kwargs: the arguments of ``slide_bags_multimag`` (``features_dirs``, ``labels_csv`` ...); only the
            first folder's features are used, the others give coordinates and tile sizes (features
            folders, or the tiling's ``patches`` folders).
    """

    def __init__(
        self,
        split: str = "train",
        slides_dir: str = "",
        mpp_csv: str | None = None,
        reader: str = "auto",
        num_threads: int = 1,
        **kwargs: Any,
    ) -> None:
        if not slides_dir:
            raise ValueError("slide_bags_multimag_pixels needs slides_dir= (the slides the tiles come from)")
        super().__init__(split, **kwargs)
        files = {slide_id_of(p): p for p in list_slides(slides_dir)}
        missing = [it["slide_id"] for it in self.items if it["slide_id"] not in files]
        if missing:
            raise FileNotFoundError(f"{len(missing)} slide(s) have no file in {slides_dir}: {missing[:10]}")
        overrides = load_mpp_overrides(mpp_csv) if mpp_csv else {}
        for it in self.items:
            path = files[it["slide_id"]]
            it["reader"] = SlidePatchReader(
                path, override_for(overrides, path.name, it["slide_id"]), reader, num_threads
            )

    def __getitem__(self, i: int) -> dict[str, Any]:
        out = super().__getitem__(i)
        levels, _ = self._load_levels(i)
        for level in range(1, self.num_levels):
            attrs = levels[level][2]
            size = int(attrs.get("tile_size") or attrs.get("patch_size") or attrs["patch_size_level0"])
            feats = out.pop(f"bag_{level}")
            out[f"tiles_{level}"] = SlideTiles(
                [self.items[i]["reader"]],
                out[f"coords_{level}"][None],
                out[f"mask_{level}"][None],
                [int(attrs["patch_size_level0"])],
                size,
            )
            out[f"_n_{level}"] = len(feats)
        return out


@register_collate("pad_bag_levels_tiles")
def pad_bag_levels_tiles(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`~needlework.data.level_collate.pad_bag_levels` for items with ``tiles_<l>``: coords and
    masks of every level padded as there, the tiles joined into one :class:`SlideTiles` per level."""
    tiles: dict[str, list[SlideTiles]] = {}
    plain = []
    for s in samples:
        s = dict(s)
        for key in [k for k in s if _TILES_KEY.match(k)]:
            level = _TILES_KEY.match(key).group(1)  # type: ignore[union-attr]
            tiles.setdefault(key, []).append(s.pop(key))
            # a zero-width stand-in, so that the level's coords and mask are padded as a bag level
            s[f"bag_{level}"] = torch.zeros(s.pop(f"_n_{level}"), 0)
        plain.append(s)
    batch = pad_bag_levels(plain)
    for key, items in tiles.items():
        batch.pop(f"bag_{key.split('_')[1]}", None)
        batch[key] = SlideTiles.cat(items)
    return batch
