"""High-resolution patches of whole-slide images, read on demand at any µm/px (never a whole level).

A *raster* over a slide is a grid of pixels with a per-axis level-0 downsample ``(dx, dy)``: its pixel
``(x, y)`` covers the level-0 box ``[x·dx, (x+1)·dx) × [y·dy, (y+1)·dy)``. ``x_low`` (the slide at
``low_mpp``) and the virtual high-resolution image the selection models cut patches from (the slide at
``high_mpp``) are two rasters of the same slide; :func:`grid_to_level0` and :func:`level0_to_grid` map
positions between a raster and level 0 (exact inverses, float64). A patch at raster corner ``(x, y)``
of ``P × P`` pixels is read from the pyramid level nearest to ``dx`` (never coarser) and resized with
OpenCV ``INTER_AREA``; raster pixels outside the slide are zero, the contract of
:func:`needlework.ops.patches.extract_patches`.

:class:`SlidePatchReader` is picklable (a path and options): the slide opens lazily, once per process, so
it can be handed to DataLoader workers; patches of one call can be read by a thread pool.
:class:`SlidePixels` is the lazy ``x_high`` of a batch of slides: ATS, DPS and IPS call
``extract_patches(x_high, offsets, P)`` on it exactly as on an in-memory tensor.

Example:
    >>> grid_to_level0(np.array([[3.0, 2.0]]), (4.0, 4.0)).tolist()
    [[12.0, 8.0]]
    >>> level0_to_grid(np.array([[12.0, 8.0]]), (4.0, 4.0)).tolist()
    [[3.0, 2.0]]
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from needlework.slides.reader import SlideReader, open_slide

__all__ = ["SlidePatchReader", "SlidePixels", "cached_slide", "grid_to_level0", "level0_to_grid"]

_MAX_OPEN = 32  # open slides kept per process (file handles and OpenSlide caches)
_OPEN: OrderedDict[tuple[str, float | None, str], SlideReader] = OrderedDict()
_OPEN_PID = os.getpid()


def grid_to_level0(xy: Any, downsample: Sequence[float]) -> np.ndarray:
    """Level-0 position of raster position(s) ``xy`` ``(..., 2)`` = ``(x, y)``: ``(x·dx, y·dy)``.

    A pixel corner maps to a pixel corner (``x = 0`` is the slide's left edge); use ``x + 0.5`` for a
    pixel centre. Exact inverse: :func:`level0_to_grid`.
    """
    return np.asarray(xy, dtype=np.float64) * np.asarray(downsample, dtype=np.float64)


def level0_to_grid(xy0: Any, downsample: Sequence[float]) -> np.ndarray:
    """Raster position(s) of level-0 position(s) ``xy0`` ``(..., 2)``: ``(x0 / dx, y0 / dy)``."""
    return np.asarray(xy0, dtype=np.float64) / np.asarray(downsample, dtype=np.float64)


def cached_slide(path: str | Path, mpp_override: float | None = None, reader: str = "auto") -> SlideReader:
    """The slide at ``path``, opened once per process (handles inherited through ``fork`` are dropped)."""
    global _OPEN_PID
    if os.getpid() != _OPEN_PID:  # a forked worker: never share the parent's handles
        _OPEN.clear()
        _OPEN_PID = os.getpid()
    key = (str(path), mpp_override, reader)
    slide = _OPEN.get(key)
    if slide is None:
        slide = open_slide(path, reader=reader, mpp_override=mpp_override)
        _OPEN[key] = slide
        while len(_OPEN) > _MAX_OPEN:
            _OPEN.popitem(last=False)[1].close()
    else:
        _OPEN.move_to_end(key)
    return slide


class SlidePatchReader:
    """Patches of one slide at integer corners of a raster with level-0 downsample ``(dx, dy)``.

    Args:
        path: slide file.
        mpp_override: level-0 µm/px when the file has none (from an ``mpp_csv``).
        reader: ``"auto"`` (OpenSlide, tiffslide fallback), ``"openslide"`` or ``"tiffslide"``.
        num_threads: threads reading the patches of one call (1 = in the calling thread).

    Only the path and options are pickled; the slide opens on first use in each process.
    """

    def __init__(
        self, path: str | Path, mpp_override: float | None = None, reader: str = "auto", num_threads: int = 1
    ) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.path, self.mpp_override, self.reader = str(path), mpp_override, reader
        self.num_threads = int(num_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_pool_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool, self._pool_pid = None, 0

    def __repr__(self) -> str:
        return f"SlidePatchReader({Path(self.path).name!r})"

    @property
    def slide(self) -> SlideReader:
        return cached_slide(self.path, self.mpp_override, self.reader)

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if self.num_threads == 1 or len(items) < 2:
            return [fn(it) for it in items]
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="needlework-patches")
            self._pool_pid = os.getpid()
        return list(self._pool.map(fn, items))

    def read(self, corners: Any, size: int | Sequence[int], downsample: Sequence[float]) -> np.ndarray:
        """RGB uint8 ``(n, h, w, 3)`` patches of ``size`` (``P`` or ``(h, w)``) raster pixels.

        Args:
            corners: ``(n, 2)`` integer top-left ``(x, y)`` in raster pixels (may lie outside the slide).
            size: patch size in raster pixels.
            downsample: level-0 pixels per raster pixel ``(dx, dy)``.

        Raster pixels whose level-0 box is not inside the slide are 0; only the inside part of a patch
        is read, from the level nearest to the downsample, and area-resized.
        """
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
        slide = self.slide
        dx, dy = float(downsample[0]), float(downsample[1])
        w0, h0 = slide.dimensions
        # raster pixels wholly inside the slide (1e-6: dx = W0 / W must give exactly W pixels)
        inside_w, inside_h = int(np.floor(w0 / dx + 1e-6)), int(np.floor(h0 / dy + 1e-6))
        out = np.zeros((len(corners), h, w, 3), np.uint8)

        def one(i: int) -> None:
            x, y = int(corners[i, 0]), int(corners[i, 1])
            cx0, cy0 = max(x, 0), max(y, 0)
            cx1, cy1 = min(x + w, inside_w), min(y + h, inside_h)
            if cx1 <= cx0 or cy1 <= cy0:
                return
            lx0, ly0 = round(cx0 * dx), round(cy0 * dy)
            lx1, ly1 = min(round(cx1 * dx), w0), min(round(cy1 * dy), h0)
            region = slide.read_region_at(
                lx0, ly0, max(lx1 - lx0, 1), max(ly1 - ly0, 1), cx1 - cx0, cy1 - cy0, resize="area"
            )
            out[i, cy0 - y : cy1 - y, cx0 - x : cx1 - x] = region

        self._map(one, list(range(len(corners))))
        return out

    def read_level0(self, coords0: Any, size0: int, out_size: int, resize: str = "box") -> np.ndarray:
        """RGB uint8 ``(n, out_size, out_size, 3)`` tiles of the level-0 boxes ``(x, y, size0, size0)``
        at level-0 top-left ``coords0`` ``(n, 2)``, read as ``needlework slides embed`` reads them
        (:meth:`~needlework.slides.reader.SlideReader.read_region_at`, box filter by default), so an
        encoder sees the same pixels here as when the tiles were embedded."""
        coords0 = np.asarray(coords0, dtype=np.int64).reshape(-1, 2)
        slide = self.slide
        out = np.zeros((len(coords0), out_size, out_size, 3), np.uint8)

        def one(i: int) -> None:
            x, y = int(coords0[i, 0]), int(coords0[i, 1])
            out[i] = slide.read_region_at(x, y, size0, size0, out_size, out_size, resize=resize)

        self._map(one, list(range(len(coords0))))
        return out


class SlidePixels:
    """Lazy high-resolution image of ``B`` slides, ``shape`` ``(B, 3, H, W)`` float32 in [0, 1].

    Raster pixel ``(x, y)`` of slide ``b`` covers level 0 from ``(x·dx_b, y·dy_b)``; pixels outside
    slide ``b`` are 0. :meth:`read_patches` is what :func:`~needlework.ops.patches.extract_patches`
    calls, so models written for an in-memory ``x_high`` tensor take it unchanged.

    Args:
        readers: one :class:`SlidePatchReader` per slide.
        downsamples: ``(dx, dy)`` per slide, level-0 pixels per raster pixel.
        size: raster ``(H, W)`` shared by the batch (slides smaller than it are zero-padded).
        device: where the patches go (Lightning moves the batch with :meth:`to`).
    """

    dtype = torch.float32
    requires_grad = False

    def __init__(
        self,
        readers: Sequence[SlidePatchReader],
        downsamples: Sequence[Sequence[float]],
        size: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        if len(readers) != len(downsamples) or not readers:
            raise ValueError(f"need one downsample per reader, got {len(readers)} and {len(downsamples)}")
        self.readers = list(readers)
        self.downsamples = [(float(d[0]), float(d[1])) for d in downsamples]
        self.size = (int(size[0]), int(size[1]))
        self.device = torch.device(device)
        self.low: tuple[list[tuple[float, float]], tuple[int, int], float] | None = None

    @classmethod
    def from_low(
        cls,
        readers: Sequence[SlidePatchReader],
        low_downsamples: Sequence[Sequence[float]],
        low_size: Sequence[int],
        ratio: float,
    ) -> SlidePixels:
        """The high-resolution raster matching a low-resolution one ``ratio`` times coarser.

        The low raster of ``low_size`` ``(h, w)`` (level-0 downsample ``(dx, dy)`` per slide) becomes
        ``(H, W) = (round(h·ratio), round(w·ratio))`` with downsample ``(w·dx / W, h·dy / H)``, so a
        position ``p`` on the low raster and ``p · (W / w, H / h)`` on the high one (the mapping of
        ATS, DPS and IPS) land on the same level-0 point, exactly.
        """
        h, w = int(low_size[0]), int(low_size[1])
        big_h, big_w = max(1, round(h * ratio)), max(1, round(w * ratio))
        high = [(w * float(d[0]) / big_w, h * float(d[1]) / big_h) for d in low_downsamples]
        out = cls(readers, high, (big_h, big_w))
        out.low = ([(float(d[0]), float(d[1])) for d in low_downsamples], (h, w), float(ratio))
        return out

    @classmethod
    def cat(cls, items: Sequence[SlidePixels], low_size: Sequence[int] | None = None) -> SlidePixels:
        """One batch of several (built with :meth:`from_low`, same ratio) on a common low canvas
        ``low_size`` (default: the largest), the high canvas following it."""
        if not items or any(it.low is None for it in items):
            raise ValueError("SlidePixels.cat needs items made by SlidePixels.from_low")
        ratios = {it.low[2] for it in items}  # type: ignore[index]
        if len(ratios) != 1:
            raise ValueError(f"cannot batch slides viewed at different low/high ratios {sorted(ratios)}")
        if low_size is None:
            low_size = (max(it.low[1][0] for it in items), max(it.low[1][1] for it in items))  # type: ignore[index]
        readers = [r for it in items for r in it.readers]
        lows = [d for it in items for d in it.low[0]]  # type: ignore[index]
        return cls.from_low(readers, lows, low_size, ratios.pop()).to(items[0].device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.readers), 3, *self.size))

    def dim(self) -> int:
        return 4

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.readers)

    def __repr__(self) -> str:
        names = [Path(r.path).name for r in self.readers]
        return f"SlidePixels({names}, size={self.size}, downsamples={self.downsamples})"

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> SlidePixels:
        out = SlidePixels(self.readers, self.downsamples, self.size, device)
        out.low = self.low
        return out

    def to_level0(self, xy: torch.Tensor | np.ndarray) -> np.ndarray:
        """Level-0 positions ``(B, n, 2)`` float64 of raster positions ``xy`` ``(B, n, 2)``."""
        xy = xy.detach().cpu().numpy() if isinstance(xy, torch.Tensor) else np.asarray(xy)
        return np.stack([grid_to_level0(xy[b], self.downsamples[b]) for b in range(len(self))])

    def read_patches(self, offsets: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
        """Patches ``(B, n, 3, h, w)`` float32 at integer top-left ``offsets (B, n, 2)`` ``(x, y)``."""
        if offsets.dim() != 3 or offsets.shape[0] != len(self) or offsets.shape[2] != 2:
            raise ValueError(f"offsets must be ({len(self)}, n, 2), got {tuple(offsets.shape)}")
        corners = offsets.detach().cpu().numpy()
        patches = np.stack(
            [r.read(corners[b], size, self.downsamples[b]) for b, r in enumerate(self.readers)]
        )  # (B, n, h, w, 3) uint8
        out = torch.from_numpy(patches).permute(0, 1, 4, 2, 3).to(self.device, torch.float32)
        return out.div_(255.0)
