"""Tiling + reading throughput against raw reader throughput, 1 vs 2 workers; embedding throughput.

One synthetic pyramidal BigTIFF (JPEG q90, 256² tiles, 0.25 µm/px) is built once; then, side by side:

* raw reader: ``openslide.OpenSlide.read_region`` / ``tiffslide.TiffSlide.read_region(as_array=True)`` over
  the grid-aligned 256² tiles at level 0 (the ceiling for any pipeline on this file);
* needlework tiling + reading at level 0: ``tile_slide`` (thumbnail, segmentation, grid, tissue filter)
  plus reading every kept tile through the ``TileDataset``/``DataLoader`` used by ``embed``, with 0
  (in-process), 1 and 2 worker processes;
* embedding: tiles/s of ``embed_tiles`` for built-in encoders (CPU, the machine's default threads).

    PYTHONPATH=src python benchmarks/tiling.py --threads 1  # ≈ 2–4 min on 2 cores
    PYTHONPATH=src python benchmarks/tiling.py --quick    # seconds, for checking the script

Writes ``benchmarks/results/tiling.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def raw_reader(path: Path, backend: str, coords: np.ndarray, size: int) -> float:
    if backend == "openslide":
        import openslide

        slide = openslide.OpenSlide(str(path))

        def run():
            for x, y in coords.tolist():
                slide.read_region((x, y), 0, (size, size))
    else:
        import tiffslide

        slide = tiffslide.TiffSlide(str(path))

        def run():
            for x, y in coords.tolist():
                slide.read_region((x, y), 0, (size, size), as_array=True)

    run()  # warm-up (file cache, tile decoder)
    return len(coords) / _timed(run, 2)


def pipeline(path: Path, reader: str, workers: int, tile: int, batch: int = 64) -> dict:
    from torch.utils.data import DataLoader

    from needlework.slides.embed import TileDataset
    from needlework.slides.reader import open_slide
    from needlework.slides.tiling import TilingConfig, tile_slide
    from needlework.slides.tissue import TissueParams

    cfg = TilingConfig(target_mpp=0.25, patch_size=tile, min_tissue_fraction=0.25)
    t0 = time.perf_counter()
    with open_slide(path, reader) as slide:
        res = tile_slide(slide, cfg, TissueParams())
    t_tile = time.perf_counter() - t0
    ds = TileDataset(path, res.coords, res.patch_size_level0, tile, reader)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers)

    def run():
        for _ in loader:
            pass

    run()  # warm-up
    t_read = _timed(run, 2)
    n = len(res.coords)
    return {
        "reader": reader,
        "workers": workers,
        "tiles": n,
        "tiling_s": round(t_tile, 3),
        "read_tiles_per_s": round(n / t_read, 1),
        "tiling_plus_read_tiles_per_s": round(n / (t_tile + t_read), 1),
    }


def embedding(path: Path, coords: np.ndarray, name: str, tile: int, workers: int, batch: int) -> dict:
    from needlework.models.encoder_loading import build_tile_encoder
    from needlework.slides.embed import embed_tiles

    enc = build_tile_encoder(name)
    embed_tiles(path, coords[:batch], 256, tile, enc, batch, 0, device="cpu")  # warm-up
    t = _timed(lambda: embed_tiles(path, coords, 256, tile, enc, batch, workers, device="cpu"))
    return {
        "encoder": name,
        "tile": tile,
        "workers": workers,
        "tiles": len(coords),
        "batch_size": batch,
        "tiles_per_s": round(len(coords) / t, 1),
        "embed_dim": enc.embed_dim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192, help="slide side in pixels")
    parser.add_argument("--quick", action="store_true", help="tiny sizes to check the script")
    parser.add_argument("--out", default="benchmarks/results/tiling.json")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = 2048 if args.quick else args.size
    n_embed = {"color_stats": 64, "resnet8": 64, "resnet18": 32, "resnet50_trunc": 16}
    if args.quick:
        n_embed = {k: 8 for k in n_embed}

    from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_slide
    from needlework.slides.tiling import grid_coords

    results: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_start": os.getloadavg(),
        },
        "slide": {"size": size, "mpp": 0.25, "tile": 256, "format": "BigTIFF JPEG q90, 256² tiles, pages"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tif"
        t0 = time.perf_counter()
        spec = SyntheticSlideSpec(width=size, height=size, seed=0, n_tissue=3, n_lesions=4)
        meta = make_synthetic_slide(path, spec)
        results["slide"]["build_s"] = round(time.perf_counter() - t0, 2)
        results["slide"]["tissue_fraction"] = round(meta["tissue_fraction"], 3)
        grid = grid_coords(size, size, 256, 256)
        results["raw_reader"] = [
            {"reader": b, "tiles": len(grid), "tiles_per_s": round(raw_reader(path, b, grid, 256), 1)}
            for b in ("openslide", "tiffslide")
        ]
        results["pipeline"] = [
            pipeline(path, r, w, 256) for r in ("openslide", "tiffslide") for w in (0, 1, 2)
        ]
        rng = np.random.default_rng(0)
        results["embedding"] = []
        for name, n in n_embed.items():
            coords = grid[rng.choice(len(grid), n, replace=False)]
            for workers in (0, 2):
                results["embedding"].append(embedding(path, coords, name, 224, workers, min(32, n)))
    results["machine"]["load_avg_end"] = os.getloadavg()

    print(
        f"slide {size}² built in {results['slide']['build_s']} s; "
        f"tissue {results['slide']['tissue_fraction']}"
    )
    print("\nraw reader, grid-aligned 256² tiles at level 0")
    for r in results["raw_reader"]:
        print(f"  {r['reader']:<10} {r['tiles_per_s']:>8.1f} tiles/s")
    print("\nneedlework tiling + reading at level 0 (DataLoader)")
    print(
        f"  {'reader':<10} {'workers':>7} {'tiles':>6} {'tiling s':>9} {'read t/s':>9} {'tile+read t/s':>14}"
    )
    for r in results["pipeline"]:
        print(
            f"  {r['reader']:<10} {r['workers']:>7} {r['tiles']:>6} {r['tiling_s']:>9.2f} "
            f"{r['read_tiles_per_s']:>9.1f} {r['tiling_plus_read_tiles_per_s']:>14.1f}"
        )
    print("\nembedding (CPU, 224² tiles read from the slide)")
    for r in results["embedding"]:
        print(
            f"  {r['encoder']:<15} workers={r['workers']}  {r['tiles_per_s']:>8.1f} tiles/s  "
            f"(D={r['embed_dim']})"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
