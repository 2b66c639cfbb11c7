"""Side by side on the texture cohort (issue 14, item 5): pixel selection models against feature MIL.

One script, one run, on a cohort where the needle is tiny and colour does not give it away
(``needlework slides synth --lesion_type texture``: clusters of enlarged, crowded nuclei matched to the colour
of the tissue around them, at most 0.05 % of the tissue per slide):

* **pixels** — ATS, DPS and IPS trained end to end on the slides (``configs/slides/{ats,dps,ips}_pixels``:
  the attention or scoring network on ``x_low`` at 4 µm/px, patches of 64 px read at 20× where it points);
* **features** — ABMIL, TransMIL and SparseConvMIL on 64-px tiles at 40×, ZoomMIL on 10× → 20× → 40× tiles,
  all embedded by ``resnet8`` (a small CNN: it sees texture, where ``color_stats`` does not; seeded random
  weights, since no pretrained weights can be downloaded here).

Every model is a real ``needlework fit`` (a subprocess) under the same wall-clock budget (``--minutes``), on
fold 0 of patient-grouped folds, tested at its best validation checkpoint. Reported per model: test accuracy
and AUROC, **localisation** (on the positive test slides, the fraction whose attention maximum — the tile or
cell with the highest score — overlaps a lesion polygon; ``loc_chance`` is the same fraction for a uniformly
chosen scored tile), and the **total** wall time: tiling + embedding every tile (at every magnification
ZoomMIL reads) + fit + test for the feature side, fit + test for the pixel side. SparseConvMIL pools by a
global mean, so it has no attention maximum to localise with (``loc`` is null).

    PYTHONPATH=src python benchmarks/slide_side_by_side.py                 # 60 slides, ~40 min on 2 cores
    PYTHONPATH=src python benchmarks/slide_side_by_side.py --quick --out /tmp/sbs.json   # checks the script

The cohort, tilings and features are cached (``--cache-dir``, default ``$NEEDLEWORK_CACHE``); the JSON
(``benchmarks/results/slide_side_by_side.json``) is rewritten atomically after every model, and a rerun with
the same settings skips the models already measured (``--force`` redoes them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PIXEL = {"ats": "slides/ats_pixels", "dps": "slides/dps_pixels", "ips": "slides/ips_pixels"}
FEATURE = ("abmil", "transmil", "zoommil", "sparseconvmil")
METHODS = (*PIXEL, *FEATURE)
SPEC: dict[str, Any] = {
    "n_slides": 60,
    "width": 4096,
    "height": 3072,
    "slides_per_patient": 1,
    "n_lesions": 3,
    "lesion_type": "texture",
    "seed": 0,
    "folds": 5,
    "patch_size": 64,
    "encoder": "resnet8",
    "mags": [10, 20, 40],
}
QUICK = {"n_slides": 10, "width": 1536, "height": 1152, "n_lesions": 1, "folds": 3}
FEATURE_DIM = 128  # resnet8 (width 32): 4 · 32
# the feature models: kwargs beyond in_dim (cf. benchmarks/mil_settings.py, setting "slides")
MIL_KWARGS: dict[str, dict[str, Any]] = {
    "abmil": {"embed_dim": 128, "attention_dim": 64},
    "transmil": {"dim": 128, "heads": 4, "num_landmarks": 32, "ppeg_layout": "coords", "coord_stride": 64},
    "sparseconvmil": {"cell_size": 64, "input_norm": True},
}


def _needlework(args: list[Any], log: Path) -> float:
    """Run ``python -m needlework ARGS`` (output to ``log``); its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "needlework", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if proc.returncode != 0:
        raise SystemExit(f"needlework {' '.join(map(str, args[:3]))} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - start


def _cached(done: Path, key: dict[str, Any], make: Any) -> dict[str, Any]:
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return json.loads(done.read_text())["value"]
    value = make()
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}, indent=2))
    os.replace(tmp, done)
    return value


