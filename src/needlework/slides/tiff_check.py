"""What a TIFF file holds, read from its tags with tifffile: damage and pyramid levels.

Readers hide both: OpenSlide refuses a truncated file while tiffslide may open it and return blank or
garbled tiles for the missing bytes; OpenSlide reads an OME-TIFF's first image and ignores its SubIFD
pyramid. These checks let :func:`~needlework.slides.reader.open_slide` say so instead of producing
other tiles without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TIFF_EXTENSIONS = (".tif", ".tiff", ".svs", ".btf", ".qptiff", ".ndpi", ".scn", ".bif")


@dataclass(frozen=True)
class TiffLayout:
    """``levels``: pyramid levels of the first series; ``missing``: ``[(page, tiles past the end of the
    file, tiles)]``; ``needed``/``size``: bytes the tiles need / bytes the file has."""

    levels: int
    missing: list[tuple[str, int, int]]
    needed: int
    size: int

    @property
    def truncated(self) -> bool:
        return bool(self.missing)

    def damage(self) -> str:
        parts = ", ".join(f"{n} of {total} tiles of {page}" for page, n, total in self.missing)
        return (
            f"the file is truncated: {parts} lie past its end (it has {self.size:,} bytes, its tiles need "
            f"{self.needed:,}, {100 * self.size / max(self.needed, 1):.1f} %)"
        )


def inspect_tiff(path: str | Path) -> TiffLayout | None:
    """Layout of a TIFF-family file, or None when it is not one tifffile can parse (the readers decide)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        return None
    try:
        import tifffile
    except ImportError:
        return None
    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            pages = []
            for i, page in enumerate(tif.pages):
                pages.append((f"page {i}", page))
                for j, sub in enumerate(getattr(page, "pages", None) or []):
                    pages.append((f"page {i} SubIFD {j}", sub))
            levels = len(tif.series[0].levels) if tif.series else 0
            missing, needed = [], 0
            for name, page in pages:
                offsets = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.int64)
                counts = np.asarray(getattr(page, "databytecounts", ()), dtype=np.int64)
                if not len(offsets):
                    continue
                ends = np.where(counts > 0, offsets + counts, 0)
                needed = max(needed, int(ends.max()))
                past = int((ends > size).sum())
                if past:
                    missing.append((name, past, len(ends)))
    except Exception:  # tifffile cannot parse it: leave the verdict to the slide readers
        return None
    return TiffLayout(levels, missing, needed, size)
