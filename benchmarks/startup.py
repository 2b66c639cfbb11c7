"""Start-up cost of the command line: a cold ``needlework slides tile`` of one 16,384² slide.

The reference point is CLAM's ``create_patches_fp.py`` (segmentation + patching) on a slide of the same
size: 2.8 s, against 8.2 s for needlework before the import clean-up (issue #12, item 6) — mostly
imports (torch through the embed job, scikit-image and scipy through the tissue contours).

What is measured, each in a fresh Python process (``sys.executable``; ``.pyc`` files written and the OS
file cache warm by one unmeasured run first, as after ``pip install`` and on a second run in a shell):

* ``tile_cold_s``: wall time of ``python -m needlework slides tile`` on the slide into a new job folder
  (nothing to resume), median of ``--repeats`` runs;
* ``imports``: wall time of ``python -c "<imports of a command>"`` (median), minus an empty
  ``python -c pass`` for the interpreter itself, and the heavy packages each one loads; the heaviest
  imports of the tiling command from ``python -X importtime``;
* ``tile_help_s``: ``needlework slides tile --help`` (builds the parser from the job dataclasses).

The slide is a JPEG-tiled pyramidal BigTIFF (256² tiles, q90, 0.25 µm/px, levels as pages, like
``needlework.slides.synthetic``) of pink textured tissue ellipses on a white background, written tile by
tile (little memory) once into ``$NEEDLEWORK_CACHE/bench_startup/`` (default ``~/.cache/needlework``).

    PYTHONPATH=src python benchmarks/startup.py            # ≈ 1 min the first time (builds the slide)
    PYTHONPATH=src python benchmarks/startup.py --quick    # 2,048² slide, 1 repeat: checks the script

Writes ``benchmarks/results/startup.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLAM_TILE_S = 2.8  # CLAM create_patches_fp.py on the same 16,384² slide (issue #12)
BEFORE_TILE_S = 8.2  # needlework before this change, same slide (issue #12)
HEAVY = ("torch", "lightning", "matplotlib", "scipy", "skimage")
TILE = 256
MPP = 0.25
# what each command imports before it runs (timed in a fresh interpreter, minus the interpreter's start)
IMPORTS = {
    "cli": "import needlework.cli",
    "slides_cli": "import needlework.cli.slides",
    "tile_command": "import needlework.cli.slides as s; s.tile_parser()",  # + the tiling job, the parser
    "embed_command": "import needlework.cli.slides as s; s.embed_parser()",
    "doctor_command": "import needlework.cli.doctor",
}


def cache_dir() -> Path:
    return Path(os.environ.get("NEEDLEWORK_CACHE", Path.home() / ".cache" / "needlework")) / "bench_startup"


def _texture(level: int) -> np.ndarray:
    """A 512² periodic tissue texture at pyramid ``level`` (2×2 means of the level above)."""
    rng = np.random.default_rng(12)
    size = 512
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(xx * 2 * np.pi / 64) * np.cos(yy * 2 * np.pi / 48)
    base += 0.25 * rng.random((size, size), dtype=np.float32)
    rgb = np.stack([215 - 60 * base, 120 - 70 * base, 175 - 50 * base], axis=2)
    tex = rgb
    for _ in range(level):
        h, w = tex.shape[0] // 2, tex.shape[1] // 2
        tex = tex[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
    return np.clip(tex, 0, 255).astype(np.uint8)


def _ellipses(side: int) -> list[tuple[float, float, float, float]]:
    """Tissue pieces ``(cx, cy, rx, ry)`` in level-0 pixels (≈ 35 % of the slide)."""
    s = float(side)
    return [(0.3 * s, 0.35 * s, 0.22 * s, 0.27 * s), (0.7 * s, 0.62 * s, 0.25 * s, 0.2 * s),
            (0.32 * s, 0.82 * s, 0.1 * s, 0.08 * s)]


def _tiles(side: int, level: int):
    """Row-major 256² RGB tiles of pyramid ``level`` (downsample ``2**level``)."""
    ds = 2**level
    n = -(-(side // ds) // TILE)
    tex = _texture(min(level, 9))
    period = tex.shape[0]
    rng = np.random.default_rng(level)
    noise = (241 + rng.integers(-2, 3, size=(TILE, TILE, 1))).astype(np.uint8)
    pieces = _ellipses(side)
    for ty in range(n):
        for tx in range(n):
            ys = (ty * TILE + np.arange(TILE) + 0.5) * ds
            xs = (tx * TILE + np.arange(TILE) + 0.5) * ds
            inside = np.zeros((TILE, TILE), bool)
            for cx, cy, rx, ry in pieces:
                inside |= ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2 <= 1
            r = (ty * TILE + np.arange(TILE)) % period
            c = (tx * TILE + np.arange(TILE)) % period
            yield np.where(inside[..., None], tex[r][:, c], noise)


def build_slide(side: int, path: Path) -> float:
    """Write the pyramidal BigTIFF (levels down to ≤ 512 px); returns the seconds it took."""
    import tifffile

    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        level = 0
        while level == 0 or side // 2 ** (level - 1) > 512:
            s = side // 2**level
            per_cm = 1e4 / (MPP * 2**level)
            tif.write(
                _tiles(side, level),
                shape=(s, s, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                subfiletype=1 if level else 0,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
            )
            level += 1
    os.replace(tmp, path)
    return time.perf_counter() - t0


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    # .pyc files as after `pip install` (which compiles them): without them every run recompiles the
    # package's sources, which measures the environment rather than the command
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _wall(cmd: list[str], repeats: int, before=None) -> list[float]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return times


def loaded_heavy(code: str) -> list[str]:
    """The heavy packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    check = f"{code}\nimport sys; print('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", check], env=_env(), capture_output=True, text=True, check=True
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("LOADED:")][-1]
    return [m for m in line[len("LOADED:"):].split(",") if m]


