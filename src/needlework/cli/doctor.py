"""``needlework doctor``: check the environment, slide readers, slides' MPP and the output disk.

Each check is ``{"name", "status": "ok" | "warn" | "fail", "detail"}``; the exit status is 1 when any
check fails (no slide reader, a slide that no reader opens or without MPP, an unwritable output folder,
less than ``--min_free_gb`` free, a torch that does not load). The slide stack (readers, h5py, OpenCV) is
imported; torch is probed in a child process; the heavy optional packages (lightning, timm, transformers
...) are only looked up, not imported, unless ``--import_extras true``.

    needlework doctor --slides runs/cohort/slides --mpp_csv runs/cohort/mpp_overrides.csv --json true
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

# imported to check them: what tiling and reading slides need
IMPORTED = ("openslide", "tiffslide", "h5py", "cv2", "tqdm")
# looked up (installed version) without importing them: seconds each for lightning, transformers, timm
LOOKED_UP = (
    "ray",
    "timm",
    "torchvision",
    "transformers",
    "spconv",
    "lightning",
    "torchmetrics",
    "skimage",
    "sklearn",
)


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"name": name, "status": status, "detail": detail}


def _module_version(name: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # ImportError, or errors raised while importing (torchvision on CPU torch)
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return True, str(getattr(mod, "__version__", "?"))


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _installed_version(name: str) -> tuple[bool, str]:
    """Whether module ``name`` is installed and its distribution's version, without importing it."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return False, "ModuleNotFoundError: not installed"
    dists = _distributions().get(name, [])
    for dist in dists:
        try:
            return True, f"{importlib.metadata.version(dist)} (installed; not imported)"
        except importlib.metadata.PackageNotFoundError:
            continue
    return True, "? (installed; not imported)"


_TORCH_PROBE = """
import json, torch
cuda = torch.cuda.is_available()
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
threads = torch.get_num_threads()
print(json.dumps({"version": torch.__version__, "cuda": cuda, "threads": threads, "gpus": gpus}))
"""


