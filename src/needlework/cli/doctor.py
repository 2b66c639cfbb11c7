"""``needlework doctor``: check the environment, slide readers, slides' MPP and the output disk.

Each check is ``{"name", "status": "ok" | "warn" | "fail", "detail"}``; the exit status is 1 when any
check fails (no slide reader, a slide that no reader opens or without MPP, an unwritable output folder,
less than ``--min-free-gb`` free).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

OPTIONAL = (
    "openslide",
    "tiffslide",
    "ray",
    "timm",
    "torchvision",
    "transformers",
    "spconv",
    "lightning",
    "torchmetrics",
    "h5py",
    "skimage",
    "sklearn",
    "tqdm",
)


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"name": name, "status": status, "detail": detail}


def _module_version(name: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # ImportError, or errors raised while importing (torchvision on CPU torch)
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return True, str(getattr(mod, "__version__", "?"))


def environment_checks() -> list[dict[str, str]]:
    import torch

    checks = [
        _check("python", "ok", f"{platform.python_version()} ({sys.executable})"),
        _check(
            "torch",
            "ok",
            f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
            f"{torch.get_num_threads()} threads",
        ),
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(_check("gpus", "ok", ", ".join(names)))
    for name in OPTIONAL:
        ok, detail = _module_version(name)
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
    from needlework.slides.jobs import make_tasks
    from needlework.slides.reader import open_slide

    try:
        tasks, unknown = make_tasks(slides_dir, mpp_csv)
    except Exception as exc:
        return [_check("slides", "fail", f"{type(exc).__name__}: {exc}")]
    checks = []
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
    from needlework.models.encoder_loading import LOCAL_CKPTS_ENV, local_checkpoints

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
    slides_dir: str | None = None,
    out_dir: str = ".",
    mpp_csv: str | None = None,
    reader: str = "auto",
    min_free_gb: float = 1.0,
    limit: int | None = None,
) -> list[dict[str, str]]:
    checks = environment_checks() + disk_check(out_dir, min_free_gb) + encoder_checks()
    if slides_dir:
        checks += slide_checks(slides_dir, mpp_csv, reader, limit)
    return checks


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="needlework doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "slides", nargs="?", help="optional folder of slides to check (opens each, resolves MPP)"
    )
    parser.add_argument("--out", default=".", help="output folder to check for write access and free space")
    parser.add_argument("--mpp-csv", help="MPP override CSV (columns wsi,mpp or slide_id,mpp)")
    parser.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"])
    parser.add_argument("--min-free-gb", type=float, default=1.0)
    parser.add_argument("--limit", type=int, help="check at most this many slides")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    args = parser.parse_args(argv)
    checks = run_doctor(args.slides, args.out, args.mpp_csv, args.reader, args.min_free_gb, args.limit)
    failed = [c for c in checks if c["status"] == "fail"]
    if args.json:
        report: dict[str, Any] = {"ok": not failed, "checks": checks}
        print(json.dumps(report, indent=2))
    else:
        marks = {"ok": "  ok ", "warn": " warn", "fail": " FAIL"}
        for c in checks:
            print(f"{marks[c['status']]}  {c['name']}: {c['detail']}")
        print(f"\n{len(failed)} failure(s)" if failed else "\nall hard checks passed")
    return 1 if failed else 0
