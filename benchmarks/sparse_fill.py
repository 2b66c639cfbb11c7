"""Where the dense-box path of the submanifold convolution overtakes the rulebook (issue 16).

20,000 sites drawn uniformly without replacement from a square box whose side sets the fill (sites / box
cells), plus the compact layout of ``benchmarks/peers.py`` (fill 0.99); one 3×3 convolution ``C → C``,
forward + backward to features and weight, one thread, median process time of 9 steps per path. The
crossover sets ``needlework.ops.sparse_conv.DENSE_FILL``.

    PYTHONPATH=src python benchmarks/sparse_fill.py     # ≈ 3 min; writes benchmarks/results/sparse_fill.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from needlework.ops.rulebook import rulebook
from needlework.ops.sparse_conv import neighbor_table, submanifold_conv2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_cases import sparse_sites

OUT = Path(__file__).resolve().parent / "results" / "sparse_fill.json"


def median_ms(step, n: int = 9) -> float:
    times = []
    for _ in range(n):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    return sorted(times)[n // 2] * 1e3


def conv_step(feats, book, weight, bias, grad, method: str):
    """One forward + backward of the convolution by ``method``."""
    return lambda: submanifold_conv2d(feats, book, weight, bias, method).backward(grad)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for channels in (32, 128):
        for fill in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, None):
            if fill is None:
                sites = sparse_sites("compact", 20_000, 512)
            else:
                side = int((20_000 / fill) ** 0.5)
                flat = torch.randperm(side * side, generator=g)[:20_000]
                sites = torch.stack([torch.zeros_like(flat), flat // side, flat % side], dim=1)
            book = rulebook(neighbor_table(sites, 3), sites)
            feats = torch.randn(len(sites), channels, requires_grad=True)
            weight = torch.randn(channels, channels, 3, 3, requires_grad=True)
            bias, grad = torch.randn(channels), torch.randn(len(sites), channels)
            row = {"channels": channels, "layout": "compact" if fill is None else "random in box",
                   "fill": round(book.box.fill, 3), "neighbor_fraction": round(book.fraction, 3)}  # fmt: skip
            for method in ("rulebook", "dense"):
                step = conv_step(feats, book, weight, bias, grad, method)
                step()
                row[f"{method}_ms"] = round(median_ms(step), 2)
            row["dense_speedup"] = round(row["rulebook_ms"] / row["dense_ms"], 2)
            rows.append(row)
            print(row, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": "sparse_fill", "torch": torch.__version__,
                               "load_average": os.getloadavg(), "rows": rows}, indent=1) + "\n")  # fmt: skip
    os.replace(tmp, OUT)
    print("| C | layout | fill | rulebook ms | dense ms | dense speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['channels']} | {r['layout']} | {r['fill']} | {r['rulebook_ms']} | {r['dense_ms']} | "
              f"{r['dense_speedup']}× |")


if __name__ == "__main__":
    main()