def torch_checks(timeout: float = 300.0) -> list[dict[str, str]]:
    """torch's version, build and GPUs, probed in a child process: a torch that crashes or hangs while
    loading its CUDA libraries is reported instead of taking the doctor down, and this process stays
    free of torch."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return [_check("torch", "fail", f"`import torch` did not finish within {timeout:g} s")]
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]
        return [_check("torch", "fail", f"`import torch` failed: {tail}")]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    checks = [
        _check("torch", "ok", f"{info['version']}, CUDA available: {info['cuda']}, {info['threads']} threads")
    ]
    if info["gpus"]:
        checks.append(_check("gpus", "ok", ", ".join(info["gpus"])))
    return checks


def environment_checks(import_extras: bool = False) -> list[dict[str, str]]:
    checks = [_check("python", "ok", f"{platform.python_version()} ({sys.executable})"), *torch_checks()]
    for name in IMPORTED + LOOKED_UP:
        ok, detail = _module_version(name) if import_extras or name in IMPORTED else _installed_version(name)
        checks.append(
            _check(f"extra:{name}", "ok" if ok else "warn", detail if ok else f"not usable ({detail})")
        )
    from needlework.slides.reader import available_readers

    readers = available_readers()
    usable = [k for k, v in readers.items() if v]
    checks.append(
        _check(
            "slide readers",
            "ok" if usable else "fail",
            ", ".join(f"{k} {v}" for k, v in readers.items() if v)
            or "neither openslide nor tiffslide imports: pip install 'needlework[slides]'",
        )
    )
    return checks


def disk_check(out_dir: str | Path, min_free_gb: float = 1.0) -> list[dict[str, str]]:
    out = Path(out_dir)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    checks = []
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".needlework_doctor"):
            pass
        checks.append(_check("output writable", "ok", str(out)))
    except OSError as exc:
        checks.append(_check("output writable", "fail", f"{out}: {exc}"))
    free = shutil.disk_usage(probe).free / 1e9
    status = "fail" if free < min_free_gb else "warn" if free < 10 * min_free_gb else "ok"
    checks.append(_check("free space", status, f"{free:.1f} GB free at {probe}"))
    return checks


def slide_checks(
    slides_dir: str | Path, mpp_csv: str | Path | None = None, reader: str = "auto", limit: int | None = None
) -> list[dict[str, str]]:
    """Open every slide, resolve its MPP and read one tile."""
    from needlework.slides.reader import open_slide
    from needlework.slides.stage_runner import make_tasks

    try:
        tasks, unknown = make_tasks(slides_dir, mpp_csv)
    except Exception as exc:
        return [_check("slides", "fail", f"{type(exc).__name__}: {exc}")]
    from needlework.slides.scan import openslide_reads_dicom, scan_slides

    checks = [_check("not read", "warn", f"{f['path']}: {f['reason']}") for f in scan_slides(slides_dir)[1]]
    dicom, version = openslide_reads_dicom()
    checks.append(
        _check(
            "dicom",
            "ok" if dicom else "warn",
            f"OpenSlide library {version}: DICOM WSI {'readable' if dicom else 'not readable'}",
        )
    )
    if unknown:
        checks.append(_check("mpp overrides", "warn", f"entries matching no slide: {unknown}"))
    for task in tasks[:limit]:
        try:
            with open_slide(task.slide_path, reader, task.mpp_override) as slide:
                info = slide.mpp_info
                slide.read_region((0, 0), 0, (16, 16))
                detail = (
                    f"{slide.backend}, {slide.dimensions[0]}x{slide.dimensions[1]}, "
                    f"{slide.level_count} levels, "
                    f"{info.mpp:.4g} µm/px ({info.source}), {info.magnification:g}x"
                )
            checks.append(_check(f"slide:{task.slide_id}", "ok", detail))
        except Exception as exc:
            checks.append(_check(f"slide:{task.slide_id}", "fail", f"{type(exc).__name__}: {exc}"))
    return checks


def encoder_checks() -> list[dict[str, str]]:
    from needlework.io.local_checkpoints import LOCAL_CKPTS_ENV, local_checkpoints

    if not os.environ.get(LOCAL_CKPTS_ENV):
        return [
            _check(
                "local encoder weights", "ok", f"no registry (set {LOCAL_CKPTS_ENV} to a JSON name → path)"
            )
        ]
    try:
        ckpts = local_checkpoints()
    except Exception as exc:
        return [_check("local encoder weights", "fail", str(exc))]
    return [_check(f"weights:{name}", "ok" if Path(p).is_file() else "fail", p) for name, p in ckpts.items()]


def run_doctor(
    slides: str | None = None,
    out_dir: str = ".",
    mpp_csv: str | None = None,
    reader: Literal["auto", "openslide", "tiffslide"] = "auto",
    min_free_gb: float = 1.0,
    limit: int | None = None,
    import_extras: bool = False,
) -> list[dict[str, str]]:
    """Run the checks; returns them (``{"name", "status", "detail"}``).

    Args:
        slides: folder of slides to check (opens each, resolves its MPP, reads a tile).
        out_dir: output folder to check for write access and free space.
        mpp_csv: per-slide MPP override CSV (columns ``wsi,mpp`` or ``slide_id,mpp``).
        reader: slide reader (``auto``: OpenSlide, then tiffslide).
        min_free_gb: fail below this much free space in ``out_dir``.
        limit: check at most this many slides.
        import_extras: import every optional package to check that it loads (slow), instead of looking
            up its installed version.
    """
    checks = environment_checks(import_extras) + disk_check(out_dir, min_free_gb) + encoder_checks()
    if slides:
        checks += slide_checks(slides, mpp_csv, reader, limit)
    return checks


def main(argv: list[str], prog: str = "needlework doctor") -> int:
    from needlework.cli._parsing import add_group, new_parser, parse

    parser = new_parser(prog, __doc__ or "")
    add_group("checks (run_doctor)", parser.add_function_arguments, run_doctor, None)
    parser.add_argument("--json", type=bool, default=False, help="print a JSON report")
    cfg = parse(parser, argv)
    checks = run_doctor(**{k: v for k, v in vars(cfg).items() if k not in ("config", "json")})
    failed = [c for c in checks if c["status"] == "fail"]
    if cfg.json:
        report: dict[str, Any] = {"ok": not failed, "checks": checks}
        print(json.dumps(report, indent=2))
    else:
        marks = {"ok": "  ok ", "warn": " warn", "fail": " FAIL"}
        for c in checks:
            print(f"{marks[c['status']]}  {c['name']}: {c['detail']}")
        print(f"\n{len(failed)} failure(s)" if failed else "\nall hard checks passed")
    return 1 if failed else 0