def importtime_top(code: str, n: int = 10) -> list[dict]:
    """The ``n`` packages with the largest import time of ``code`` (``-X importtime``: the self times of a
    package's modules summed, so nested imports count for the package they belong to)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=_env(), capture_output=True, text=True, check=True,
    )
    per_pkg: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            pkg = m.group(3).split(".")[0]
            per_pkg[pkg] = per_pkg.get(pkg, 0) + int(m.group(1))
    top = sorted(per_pkg.items(), key=lambda kv: -kv[1])[:n]
    return [{"package": k, "self_ms": round(v / 1000, 1)} for k, v in top]


def _median(cmd: list[str], repeats: int, before=None) -> tuple[float, list[float]]:
    times = _wall(cmd, repeats, before)
    return round(statistics.median(times), 3), [round(t, 3) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=16384, help="slide side in level-0 pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,048² slide, 1 repeat: checks the script")
    parser.add_argument("--out", default="benchmarks/results/startup.json")
    args = parser.parse_args()
    size, repeats = (2048, 1) if args.quick else (args.size, args.repeats)

    slide_dir = cache_dir() / f"s{size}"
    slide = slide_dir / "slide.tif"
    build_s = None
    if not slide.is_file():
        print(f"building {slide} ...", flush=True)
        build_s = round(build_slide(size, slide), 1)
    py = sys.executable
    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "omp_num_threads": _env()["OMP_NUM_THREADS"],
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "slide": {
            "size": size,
            "mpp": MPP,
            "tile": TILE,
            "format": "BigTIFF JPEG q90, pages",
            "bytes": slide.stat().st_size,
            "build_s": build_s,
        },
        "repeats": repeats,
    }
    # one unmeasured run of everything first: writes the .pyc files, warms the OS file cache
    _wall([py, "-c", "; ".join(IMPORTS.values())], 1)
    base, _ = _median([py, "-c", "pass"], max(repeats, 3))
    imports = {}
    for name, code in IMPORTS.items():
        t, _ = _median([py, "-c", code], max(repeats, 3))
        imports[name] = {"code": code, "s": round(t - base, 3), "loads_heavy": loaded_heavy(code)}
    results["python_startup_s"] = base
    results["imports"] = imports
    top = importtime_top(IMPORTS["tile_command"])
    results["importtime_top_tile_command"] = top

    cli = [py, "-m", "needlework"]
    results["tile_help_s"], _ = _median([*cli, "slides", "tile", "--help"], repeats)
    results["doctor_s"], _ = _median([*cli, "doctor", "--min_free_gb", "0"], repeats)
    work = Path(tempfile.mkdtemp(prefix="needlework_startup_"))
    job = work / "job"
    tile = [*cli, "slides", "tile", "--slides", str(slide_dir), "--job_dir", str(job),
            "--tiling.target_magnification", "20", "--tiling.patch_size", "256", "--progress", "false"]
    try:
        _wall(tile, 1)  # unmeasured (file cache, .pyc of the modules the run itself imports)
        median, runs = _median(tile, repeats, before=lambda: shutil.rmtree(job, ignore_errors=True))
        state = next(job.glob("*/wsi_states/tile"))
        n_tiles = json.loads((state / "summary.json").read_text())["n_tiles"]
        slide_s = json.loads((state / "slide.json").read_text()).get("seconds")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["tile_command"] = " ".join(tile[1:]).replace(str(work), "<tmp>")
    results["tile_cold_s"] = {"median": median, "runs": runs}
    results["tile_in_process_slide_s"] = slide_s
    results["n_tiles"] = n_tiles
    results["reference"] = {"clam_tile_s": CLAM_TILE_S, "needlework_before_s": BEFORE_TILE_S}
    results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    rows = [("python -c pass (interpreter)", base)]
    rows += [(f"{k}: {v['code']}", v["s"]) for k, v in imports.items()]
    rows += [
        ("needlework slides tile --help", results["tile_help_s"]),
        ("needlework doctor", results["doctor_s"]),
        (f"needlework slides tile, {size}² cold (median of {repeats})", median),
        ("  of which the slide itself (in-process)", slide_s or float("nan")),
        ("CLAM create_patches_fp.py, same slide (issue #12)", CLAM_TILE_S),
        ("needlework before (issue #12)", BEFORE_TILE_S),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  seconds")
    for name, t in rows:
        print(f"{name:<{width}}  {t:7.3f}")
    for v in imports.values():
        if v["loads_heavy"]:
            print(f"warning: {v['code']} loads {v['loads_heavy']}")
    heaviest = ", ".join(f"{d['package']} {d['self_ms']} ms" for d in top)
    print(f"heaviest imports of the tile command: {heaviest}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
