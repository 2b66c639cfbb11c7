"""needlework against the peers a user would pick instead, side by side in one process (issue 16).

Both sides run in this process on one thread (``torch.set_num_threads(1)``), alternating (ours, peer, peer,
ours, …) so that drifting machine load hits both alike; each side gets warm-up steps, then ``--reps`` timed
steps; the table shows medians with the inter-quartile range and the ratio ``peer median / our median``
(> 1 means needlework is faster).

* **MIL** (torchmil 1.0.2): ABMIL, DSMIL, TransMIL training steps (forward + loss + backward + Adam), one bag
  of 1,000 or 10,000 instances × 1024 features, batch 1, one logit + BCE on both sides. ABMIL and DSMIL get
  the same ``Linear(1024 → 256) + ReLU`` embedding and attention width 128; their logits are compared on
  copied weights before timing. TransMIL: 512-wide tokens, 8 heads, 256 landmarks, no dropout, ours built
  with ``residual_conv=False, out_projection=False`` because torchmil's Nyström layer has neither (its unused
  second LayerNorm per layer is the remaining parameter difference); one more row keeps our reference layer.
  The two TransMILs differ in small ways (ReLU after the embedding, landmark segments), so their outputs are
  not compared.
* **Sparse convolution** (spconv 2.3.8, ``SubMConv2d``): one 3×3 submanifold convolution ``C → C``,
  forward + backward, 20,000 sites on a 512² map, scattered or compact, C = 32 and 128, with the neighbour
  table / rulebook rebuilt every step and reused. Both outputs are checked against a dense ``conv2d`` on the
  same weights first. (needlework has no strided ``SparseConv2d``; only the submanifold layer is compared.)
* **Tiling** (``peers_tiling.py``): CLAM is not on the package registry, so its steps are written there with
  OpenCV from its paper and documentation (HSV saturation, median blur, threshold, close, contours with
  holes, area filters, four-point patch test) and timed against ``tile_slide`` on the same 16,384² JPEG
  BigTIFF, at our 4 µm/px thumbnail and at CLAM's downsample of 64; then reading the kept tiles: CLAM's
  ``read_region`` + RGB loop against our ``TileDataset`` through a ``DataLoader`` with 0 and 2 workers.
  CLAM's own measured figures are quoted in the README.
* **Extraction** (``extraction_case``): ``extract_patches`` (16 images of 1500², 10 or 64 patches of 50²,
  some crossing the border) against ``copy_`` of the same number of bytes (ratio = copy / ours, goal ≥ 0.5);
  also timed: the same patches moved inside (no border work) and the reference port's padded Python loop.
* **ATS step** (``ats_case``): an ATS training step at 1500² against its feature network's own forward +
  backward on the same number of patches (the ratio is feature net / step; the goal is ≥ 0.83).

Run: ``PYTHONPATH=src python benchmarks/peers.py`` (``--quick`` for a seconds-long smoke run on tiny sizes);
writes ``benchmarks/results/peers.json`` (``--out``) and prints a markdown table. Peers come from the
``[bench]`` extra; a missing one is skipped with a message and our side is still timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_cases import ats_case, extraction_case, mil_case, peer_version, sparse_case
from peers_tiling import tiling_case

RESULTS = Path(__file__).resolve().parent / "results" / "peers.json"


def summary(times: list[float]) -> dict[str, Any]:
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "n": len(times)}


def time_pair(ours, peer, reps: int, warmup: int) -> tuple[dict, dict | None]:
    """Alternate the two steps (ABBA order), ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        ours()
        if peer is not None:
            peer()
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for i in range(reps):
        order = [("ours", ours), ("peer", peer)]
        for side, fn in order if i % 2 == 0 else order[::-1]:
            if fn is None:
                continue
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    return summary(times["ours"]), (summary(times["peer"]) if peer is not None else None)