def prepare(spec: dict[str, Any], root: Path, mags: list[int] | None = None) -> dict[str, Any]:
    """Cohort, folds, tilings and features at ``mags`` (default: all of ``spec["mags"]``), cached; returns
    paths and the seconds of every stage."""
    cohort, job, log = root / "cohort", root / "job", root / "prepare.log"

    def make_cohort() -> dict[str, Any]:
        t = _needlework(
            [
                "slides",
                "synth",
                "--out_dir",
                cohort,
                "--n_slides",
                spec["n_slides"],
                "--width",
                spec["width"],
                "--height",
                spec["height"],
                "--slides_per_patient",
                spec["slides_per_patient"],
                "--n_lesions",
                spec["n_lesions"],
                "--lesion_type",
                spec["lesion_type"],
                "--seed",
                spec["seed"],
            ],
            log,
        )
        t += _needlework(
            [
                "slides",
                "splits",
                "--labels_csv",
                cohort / "labels.csv",
                "--out_dir",
                root / "splits",
                "--k",
                spec["folds"],
                "--seed",
                spec["seed"],
            ],
            log,
        )
        return {"synth_s": t}

    out = _cached(root / "DONE_cohort.json", spec, make_cohort)
    stages: dict[str, Any] = {}
    for mag in mags or spec["mags"]:
        name = f"{mag}x_{spec['patch_size']}px_0px_overlap"

        def make_features(mag: int = mag, name: str = name) -> dict[str, Any]:
            tile = _needlework(
                [
                    "slides",
                    "tile",
                    "--slides",
                    cohort / "slides",
                    "--job_dir",
                    job,
                    "--tiling.target_magnification",
                    mag,
                    "--tiling.patch_size",
                    spec["patch_size"],
                    "--mpp_csv",
                    cohort / "mpp_overrides.csv",
                    "--progress",
                    "false",
                ],
                log,
            )
            embed = _needlework(
                [
                    "slides",
                    "embed",
                    "--slides",
                    cohort / "slides",
                    "--job_dir",
                    job,
                    "--tiling_dir_name",
                    name,
                    "--encoder",
                    spec["encoder"],
                    "--num_workers",
                    0,
                    "--progress",
                    "false",
                ],
                log,
            )
            return {
                "tile_s": tile,
                "embed_s": embed,
                "features_dir": str(job / name / f"features_{spec['encoder']}"),
            }

        stages[mag] = _cached(root / f"DONE_{mag}x.json", {**spec, "mag": mag}, make_features)
    return {"synth_s": out["synth_s"], "mags": stages, "cohort": str(cohort), "splits": str(root / "splits")}


def fit_args(method: str, paths: dict[str, Any], spec: dict[str, Any]) -> list[Any]:
    """``needlework fit`` arguments of ``method`` on fold 0 of the cohort."""
    cohort = Path(paths["cohort"])
    data = {"labels_csv": str(cohort / "labels.csv"), "splits_dir": paths["splits"], "fold": 0}
    if method in PIXEL:
        kw = {**data, "slides_dir": str(cohort / "slides"), "mpp_csv": str(cohort / "mpp_overrides.csv")}
        return [
            "--config",
            PIXEL[method],
            *[a for k, v in kw.items() for a in (f"--data.init_args.dataset_kwargs.{k}", v)],
        ]
    top = spec["mags"][-1]
    if method == "zoommil":
        kw = {
            **data,
            "features_dirs": [paths["mags"][m]["features_dir"] for m in spec["mags"]],
            "cache": True,
        }
        model_kw = {
            "in_dim": FEATURE_DIM,
            "num_levels": len(spec["mags"]),
            "hidden_dim": 128,
            "attention_dim": 64,
            "dropout": 0.25,
            "k": 12,
            "sigma": 0.002,
            "n_samples": 100,
            "jacobian": "outer",
            "input_norm": True,
        }
        return [
            "--config",
            "mil/slides/zoommil",
            "--data.init_args.dataset_kwargs",
            json.dumps(kw),
            "--model.init_args.model_kwargs",
            json.dumps(model_kw),
        ]
    kw = {**data, "features_dir": paths["mags"][top]["features_dir"], "cache": True}
    return [
        "--config",
        "slides/abmil_synthetic",
        "--model.init_args.model",
        method,
        "--model.init_args.model_kwargs",
        json.dumps({"in_dim": FEATURE_DIM, **MIL_KWARGS[method]}),
        "--data.init_args.dataset_kwargs",
        json.dumps(kw),
    ]


def train(
    method: str, paths: dict[str, Any], spec: dict[str, Any], minutes: float, root: Path
) -> dict[str, Any]:
    """One ``needlework fit`` (+ test at the best checkpoint) under ``minutes`` of training."""
    runs = root / "runs"
    seconds = max(1, round(minutes * 60))
    max_time = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    args = [
        "fit",
        *fit_args(method, paths, spec),
        "--runs_dir",
        runs,
        "--run_name",
        method,
        "--trainer.max_time",
        max_time,
        "--trainer.max_epochs",
        10000,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    before = set((runs / method).glob("*/metrics.json")) if (runs / method).exists() else set()
    wall = _needlework(args, root / f"fit_{method}.log")
    (metrics_path,) = set((runs / method).glob("*/metrics.json")) - before
    metrics = json.loads(metrics_path.read_text())
    test = metrics.get("test", {})
    return {
        "fit_wall_s": wall,
        "fit_s": metrics["fit"]["seconds"],
        "epochs": metrics["fit"]["epochs"],
        "steps": metrics["fit"]["steps"],
        "test_acc": test.get("test/acc"),
        "test_auroc": test.get("test/auroc"),
        "checkpoint": metrics["fit"]["best_checkpoint"],
        "run_dir": str(metrics_path.parent),
    }


def lesion_polygons(cohort: Path, slide_id: str) -> list[np.ndarray]:
    path = cohort / "annotations" / f"{slide_id}.geojson"
    if not path.exists():
        return []
    feats = json.loads(path.read_text())["features"]
    return [np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64) for f in feats]


