"""File backends of :class:`~needlework.slides.slide_reader.SlideReader`: OpenSlide and tiffslide
(pure Python, the fallback), and the one OpenSlide tile cache a process shares."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from needlework.slides.slide_reader import SlideReader

__all__ = [
    "OPENSLIDE_CACHE_MB",
    "OpenSlideReader",
    "TiffSlideReader",
    "available_readers",
    "openslide_cache",
    "openslide_cache_mb",
]

#: capacity of the one OpenSlide tile cache a process shares between all its open slides (MiB; env
#: ``NEEDLEWORK_OPENSLIDE_CACHE_MB``). OpenSlide's default is a 32 MiB cache *per slide*: with the 32
#: handles a data worker keeps open that is up to 1 GiB a worker, and a whole-slide view read once fills a
#: slide's cache with tiles that are never read again. Neighbouring patch reads share tiles within a row
#: of patches, which a few MiB already hold.
OPENSLIDE_CACHE_MB = 8
_CACHE: tuple[int, Any] | None = None  # (pid, openslide.OpenSlideCache): a forked worker makes its own


def openslide_cache_mb() -> float:
    """The shared tile cache's size in MiB (``NEEDLEWORK_OPENSLIDE_CACHE_MB``, else
    :data:`OPENSLIDE_CACHE_MB`)."""
    raw = os.environ.get("NEEDLEWORK_OPENSLIDE_CACHE_MB", str(OPENSLIDE_CACHE_MB))
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(
            f"NEEDLEWORK_OPENSLIDE_CACHE_MB={raw!r}: give the tile cache size in MiB (a number >= 0)"
        )
    return mb


def openslide_cache() -> Any:
    """The process's shared ``openslide.OpenSlideCache`` (created on first use)."""
    global _CACHE
    if _CACHE is None or _CACHE[0] != os.getpid():
        import openslide

        _CACHE = (os.getpid(), openslide.OpenSlideCache(int(openslide_cache_mb() * 2**20)))
    return _CACHE[1]


class OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: str | Path, **kwargs: Any):
        super().__init__(path, **kwargs)
        import openslide

        self.backend_version = f"{openslide.__version__} (library {openslide.__library_version__})"
        self._slide = openslide.OpenSlide(str(path))
        try:
            cache = openslide_cache()
        except ValueError:  # a bad NEEDLEWORK_OPENSLIDE_CACHE_MB
            raise
        except Exception:  # OpenSlide before 4.0 has no shared caches: the slide keeps its own
            cache = None
        if cache is not None:
            self._slide.set_cache(cache)
        self.level_dimensions = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]

    @property
    def properties(self) -> Mapping[str, Any]:
        return self._slide.properties

    def _read_level(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        image = self._slide.read_region((x0, y0), level, (w, h))
        # Fully scanned, the usual case: Pillow's RGB conversion. Both tests and copies here are the cheapest
        # measured (the alpha band alone, not the RGBA array; np.array(image) is 3× slower than the copy).
        if np.asarray(image.getchannel("A")).min() == 255:
            return np.asarray(image.convert("RGB")).copy()  # writable, like every reader's output
        rgba = np.asarray(image)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # transparent = not scanned → background white
        return rgb

    def close(self) -> None:
        self._slide.close()


class TiffSlideReader(SlideReader):
    backend = "tiffslide"

    def __init__(self, path: str | Path, **kwargs: Any):
        super().__init__(path, **kwargs)
        import tiffslide

        self.backend_version = str(tiffslide.__version__)
        self._slide = tiffslide.TiffSlide(str(path))
        self.level_dimensions = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        # Fail now on unreadable pixel data rather than on the first tile.
        self._slide.read_region((0, 0), self.level_count - 1, (1, 1), as_array=True)

    @property
    def properties(self) -> Mapping[str, Any]:
        return self._slide.properties

    def _read_level(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        arr = np.asarray(self._slide.read_region((x0, y0), level, (w, h), as_array=True))
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


def available_readers() -> dict[str, str | None]:
    """``{reader: version or None if not importable}``."""
    out: dict[str, str | None] = {}
    try:
        import openslide

        out["openslide"] = f"{openslide.__version__} (library {openslide.__library_version__})"
    except Exception:  # ImportError, or OSError when the native library is missing
        out["openslide"] = None
    try:
        import tiffslide

        out["tiffslide"] = str(tiffslide.__version__)
    except Exception:
        out["tiffslide"] = None
    return out