def plan(quick: bool) -> list[dict[str, Any]]:
    """The cases: tiny ones for ``--quick``."""
    cases: list[dict[str, Any]] = []
    mil_sizes = [64] if quick else [1_000, 10_000]
    mil_kw = {"in_dim": 32, "hidden": 16, "tokens": {"dim": 32, "heads": 4, "landmarks": 16}} if quick else {}
    for name in ("abmil", "dsmil", "transmil"):
        for n in mil_sizes:
            case = {"suite": "mil", "peer": "torchmil", "model": name, "bag_size": n, **mil_kw}
            if not quick and name != "transmil":
                case["min_seconds"] = 1.5
            if name == "transmil" and n >= 10_000:  # ~8 s a step on one core: fewer repeats
                case.update(reps=5, warmup=1)
            cases.append(case)
    # the setting: bags of 2,000, batch 1 and 8 (padded bags with masks where the peer takes one)
    n_batch = 48 if quick else 2_000
    for name in ("abmil", "dsmil", "transmil"):
        for batch in (1, 8):
            case = {"suite": "mil", "peer": "torchmil", "model": name, "bag_size": n_batch, "batch": batch}
            if not quick and name != "transmil":
                case["min_seconds"] = 1.5
            if name == "transmil" and batch > 1 and not quick:  # ~10 s a step: fewer repeats
                case.update(reps=5, warmup=1)
            cases.append({**case, **mil_kw})
    # TransMIL as the reference defines it (output projection + value convolution), against the same peer
    cases.append(
        {
            "suite": "mil",
            "peer": "torchmil",
            "model": "transmil",
            "bag_size": mil_sizes[0],
            "matched": False,
            **mil_kw,
        }
    )
    sparse_kw = {"n_sites": 300, "side": 64} if quick else {}
    for channels in [8] if quick else [32, 128]:
        for layout in ("scattered", "compact"):
            for reuse in (False, True):
                cases.append(
                    {
                        "suite": "sparse_conv",
                        "peer": "spconv",
                        "layout": layout,
                        "channels": channels,
                        "reuse_table": reuse,
                        **sparse_kw,
                    }
                )
    cases.append({"suite": "ats", "peer": "torch", **({"size": 300, "batch": 2} if quick else {})})
    for n in (10, 64):  # ATS's 10 patches per image, and the 64 of the CUDA goal
        small = {"size": 200} if quick else {}
        cases.append({"suite": "extraction", "peer": "torch", "n_patches": n, **small})
    tiling = {"suite": "tiling", "peer": "opencv-python-headless", **({"size": 2048} if quick else {})}
    for seg_um in (4.0, 16.0):  # our default thumbnail, CLAM's (downsample 64 at 0.25 µm/px)
        cases.append({**tiling, "step": "segment", "seg_um": seg_um})
    for workers in (0, 2):  # a read of all tiles takes seconds: fewer repeats
        few = {} if quick else {"reps": 5, "warmup": 1}
        cases.append({**tiling, "step": "read", "workers": workers, **few})
    return cases


def run_case(case: dict[str, Any], reps: int, warmup: int) -> dict[str, Any]:
    if "reps" in case:  # a per-case count, never above --reps
        reps, warmup = min(reps, case["reps"]), min(warmup, case["warmup"])
    skip = ("suite", "peer", "model", "bag_size", "reps", "warmup", "min_seconds")
    kw = {k: v for k, v in case.items() if k not in skip}
    if case["suite"] == "mil":
        ours, peer, info = mil_case(case["model"], case["bag_size"], **kw)
    elif case["suite"] == "tiling":
        ours, peer, info = tiling_case(**kw)
    elif case["suite"] == "ats":
        ours, peer, info = ats_case(**kw)
    elif case["suite"] == "extraction":
        ours, peer, info = extraction_case(**kw)
    else:
        ours, peer, info = sparse_case(**kw)
    extra = info.pop("extra_steps", {})
    if case.get("min_seconds"):  # steps of a few ms: enough repeats for ~min_seconds per side (odd count)
        t0 = time.perf_counter()
        ours()
        reps = max(reps, min(101, int(case["min_seconds"] / max(time.perf_counter() - t0, 1e-6)) | 1))
    ours_t, peer_t = time_pair(ours, peer, reps, warmup)
    row = {**case, **info, "peer_version": peer_version(case["peer"]), "ours": ours_t, "peer_time": peer_t}
    row["ratio"] = peer_t["median_s"] / ours_t["median_s"] if peer_t else None
    for name, step in extra.items():  # our other paths, timed against the same peer, ABBA again
        alt_t, alt_peer_t = time_pair(step, peer, reps, warmup)
        row[f"ours_{name}"] = alt_t
        row[f"ratio_{name}"] = alt_peer_t["median_s"] / alt_t["median_s"] if alt_peer_t else None
    if "ours_port_loop" in row:  # the reference port's padded loop, timed in the same run
        row["speedup_vs_port"] = row["ours_port_loop"]["median_s"] / ours_t["median_s"]
    return row