def box_hits(corners: np.ndarray, side: float, polygons: list[np.ndarray]) -> np.ndarray:
    """``(N,)`` bool: does the level-0 square ``[x, x + side) × [y, y + side)`` overlap any polygon.

    Overlap = a polygon vertex inside the square or a square corner inside the polygon (exact for the
    convex, densely sampled lesion outlines)."""
    from matplotlib.path import Path as MplPath

    hits = np.zeros(len(corners), dtype=bool)
    offsets = np.array([[0, 0], [side, 0], [0, side], [side, side], [side / 2, side / 2]])
    for poly in polygons:
        inside = (poly[None, :, 0] >= corners[:, :1]) & (poly[None, :, 0] < corners[:, :1] + side)
        inside &= (poly[None, :, 1] >= corners[:, 1:]) & (poly[None, :, 1] < corners[:, 1:] + side)
        path = MplPath(poly)
        pts = (corners[:, None, :] + offsets[None]).reshape(-1, 2)
        hits |= inside.any(1) | path.contains_points(pts).reshape(len(corners), -1).any(1)
    return hits


def localise(method: str, run: dict[str, Any], paths: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Localisation on the positive test slides from the best checkpoint (see the module docstring)."""
    import torch

    import needlework

    if method == "sparseconvmil":
        return {
            "loc": None,
            "loc_chance": None,
            "loc_slides": 0,
            "loc_note": "global mean pooling: no attention",
        }
    cohort = Path(paths["cohort"])
    model = needlework.load_model(run["checkpoint"]).eval()
    hits, chance, n = 0, [], 0
    for slide_id, scores, corners, side in _scored_tiles(method, model, paths, spec):
        polygons = lesion_polygons(cohort, slide_id)
        if not polygons:
            continue
        keep = np.isfinite(scores) & (scores > 0)
        tile_hits = box_hits(corners[keep], side, polygons)
        hits += bool(tile_hits[int(np.argmax(scores[keep]))])
        chance.append(float(tile_hits.mean()))
        n += 1
    torch.set_grad_enabled(True)
    return {
        "loc": hits / n if n else None,
        "loc_chance": float(np.mean(chance)) if chance else None,
        "loc_slides": n,
    }


def _positive_test_slides(paths: dict[str, Any]) -> list[str]:
    import csv

    from needlework.data.splits import read_split_file

    with open(Path(paths["cohort"]) / "labels.csv") as f:
        labels = {r["slide_id"]: int(r["label"]) for r in csv.DictReader(f)}
    test = read_split_file(Path(paths["splits"]) / "splits_0.csv")["test"]
    return [s for s in test if labels.get(s) == 1]


def _scored_tiles(method: str, model: Any, paths: dict[str, Any], spec: dict[str, Any]) -> Any:
    """Yield ``(slide_id, scores (N,), level-0 corners (N, 2), side)`` for the positive test slides."""
    import torch

    from needlework.models.base import route_batch

    torch.set_grad_enabled(False)
    cohort = Path(paths["cohort"])
    positives = _positive_test_slides(paths)
    if method in PIXEL:
        import yaml

        from needlework.configs import resolve_config
        from needlework.slides.pixel_heatmap import pixel_attention_tiles, slide_pixel_batch

        config = yaml.safe_load(resolve_config(PIXEL[method]).read_text())
        kw = config["data"]["init_args"]["dataset_kwargs"]
        overrides = _mpp_overrides(cohort / "mpp_overrides.csv")
        for slide_id in positives:
            batch = slide_pixel_batch(
                next((cohort / "slides").glob(f"{slide_id}.*")),
                kw["low_mpp"],
                kw["high_mpp"],
                kw["patch_size"],
                mpp_override=overrides.get(slide_id),
                slide_id=slide_id,
            )
            out = model(**route_batch(model.forward, batch))
            scores, corners, side = pixel_attention_tiles(out, batch["x_high"], 0, kw["patch_size"])
            yield slide_id, scores, corners.astype(np.float64), float(side)
        return
    import needlework

    mags = spec["mags"]
    if method == "zoommil":
        ds = needlework.create_dataset(
            "slide_bags_multimag",
            split="test",
            labels_csv=str(cohort / "labels.csv"),
            split_file=str(Path(paths["splits"]) / "splits_0.csv"),
            features_dirs=[paths["mags"][m]["features_dir"] for m in mags],
        )
        collate, mag = needlework.registry.get_collate("pad_bag_levels"), mags[0]
    else:
        ds = needlework.create_dataset(
            "slide_bags",
            split="test",
            labels_csv=str(cohort / "labels.csv"),
            split_file=str(Path(paths["splits"]) / "splits_0.csv"),
            features_dir=paths["mags"][mags[-1]]["features_dir"],
        )
        collate, mag = needlework.registry.get_collate("pad_bags"), mags[-1]
    side = spec["patch_size"] * 40 / mag  # level-0 px of a tile (0.25 µm/px = 40×)
    for i in range(len(ds)):
        item = ds[i]
        if item.get("slide_id") not in positives:
            continue
        batch = collate([item])
        out = model(**route_batch(model.forward, batch))
        yield item["slide_id"], out["attention"][0].float().numpy(), batch["coords"][0].double().numpy(), side


def _mpp_overrides(path: Path) -> dict[str, float]:
    import csv

    if not path.exists():
        return {}
    with open(path) as f:
        return {Path(r["wsi"]).stem: float(r["mpp"]) for r in csv.DictReader(f)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def total_seconds(method: str, row: dict[str, Any], prep: dict[str, Any], spec: dict[str, Any]) -> float:
    """Wall time a user spends: fit + test, plus tiling and embedding every tile it reads (features)."""
    if method in PIXEL:
        return row["fit_wall_s"]
    mags = spec["mags"] if method == "zoommil" else spec["mags"][-1:]
    pre = sum(prep["mags"][m]["tile_s"] + prep["mags"][m]["embed_s"] for m in mags)
    return row["fit_wall_s"] + pre


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, d: int = 3) -> str:
        return "—" if v is None else f"{v:.{d}f}"

    lines = [
        "| model | input | test acc | test AUROC | localisation (chance) | epochs | total wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loc = "—" if r["loc"] is None else f"{r['loc']:.2f} ({r['loc_chance']:.2f})"
        lines.append(
            f"| {r['method']} | {r['input']} | {f(r['test_acc'])} | {f(r['test_auroc'])} | {loc} | "
            f"{r['epochs']} | {r['total_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--minutes", type=float, default=4.0, help="training budget of every model")
    p.add_argument("--n-slides", type=int, default=SPEC["n_slides"])
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $NEEDLEWORK_CACHE/bench_side_by_side"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "slide_side_by_side.json")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each fit (OMP_NUM_THREADS)")
    p.add_argument(
        "--quick", action="store_true", help="10 small slides, seconds of training: checks the script"
    )
    p.add_argument("--force", action="store_true", help="redo models already in --out")
    args = p.parse_args(argv)
    spec = {**SPEC, "n_slides": args.n_slides, **(QUICK if args.quick else {})}
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from needlework.data.mnist import cache_dir

    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = (args.cache_dir or cache_dir() / "bench_side_by_side") / key
    root.mkdir(parents=True, exist_ok=True)
    # the lower magnifications only for ZoomMIL
    prep = prepare(spec, root, None if "zoommil" in args.methods else spec["mags"][-1:])
    settings = {"spec": spec, "minutes": args.minutes}
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = [r for r in old.get("rows", []) if old.get("settings") == settings and not args.force]
    for method in args.methods:
        if any(r["method"] == method for r in rows):
            print(f"{method}: already measured (--force redoes it)")
            continue
        print(f"{method}: training {args.minutes:g} min ...", flush=True)
        run = train(method, prep, spec, args.minutes, root)
        row = {
            "method": method,
            "input": "pixels" if method in PIXEL else f"{spec['encoder']} features",
            **run,
            **localise(method, run, prep, spec),
        }
        row["total_s"] = total_seconds(method, row, prep, spec)
        rows.append(row)
        print(
            f"  acc {row['test_acc']}, AUROC {row['test_auroc']}, loc {row['loc']}, "
            f"total {row['total_s']:.0f} s"
        )
        write_json(
            args.out,
            {
                "settings": settings,
                "preparation": prep,
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "platform": platform.platform(),
                    "threads": os.environ.get("OMP_NUM_THREADS"),
                },
                "rows": rows,
            },
        )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
