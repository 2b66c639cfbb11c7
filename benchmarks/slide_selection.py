"""Peak memory and time of one training step of ATS, DPS and IPS on whole slides of growing size.

Slides of ``--sizes`` px square at 0.25 µm/px are written once (``slide_pyramid.py``: JPEG-tiled pyramidal
BigTIFFs, ~10 % tissue in the same relative layout at every size) and cached under ``--cache-dir``
(default ``$NEEDLEWORK_CACHE/bench_slide_selection`` or ``~/.cache/needlework/bench_slide_selection``).
For each method (model, kwargs and optimiser of the packaged ``slides/<method>_pixels.yaml``, read from
the YAML) and each slide, a fresh subprocess builds the ``slide_images`` dataset on that one slide and
times one full training step — dataset item (low view read + tissue mask, ``cache=False``) → collate →
forward (patches read lazily from the file) → backward → optimiser step — ``--repeats`` times (median
after the first, which warms up). Peak memory (CPU): ``/proc/self/clear_refs`` reset right before each
step, ``VmHWM`` after it; reported as the process's peak RSS and its increment over the RSS before the
step (max over the timed steps). On CUDA, ``torch.cuda.max_memory_allocated`` instead.

Choice of ``--low-mpp`` (default 8 µm/px, not the configs' 4): at 4 µm/px the 100,000² slide gives a
6,250-px view, above the dataset's ``max_low_side`` cap of 4,096, which would silently make that view
coarser than the others. 8 µm/px keeps the view at the same µm/px at every size (312 → 3,125 px), so
what the models see per µm is constant and only the *extent* of the low view grows with the slide.
``--high-mpp`` and the patch size stay the configs' (0.5 µm/px, 64 px); IPS scans every tissue patch.

    PYTHONPATH=src python benchmarks/slide_selection.py              # 10,000², 40,000², 100,000²
    PYTHONPATH=src python benchmarks/slide_selection.py --quick      # 2048², 4096², seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from selection_memory import (  # shared with the operator memory benchmark
    environment,
    run_measurement,
    write_json,
)
from slide_pyramid import write_slide

METHODS = ("ats", "dps", "ips")
HERE = Path(__file__).parent


def default_cache() -> Path:
    root = os.environ.get("NEEDLEWORK_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "needlework"
    return base / "bench_slide_selection"


def ensure_slide(cache: Path, side: int, mpp: float) -> dict[str, Any]:
    """The cached slide of ``side`` px (written when absent; a ``.json`` beside it marks it complete)."""
    path = cache / f"slide_{side}.tif"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("mpp") == mpp:
            return {**info, "path": str(path), "cached": True}
    info = {**write_slide(path, side, mpp), "side": side, "mpp": mpp}
    write_json(meta, info)
    return {**info, "path": str(path), "cached": False}


def load_config(method: str) -> dict[str, Any]:
    """``model`` init_args and ``dataset_kwargs`` of the packaged ``slides/<method>_pixels`` config."""
    import yaml

    from needlework.configs import resolve_config

    cfg = yaml.safe_load(resolve_config(f"slides/{method}_pixels").read_text())
    return {"task": cfg["model"]["init_args"], "data": cfg["data"]["init_args"]["dataset_kwargs"]}


# ------------------------------------------------------------------------------------------- worker
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def run_worker(method: str, slide: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from needlework.models.base import route_batch
    from needlework.slides.patch_reader import SlidePatchReader
    from needlework.slides.pixel_data import SlideImageDataset, collate_slide_pixels
    from needlework.training import ClassificationTask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = load_config(method)
    data = cfg["data"]
    high_mpp = args.high_mpp or data["high_mpp"]
    counter = {"patches": 0}
    original_read = SlidePatchReader.read

    def counting_read(self: Any, corners: Any, *a: Any, **k: Any) -> Any:
        counter["patches"] += len(np.asarray(corners))
        return original_read(self, corners, *a, **k)

    SlidePatchReader.read = counting_read  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        labels.write_text(f"case_id,slide_id,label\ncase0,{Path(slide).stem},1\n")
        ds = SlideImageDataset(
            "all", slides_dir=str(Path(slide).parent), labels_csv=str(labels), low_mpp=args.low_mpp,
            high_mpp=high_mpp, patch_size=data["patch_size"], max_low_side=args.max_low_side, cache=False,
            label_map={"0": 0, "1": 1}, size=1, low_image=data.get("low_image", True),
        )  # fmt: skip
        task = ClassificationTask(**cfg["task"]).to(device).train()
        opt = task.configure_optimizers()
        model = task.model
        info: dict[str, Any] = {}

        def step() -> None:
            batch = _to(collate_slide_pixels([ds[0]]), device)
            out = model(**route_batch(model.forward, batch))
            loss, _ = model.compute_loss(out, batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            info["x_low"] = [3, *batch["tissue"].shape[2:]]  # the low view, in the batch or not
            info["x_low_in_batch"] = "x_low" in batch
            info["x_high"] = list(batch["x_high"].size)
            info["tissue_fraction_low"] = float(batch["tissue"].float().mean())
            if "candidate_coords" in out:  # IPS: tissue patches scanned; DPS: cells scored
                info["candidates"] = int(len(out["candidate_coords"]))

        step()  # warm-up: lazy initialisations, code pages and the slide's file handles
        times, peaks, incs = [], [], []
        for _ in range(args.repeats):
            counter["patches"] = 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device) / 2**20
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                before = _status_kb("VmRSS") / 1024
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            peak = (
                torch.cuda.max_memory_allocated(device) / 2**20
                if device.type == "cuda"
                else _status_kb("VmHWM") / 1024
            )
            peaks.append(peak)
            incs.append(peak - before)
    return {
        **info,
        "patches_read": counter["patches"],
        "step_s": float(np.median(times)),
        "peak_mb": max(peaks),
        "increment_mb": max(incs),
        "low_mpp": args.low_mpp,
        "high_mpp": high_mpp,
    }


def spawn(method: str, slide: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", method, slide, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--device", args.device, "--low-mpp", str(args.low_mpp),
           "--max-low-side", str(args.max_low_side)]  # fmt: skip
    if args.high_mpp:
        cmd += ["--high-mpp", str(args.high_mpp)]
    return run_measurement(cmd, args.threads, args.timeout)


# --------------------------------------------------------------------------------------- reporting
def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'method':<7}{'side':>8}{'x_low':>12}{'cand.':>9}{'read':>7}{'step s':>9}"
            f"{'peak MB':>9}{'incr MB':>9}{'write s':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<7}{r['side']:>8}  error: {' '.join(r['error'])}")
            continue
        low = "x".join(str(v) for v in r["x_low"][1:])
        lines.append(
            f"{r['method']:<7}{r['side']:>8}{low:>12}{r.get('candidates', '-'):>9}{r['patches_read']:>7}"
            f"{r['step_s']:>9.3f}{r['peak_mb']:>9.0f}{r['increment_mb']:>9.0f}{r['write_s']:>9.1f}"
        )
    return "\n".join(lines)


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, method in enumerate(METHODS):
        pts = [r for r in rows if r["method"] == method and "error" not in r]
        if not pts:
            continue
        sides, c = [r["side"] for r in pts], f"C{i}"  # one colour per method in both panels
        axes[0].plot(sides, [r["peak_mb"] for r in pts], "o-", color=c, label=f"{method} peak RSS")
        axes[0].plot(sides, [r["increment_mb"] for r in pts], "o--", color=c, label=f"{method} increment")
        axes[1].plot(sides, [r["step_s"] for r in pts], "o-", color=c, label=method)
    for ax, ylabel in zip(axes, ("memory (MB)", "one training step (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("slide side (level-0 px, 0.25 µm/px)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle("ATS / DPS / IPS on whole-slide pixels: one training step vs slide size")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000, 100000])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--quick", action="store_true", help="sizes 2048 4096, one repeat: checks the script")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="1 keeps timings stable on a shared CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px of the written slides")
    p.add_argument("--low-mpp", type=float, default=8.0, help="µm/px of x_low (see the module docstring)")
    p.add_argument("--high-mpp", type=float, default=None, help="default: the configs' (0.5)")
    p.add_argument("--max-low-side", type=int, default=4096)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=HERE / "results" / "slide_selection.json")
    p.add_argument("--figure", type=Path, default=HERE.parent / "docs" / "images" / "slide_selection.png")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [2048, 4096], 1
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if min(args.sizes) < 512:
        p.error(f"--sizes must be >= 512 px, got {args.sizes}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker[0], args.worker[1], args)))
        return {}

    started = time.time()
    cache = args.cache_dir or default_cache()
    slides = {s: ensure_slide(cache, s, args.mpp) for s in args.sizes}
    for s, info in slides.items():
        state = "cached" if info["cached"] else f"written in {info['seconds']:.1f}s"
        print(f"slide {s}² px: {info['levels']} levels, tissue {info['tissue_fraction']:.3f}, {state}",
              file=sys.stderr)  # fmt: skip
    rows = []
    for method in args.methods:
        for s in args.sizes:
            res = spawn(method, slides[s]["path"], args)
            rows.append({"method": method, "side": s, **res, "write_s": slides[s]["seconds"],
                         "levels": slides[s]["levels"]})  # fmt: skip
            print(f"  measured {method} {s}² ({time.time() - started:.0f}s)", file=sys.stderr)
    print(f"\nOne training step on one slide, device {args.device}, {args.threads} thread(s), "
          f"x_low at {args.low_mpp} µm/px")  # fmt: skip
    print(table(rows))
    skip = ("worker", "cache_dir")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}
    result = {
        "benchmark": "slide_selection",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings,
        "environment": environment(),
        "memory_measure": (
            "CPU: VmHWM after /proc/self/clear_refs reset right before the step (peak_mb), minus VmRSS "
            "before it (increment_mb); max over the timed steps"
            if args.device == "cpu"
            else "CUDA: torch.cuda.max_memory_allocated during the step (peak_mb), minus allocated before"
        ),
        "slides": {str(s): {k: v for k, v in i.items() if k != "path"} for s, i in slides.items()},
        "rows": rows,
    }
    write_json(args.out, result)
    figure(rows, args.figure)
    print(f"\nwrote {args.out} and {args.figure} ({time.time() - started:.0f}s)")
    return result


if __name__ == "__main__":
    main()
