"""Slide readers: OpenSlide, tiffslide (fallback) and an in-memory array, behind one interface.

Every reader returns RGB ``uint8`` arrays ``(H, W, 3)``; coordinates are level-0 pixels, top-left
``(x, y)``; areas outside the slide read as white (255). Users ask for resolution in µm/px or
magnification, never pyramid levels: :meth:`SlideReader.read_region_at` picks the level and resizes.

Example:
    >>> import numpy as np
    >>> slide = ArrayReader(np.zeros((64, 96, 3), np.uint8), mpp=0.5)
    >>> slide.dimensions, slide.read_region_at(0, 0, 32, 32, 16, 16).shape
    ((96, 64), (16, 16, 3))
"""

from __future__ import annotations

import warnings
from pathlib import Path

from needlework.slides.backends import OpenSlideReader, TiffSlideReader, available_readers, openslide_cache_mb
from needlework.slides.scan import SLIDE_EXTENSIONS, scan_slides
from needlework.slides.slide_reader import (
    ArrayReader,
    SlideOpenError,
    SlideReader,
    SlideReadError,
    slide_id_of,
)
from needlework.slides.tiff_check import inspect_tiff

__all__ = [
    "READERS",
    "ArrayReader",
    "OpenSlideReader",
    "SlideOpenError",
    "SlideReadError",
    "SlideReader",
    "TiffSlideReader",
    "available_readers",
    "list_slides",
    "open_slide",
    "slide_id_of",
]

READERS = ("auto", "openslide", "tiffslide")


def list_slides(folder: str | Path, extensions: tuple[str, ...] = SLIDE_EXTENSIONS) -> list[Path]:
    """Slides in ``folder`` (not recursive; DICOM: one sub-folder per slide), sorted by name. The files
    that are not read, and why: :func:`~needlework.slides.scan.scan_slides`."""
    return scan_slides(folder, extensions)[0]


def open_slide(
    path: str | Path,
    reader: str = "auto",
    mpp_override: float | None = None,
    allow_implausible: bool = False,
) -> SlideReader:
    """Open a slide with OpenSlide, falling back to tiffslide (``reader="auto"``), or with the named one.

    Raises:
        FileNotFoundError: no such file.
        SlideOpenError: no reader can open it (message lists each reader's error).
    """
    path = Path(path)
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    if not path.is_file():
        raise FileNotFoundError(f"slide not found: {path}")
    openslide_cache_mb()  # a bad setting is named as such, not blamed on the file
    layout = inspect_tiff(path)
    if layout is not None and layout.truncated:
        # tiffslide may open such a file and return blank tiles for the missing bytes: refuse it.
        raise SlideOpenError(
            f"cannot use slide {path}: {layout.damage()}. Copy the file again from its source."
        )
    classes = {"openslide": OpenSlideReader, "tiffslide": TiffSlideReader}
    order = ["openslide", "tiffslide"] if reader == "auto" else [reader]
    errors = []
    for name in order:
        try:
            slide = classes[name](path, mpp_override=mpp_override, allow_implausible=allow_implausible)
        except ImportError as exc:
            errors.append(f"{name}: not installed ({exc}); pip install 'needlework[{name}]'")
            continue
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if (
            reader == "auto"
            and name == "openslide"
            and layout is not None
            and layout.levels > slide.level_count
        ):
            # An OME-TIFF SubIFD pyramid: OpenSlide sees only the first image.
            slide.close()
            errors.append(
                f"openslide sees {slide.level_count} pyramid level(s) of the {layout.levels} in the file "
                "(an OME-TIFF SubIFD pyramid)"
            )
            continue
        if errors:
            refused = any("pyramid level" not in e for e in errors)
            warnings.warn(
                f"{path.name}: read with {name}, not openslide: "
                + "; ".join(errors)
                + (". OpenSlide refused the file: check that it is complete and intact" if refused else ""),
                stacklevel=2,
            )
        return slide
    raise SlideOpenError(
        f"cannot open slide {path}: "
        + "; ".join(errors)
        + ". Is the file complete and in a supported format?"
    )