def label(row: dict[str, Any]) -> str:
    if row["suite"] == "mil":
        variant = " (reference layer)" if row.get("matched") is False else ""
        batch = row.get("batch", 1)
        bags = f"{batch} bags of ≤ {row['bag_size']:,}" if row.get("padded") else (
            f"{batch} bags of {row['bag_size']:,}" if batch > 1 else f"bag {row['bag_size']:,}")
        return f"{row['model']}{variant} training step, {bags} × {row.get('in_dim', 1024)}"
    if row["suite"] == "ats":
        return (f"ATS training step, {row['batch']} × {row['size']}², vs its feature net's forward + "
                f"backward on the same {row['patches_per_image']} patches of {row['patch']}² per image")
    if row["suite"] == "extraction":
        return (f"ATS patch extraction, {row['batch']} × {row['n_patches']} patches of {row['patch']}² "
                f"from {row['size']}², vs a plain copy of the same bytes")
    if row["suite"] == "tiling":
        side = f"{row['slide_side']:,}²"
        if row["step"] == "segment":
            return f"tissue + grid, {side} slide, {row['seg_um']:g} µm/px thumbnail, vs CLAM's steps"
        return f"reading {row['tiles']} tiles of 256², {side} slide, {row['workers']} workers, vs CLAM's loop"
    table = "table reused" if row["reuse_table"] else "table built per step"
    return f"SubMConv 3×3, C={row['channels']}, {row['layout']}, {table}"


def fmt(t: dict[str, Any] | None) -> str:
    if t is None:
        return "—"
    return f"{t['median_s'] * 1e3:.1f} ({t['q1_s'] * 1e3:.1f}–{t['q3_s'] * 1e3:.1f})"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | peer | ours ms (IQR) | peer ms (IQR) | ratio peer/ours | params ours / peer | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "skipped"
        params = f"{r['params_ours']:,} / {r.get('params_peer', 0):,}" if "params_ours" in r else "—"
        if r["suite"] == "ats":
            check = "ratio = feature net / step (goal ≥ 0.83)"
        elif r["suite"] == "extraction":
            check = (f"ratio = copy / extraction (goal ≥ 0.5); {r['border_patches']} border patches; all "
                     f"inside {fmt(r['ours_all_inside'])} ms; port's padded loop "
                     f"{fmt(r['ours_port_loop'])} ms ({r['speedup_vs_port']:.0f}× slower than ours); "
                     f"equal to it: {r['exact']}")
        elif r["suite"] == "tiling":
            if r["step"] == "segment":
                check = f"tiles {r['tiles_ours']} / {r.get('tiles_peer', '—')}, IoU {r.get('tile_iou', '—')}"
            else:
                check = f"same pixels: {r.get('pixels_equal', '—')}"
        elif r["suite"] == "mil":
            check = (
                f"logits Δ {r['logit_max_abs_diff']:.1e}" if "logit_max_abs_diff" in r else "not comparable"
            )
        else:
            check = f"vs dense Δ {r['ours_vs_dense_max_abs_diff']:.1e}"
            if "ours_im2col" in r:
                alt = f"{r['ratio_im2col']:.2f}×" if r.get("ratio_im2col") is not None else "—"
                check = f"{r.get('method', '?')}; im2col {fmt(r['ours_im2col'])} ms, ratio {alt}; " + check
            if "spconv_vs_dense_max_abs_diff" in r:
                check += f", spconv Δ {r['spconv_vs_dense_max_abs_diff']:.1e}"
        peer = f"{r['peer']} {r['peer_version'] or '(absent)'}"
        cells = [label(r), peer, fmt(r["ours"]), fmt(r["peer_time"]), ratio, params, check]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats: a smoke test in seconds")
    p.add_argument("--reps", type=int, default=None, help="timed steps per side (default 9; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per side before timing")
    p.add_argument(
        "--suite",
        choices=("all", "mil", "sparse_conv", "tiling", "ats", "extraction"),
        default="all",
        help="run one suite only; its rows replace that suite's rows in --out, the others are kept",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 9)
    if reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(1)
    rows = []
    for case in plan(args.quick):
        if args.suite != "all" and case["suite"] != args.suite:
            continue
        t0 = time.perf_counter()
        row = run_case(case, reps, args.warmup)
        rows.append(row)
        if "skipped" in row:
            print(f"note: {row['skipped']}", file=sys.stderr)
        print(
            f"{label(row)}: ratio {row['ratio']} ({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    run_meta = {
        "quick": args.quick,
        "reps": reps,
        "warmup": args.warmup,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
    }
    data = {
        "benchmark": "peers",
        "quick": args.quick,
        "reps": reps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows,
    }
    if args.suite != "all" and args.out.exists():  # keep the other suites' rows of the previous run
        old = json.loads(args.out.read_text())
        kept = [r for r in old.get("rows", []) if r.get("suite") != args.suite]
        data = {**old, "rows": kept + rows}
        data.setdefault("runs", {})[args.suite] = dict(run_meta)
    else:
        data["runs"] = {suite: dict(run_meta) for suite in sorted({r["suite"] for r in rows})}
    write_json(args.out, data)
    print(markdown(rows))
    return 0


def cpu_model() -> str:
    """The CPU's model name (ratios shift between CPU families, so each run records its own)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
