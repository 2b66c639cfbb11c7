"""Which files of a slide folder are slides, and why the others are not read.

Slides are the files with a slide extension, plus DICOM WSI: one sub-folder of ``.dcm`` files per
slide (the layout OpenSlide reads: it opens one file and finds the other instances of the series in the
same folder), read when the OpenSlide library is version 4 or newer. Everything else in the folder is
listed with the reason it is not read, so no file is skipped silently.
"""

from __future__ import annotations

from pathlib import Path

from needlework.errors import InputNotFoundError

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".btf",
    ".qptiff",
)  # fmt: skip
# Files that sit next to slides by design (MIRAX data folders hold .dat/.ini; labels, overrides).
COMPANION_EXTENSIONS = (".csv", ".json", ".geojson", ".md", ".txt", ".yaml", ".yml")


def openslide_reads_dicom() -> tuple[bool, str]:
    """(whether the installed OpenSlide library reads DICOM WSI, its version or the import error)."""
    try:
        import openslide
    except Exception as exc:  # ImportError, or OSError when the native library is missing
        return False, f"openslide not usable ({type(exc).__name__}: {exc})"
    version = str(getattr(openslide, "__library_version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    return major >= 4, version


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")


def scan_slides(
    folder: str | Path, extensions: tuple[str, ...] = SLIDE_EXTENSIONS
) -> tuple[list[Path], list[dict[str, str]]]:
    """Slides of ``folder`` (not recursive, sorted by name) and ``[{"path", "reason"}]`` for the rest.

    A DICOM slide is returned as the first ``.dcm`` file of its sub-folder; its slide id is the folder's
    name (:func:`~needlework.slides.reader.slide_id_of`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(
            f"slide folder not found: {folder}; check --slides (a folder of slides or a slide file)"
        )
    slides: list[Path] = []
    skipped: list[dict[str, str]] = []
    dicom_ok, version = openslide_reads_dicom()
    loose_dicom = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            dcm = _dicom_files(p)
            if not dcm:
                if not (folder / f"{p.name}.mrxs").is_file():  # a MIRAX slide's data folder
                    skipped.append({"path": str(p), "reason": "folder without .dcm files (not searched)"})
            elif dicom_ok:
                slides.append(dcm[0])
            else:
                skipped.append(
                    {
                        "path": str(p),
                        "reason": f"DICOM slide ({len(dcm)} .dcm files): reading DICOM needs the OpenSlide "
                        f"library 4 or newer, found {version} (pip install -U openslide-bin)",
                    }
                )
        elif p.suffix.lower() in extensions:
            slides.append(p)
        elif p.suffix.lower() == ".dcm":
            loose_dicom.append(p)
        elif p.suffix.lower() not in COMPANION_EXTENSIONS:
            skipped.append({"path": str(p), "reason": f"not a slide file extension ({p.suffix or 'none'})"})
    for p in loose_dicom:
        skipped.append(
            {
                "path": str(p),
                "reason": "a DICOM file outside a slide folder: put the .dcm files of each slide in a "
                f"folder of their own, {folder}/<slide_id>/",
            }
        )
    return slides, skipped
