"""The slide reader interface: :class:`SlideReader` (level reads, reads at a µm/px, thumbnails) and
:class:`ArrayReader`, an in-memory image behind the same interface. The file backends (OpenSlide,
tiffslide) are in :mod:`needlework.slides.backends`; :func:`needlework.slides.reader.open_slide` opens a
file with the first that can.

Every reader returns RGB ``uint8`` arrays ``(H, W, 3)``; coordinates are level-0 pixels, top-left
``(x, y)``; areas outside the slide read as white (255).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from needlework.slides.mpp import MPPInfo, resolve_mpp

__all__ = ["ArrayReader", "SlideOpenError", "SlideReadError", "SlideReader", "slide_id_of"]


def slide_id_of(path: str | Path) -> str:
    """Slide id = file name without its extension (``a.ome.tif`` → ``a``); for a DICOM slide (a folder
    of ``.dcm`` files) the folder's name."""
    path = Path(path)
    name = path.name
    if name.lower().endswith(".dcm"):
        return path.parent.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


class SlideOpenError(RuntimeError):
    """No reader could open the slide."""


class SlideReadError(RuntimeError):
    """Pixels of an opened slide could not be read (truncated or corrupt file)."""


class SlideReader(ABC):
    """Common interface. Subclasses implement :meth:`_read_level` (in-bounds reads only)."""

    backend = "abstract"
    backend_version = ""
    max_read_pixels = 4096 * 4096  # larger whole-slide reads (thumbnails) are done in blocks
    copy_block = 1024  # side of the blocks a thumbnail that is a level as it is gets copied in

    def __init__(self, path: str | Path, mpp_override: float | None = None, allow_implausible: bool = False):
        self.path = Path(path)
        self.slide_id = slide_id_of(self.path)
        self._mpp_override = mpp_override
        self._allow_implausible = allow_implausible
        self._mpp_info: MPPInfo | None = None
        self._warned_upsample = False

    # --- backend hooks -------------------------------------------------------------------------
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    @property
    @abstractmethod
    def properties(self) -> Mapping[str, Any]: ...

    @abstractmethod
    def _read_level(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` at ``level``; ``(x0, y0)`` level-0 top-left, fully inside."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass

    # --- common API ----------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.level_dimensions[0]

    @property
    def mpp_info(self) -> MPPInfo:
        if self._mpp_info is None:
            self._mpp_info = resolve_mpp(
                self.properties, self.path.name, self._mpp_override, self._allow_implausible
            )
        return self._mpp_info

    @property
    def mpp(self) -> float:
        """Level-0 µm/px (raises :class:`~needlework.slides.mpp.MissingMPPError` when unknown)."""
        return self.mpp_info.mpp

    @property
    def magnification(self) -> float:
        return self.mpp_info.magnification

    def best_level(self, downsample: float) -> int:
        """Level with the largest downsample ≤ ``downsample`` (1 % tolerance); never a coarser one."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01 and ds >= self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``size=(w, h)`` pixels at ``level``, top-left ``location`` in level-0
        pixels; parts outside the slide are white."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path.name}: level {level} out of range (0..{self.level_count - 1})")
        x0, y0 = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"size must be positive, got {size}")
        try:
            return self._read_clipped(x0, y0, level, w, h)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path.name}: cannot read {w}x{h} pixels at level {level}, level-0 ({x0}, {y0}) with "
                f"{self.backend}: {type(exc).__name__}: {exc}. The file may be truncated or corrupt."
            ) from exc

    def _read_clipped(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # Clip to the level in level coordinates; pad the rest with white.
        lx, ly = math.floor(x0 / ds), math.floor(y0 / ds)
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + w, lw), min(ly + h, lh)
        if cx0 == lx and cy0 == ly and cx1 == lx + w and cy1 == ly + h:
            return self._read_level(x0, y0, level, w, h)
        out = np.full((h, w, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            x0c = x0 if cx0 == lx else round(cx0 * ds)
            y0c = y0 if cy0 == ly else round(cy0 * ds)
            out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = self._read_level(
                x0c, y0c, level, cx1 - cx0, cy1 - cy0
            )
        return out

    def read_region_at(
        self, x: int, y: int, w0: int, h0: int, out_w: int, out_h: int, resize: str = "box"
    ) -> np.ndarray:
        """Read the level-0 box ``(x, y, w0, h0)`` and return it as ``(out_h, out_w, 3)`` RGB uint8.

        Reads the level with the largest downsample ≤ the required one and resizes with an area
        filter: ``resize="box"`` (Pillow's box filter, the tiling default) or ``"area"`` (OpenCV
        ``INTER_AREA``, the patch reader's). Upsampling happens only when the slide
        is coarser than requested, with a warning once per slide.
        """
        if resize not in ("box", "area"):
            raise ValueError(f"resize must be 'box' or 'area', got {resize!r}")
        downsample = min(w0 / out_w, h0 / out_h)
        level = self.best_level(downsample)
        ds = self.level_downsamples[level]
        lw, lh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        region = self.read_region((x, y), level, (lw, lh))
        if (lw, lh) == (out_w, out_h):
            return region
        if (lw < out_w or lh < out_h) and not self._warned_upsample:
            self._warned_upsample = True
            warnings.warn(
                f"{self.path.name}: requested resolution is finer than the slide's level 0; upsampling",
                stacklevel=2,
            )
        if resize == "area":
            import cv2

            flag = cv2.INTER_AREA if lw >= out_w and lh >= out_h else cv2.INTER_LINEAR
            return cv2.resize(region, (out_w, out_h), interpolation=flag)
        resample = Image.Resampling.BOX if lw >= out_w else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(region).resize((out_w, out_h), resample))

    def thumbnail_at_mpp(
        self, mpp: float, max_side: int = 4096, resize: str = "box"
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Whole slide at about ``mpp`` µm/px (longest side ≤ ``max_side``).

        Returns the RGB array and its exact level-0 downsample ``(dx, dy)`` per axis
        (level-0 x = thumbnail x · dx). ``resize`` as in :meth:`read_region_at`.
        """
        return self.thumbnail_at_downsample(mpp / self.mpp, max_side, resize)

    def thumbnail_at_downsample(
        self, downsample: float, max_side: int = 4096, resize: str = "box"
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Whole slide downsampled by about ``downsample`` (see :meth:`thumbnail_at_mpp`)."""
        w0, h0 = self.dimensions
        downsample = max(downsample, max(w0, h0) / max_side, 1.0)
        tw, th = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        dx, dy = w0 / tw, h0 / th
        level = self.best_level(min(dx, dy))
        ds = self.level_downsamples[level]
        if ds == int(ds) and (round(w0 / ds), round(h0 / ds)) == (tw, th) and tw * th > self.copy_block**2:
            # The level is the thumbnail (no resize) and its pixels sit on whole level-0 pixels: copy it
            # block by block into the output, exactly, so that the backend's RGBA and RGB copies exist for
            # one block at a time and not for the whole view.
            thumb = np.empty((th, tw, 3), np.uint8)
            b, s = self.copy_block, int(ds)
            for ly in range(0, th, b):
                for lx in range(0, tw, b):
                    w, h = min(b, tw - lx), min(b, th - ly)
                    thumb[ly : ly + h, lx : lx + w] = self.read_region((lx * s, ly * s), level, (w, h))
            return thumb, (dx, dy)
        if (w0 / ds) * (h0 / ds) <= self.max_read_pixels:
            return self.read_region_at(0, 0, w0, h0, tw, th, resize), (dx, dy)
        # The level to read from is large (few pyramid levels): read it in blocks to bound memory.
        thumb = np.empty((th, tw, 3), np.uint8)
        step = max(1, int(math.sqrt(self.max_read_pixels) * ds / max(dx, dy)))  # output pixels per block
        for oy in range(0, th, step):
            for ox in range(0, tw, step):
                ox1, oy1 = min(ox + step, tw), min(oy + step, th)
                x0, y0, x1, y1 = round(ox * dx), round(oy * dy), round(ox1 * dx), round(oy1 * dy)
                thumb[oy:oy1, ox:ox1] = self.read_region_at(
                    x0, y0, x1 - x0, y1 - y0, ox1 - ox, oy1 - oy, resize
                )
        return thumb, (dx, dy)

    def describe(self) -> dict[str, Any]:
        """Metadata recorded in every artefact (reader name and version, sizes, levels)."""
        return {
            "reader": self.backend,
            "reader_version": self.backend_version,
            "level0_width": int(self.dimensions[0]),
            "level0_height": int(self.dimensions[1]),
            "level_count": self.level_count,
            "level_downsamples": [float(d) for d in self.level_downsamples],
        }

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArrayReader(SlideReader):
    """A single-level in-memory image (megapixel photos, remote sensing, tests) with an explicit ``mpp``
    (``None`` = unitless pixels treated as 1 µm/px)."""

    backend = "array"

    def __init__(self, image: np.ndarray, mpp: float | None = None, name: str = "array"):
        super().__init__(Path(name), mpp_override=mpp if mpp is not None else 1.0)
        if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        self._image = np.ascontiguousarray(image[..., :3])
        self.level_dimensions = [(image.shape[1], image.shape[0])]
        self.level_downsamples = [1.0]

    @property
    def properties(self) -> Mapping[str, Any]:
        return {}

    def _read_level(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        return self._image[y0 : y0 + h, x0 : x0 + w].copy()
