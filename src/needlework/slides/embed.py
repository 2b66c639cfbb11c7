"""Tile embedding: a DataLoader over a slide's tiles (worker processes) feeding a tile encoder.

Each DataLoader worker opens its own slide handle (readers are not shared across ``fork``). Tiles are
read at the tiling resolution (``patch_size_level0`` level-0 pixels → ``tile_size`` pixels, best pyramid
level + area resize) and passed to the encoder as ``(B, 3, P, P)`` float32 in [0, 1].

Example:
    >>> import numpy as np
    >>> from needlework.slides.reader import ArrayReader
    >>> from needlework.models.encoder_loading import build_tile_encoder
    >>> slide = ArrayReader(np.full((512, 512, 3), 200, np.uint8), mpp=0.5)
    >>> feats = embed_tiles(slide, np.array([[0, 0], [256, 256]]), 256, 64, build_tile_encoder("color_stats"))
    >>> feats.shape, feats.dtype
    ((2, 39), dtype('float32'))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from needlework.slides.reader import SlideReader, open_slide

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TileDataset(Dataset):
    """Tiles of one slide. ``slide`` is a path (opened lazily, once per worker process) or an open reader
    (only with ``num_workers=0``). Items: ``(tile (P, P, 3) uint8, index)``, channels last as read: a
    worker then copies each tile once, into the batch (:func:`embed_tiles` permutes the whole batch)."""

    def __init__(
        self,
        slide: str | Path | SlideReader,
        coords: np.ndarray,
        patch_size_level0: int,
        tile_size: int,
        reader: str = "auto",
    ):
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.patch_size_level0 = int(patch_size_level0)
        self.tile_size = int(tile_size)
        self.reader = reader
        self._slide: SlideReader | None = slide if isinstance(slide, SlideReader) else None
        self._path = None if isinstance(slide, SlideReader) else Path(slide)
        self._pid = os.getpid() if self._slide is not None else None

    def _handle(self) -> SlideReader:
        if self._slide is None or self._pid != os.getpid():
            if self._path is None:
                raise RuntimeError(
                    "an open SlideReader cannot be shared with worker processes; pass its path"
                )
            self._slide = open_slide(self._path, self.reader)
            self._pid = os.getpid()
        return self._slide

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.coords[i].tolist()
        ps0, p = self.patch_size_level0, self.tile_size
        tile = self._handle().read_region_at(x, y, ps0, ps0, p, p)
        # uint8 through the DataLoader (4× less to copy between processes); permuted and scaled to [0, 1]
        # per batch, on the encoder's device.
        return torch.from_numpy(np.ascontiguousarray(tile)), i


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@torch.no_grad()
def embed_tiles(
    slide: str | Path | SlideReader,
    coords: np.ndarray,
    patch_size_level0: int,
    tile_size: int,
    encoder: torch.nn.Module,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    device: str = "auto",
    reader: str = "auto",
    progress: Any = None,
) -> np.ndarray:
    """Embed the tiles of ``slide`` at ``coords`` (``(N, 2)`` level-0) → ``(N, D)`` float32 (input order).

    Args:
        slide: path or open reader (open readers need ``num_workers=0``).
        patch_size_level0: tile side in level-0 pixels; ``tile_size``: side given to the encoder.
        encoder: maps ``(B, 3, P, P)`` in [0, 1] to ``(B, D)``.
        batch_size, num_workers: DataLoader settings (workers open their own slide handle).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; features are stored as float32).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        progress: a tqdm-like object advanced by the number of tiles per batch (optional).
    """
    if isinstance(slide, SlideReader) and num_workers > 0:
        raise ValueError("pass the slide path (not an open reader) when num_workers > 0")
    dev = resolve_device(device)
    encoder = encoder.to(dev).eval()
    dataset = TileDataset(slide, coords, patch_size_level0, tile_size, reader)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    out = np.zeros((len(dataset), int(getattr(encoder, "embed_dim", 0)) or 0), np.float32)
    rows = []
    for tiles, idx in loader:
        # (B, P, P, 3) → (B, 3, P, P) as a view: the float copy keeps channels-last strides, which the
        # convolutions take as they are (no transposing copy per tile or per batch).
        batch = tiles.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        with _autocast(dev, precision):
            feats = encoder(batch)
        rows.append((idx.numpy(), feats.float().cpu().numpy()))
        if progress is not None:
            progress.update(len(idx))
    if rows:
        dim = rows[0][1].shape[1]
        out = np.zeros((len(dataset), dim), np.float32)
        for idx, feats in rows:
            out[idx] = feats
    return out
