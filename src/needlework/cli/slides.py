"""``needlework slides <verb>``: synth, tile, embed, splits, heatmap, crops, doctor.

Typical workflow::

    needlework slides synth runs/cohort --n-slides 8
    needlework slides tile runs/cohort/slides --job-dir runs/job --target-mag 20 --patch-size 256 \\
        --mpp-csv runs/cohort/mpp_overrides.csv --skip-errors
    needlework slides embed runs/cohort/slides --job-dir runs/job --encoder resnet50_trunc
    needlework slides splits runs/cohort/labels.csv --out runs/splits --k 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VERBS = {
    "synth": "write a synthetic cohort (pyramidal BigTIFFs, lesion GeoJSON, labels.csv)",
    "tile": "segment tissue and write tile coordinates (TRIDENT layout)",
    "embed": "embed tiles with an encoder into features_<encoder>/<slide_id>.h5",
    "splits": "patient-grouped stratified k-fold split files from a label CSV",
    "heatmap": "per-tile scores → PNG overlay, raw h5, top-k tiles, QuPath GeoJSON",
    "crops": "needle crops (nCAMELYON-style) from annotated slides",
    "doctor": "check readers, slides' MPP, extras and disk space",
}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", help="folder of slides")
    p.add_argument("--job-dir", required=True, help="output folder of the job")
    p.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"])
    p.add_argument("--overwrite", action="store_true", help="redo slides that are already finished")
    p.add_argument(
        "--skip-errors", action="store_true", help="continue past failing slides; list them at the end"
    )
    p.add_argument("--ray", metavar="ADDRESS", help="shard slides over Ray ('local' or a cluster address)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="needlework slides", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_ in VERBS.items():
        if verb != "doctor":
            sub.add_parser(verb, help=help_)
    sub.add_parser("doctor", help=VERBS["doctor"], add_help=False)

    p = sub.choices["synth"]
    p.add_argument("out")
    p.add_argument("--n-slides", type=int, default=8)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--height", type=int, default=1536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--slides-per-patient", type=int, default=2)
    p.add_argument("--n-lesions", type=int, default=2)
    p.add_argument("--lesion-radius", type=int, nargs=2, default=(20, 48), metavar=("MIN", "MAX"))
    p.add_argument("--no-mpp-slides", type=int, default=1, help="slides written without resolution tags")

    p = sub.choices["tile"]
    _add_run_options(p)
    p.add_argument("--target-mag", type=float, default=20.0, help="target magnification (mpp ≈ 10 / mag)")
    p.add_argument("--target-mpp", type=float, help="target µm/px (overrides --target-mag)")
    p.add_argument("--patch-size", type=int, default=256, help="tile side in pixels at the target resolution")
    p.add_argument("--overlap", type=int, default=0, help="overlap in pixels at the target resolution")
    p.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept tile")
    p.add_argument("--mpp-csv", help="per-slide MPP override CSV (columns wsi,mpp or slide_id,mpp)")
    p.add_argument(
        "--tissue-geojson", help="folder of <slide_id>.geojson tissue polygons replacing segmentation"
    )
    from needlework.slides.tissue import TissueParams

    defaults = TissueParams()
    p.add_argument("--seg-mpp", type=float, default=defaults.seg_mpp, help="segmentation thumbnail µm/px")
    p.add_argument("--seg-threshold", type=float, help="fixed saturation threshold (default: Otsu)")
    p.add_argument("--seg-min-saturation", type=float, default=defaults.min_saturation)
    p.add_argument("--seg-median-um", type=float, default=defaults.median_um)
    p.add_argument("--seg-close-um", type=float, default=defaults.close_um)
    p.add_argument("--seg-open-um", type=float, default=defaults.open_um)
    p.add_argument("--seg-min-area-um2", type=float, default=defaults.min_area_um2)
    p.add_argument("--seg-max-hole-area-um2", type=float, help="fill only smaller holes (default: all)")
    p.add_argument("--seg-no-fill-holes", action="store_true")

    p = sub.choices["embed"]
    _add_run_options(p)
    p.add_argument("--tiling", help="tiling folder name under --job-dir (default: the only one)")
    p.add_argument(
        "--encoder",
        default="resnet50_trunc",
        help="registered name (needlework list encoders) or timm:NAME / torchvision:NAME / hf:REPO",
    )
    p.add_argument("--weights", help="local state-dict file for the encoder")
    p.add_argument("--encoder-kwargs", default="{}", help="JSON dict of encoder arguments")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes reading tiles")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--tile-size", type=int, help="resize tiles to this side for the encoder")
    p.add_argument("--num-threads", type=int, help="torch threads per process")

    p = sub.choices["splits"]
    p.add_argument("labels_csv")
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-val", action="store_true", help="no validation fold (train on k-1 folds)")
    p.add_argument("--label-frac", type=float, default=1.0)

    p = sub.choices["heatmap"]
    p.add_argument("--slide", required=True, help="slide file, or folder of slides (matched by slide id)")
    p.add_argument("--scores", help="h5 (file or folder) with coords + scores (or CLAM attention_scores)")
    p.add_argument("--features", help="features h5 (file or folder) to score with --checkpoint")
    p.add_argument("--checkpoint", help="model state dict or Lightning checkpoint")
    p.add_argument("--model", help="registered model name (default: from the Lightning checkpoint)")
    p.add_argument("--model-kwargs", default=None, help="JSON dict of model arguments")
    p.add_argument("--out", required=True)
    p.add_argument("--formats", default="png,h5,tiles,geojson")
    p.add_argument("--class-index", type=int, default=-1)
    p.add_argument("--normalisation", default="percentile", choices=["percentile", "minmax", "none"])
    p.add_argument("--cmap", default="viridis")
    p.add_argument("--alpha", type=float, default=0.4)
    p.add_argument("--smooth", type=float, default=0.0, help="Gaussian sigma in overlay pixels")
    p.add_argument("--max-side", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--bottom-k", type=int, default=0)
    p.add_argument("--geojson-top-k", type=int)
    p.add_argument("--geojson-min-score", type=float)

    p = sub.choices["crops"]
    p.add_argument("slides")
    p.add_argument("--annotations", required=True, help="folder of <slide_id>.geojson lesion annotations")
    p.add_argument("--labels", required=True, help="label CSV; slides with label 0 give negatives")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--target-mpp", type=float, default=2.0)
    p.add_argument("--o2i", type=float, nargs=2, default=(0.01, 0.10), metavar=("LOW", "HIGH"))
    p.add_argument("--max-per-component", type=int, default=50)
    p.add_argument("--negatives-per-slide", type=int, default=100)
    p.add_argument("--lesion-class", action="append", help="GeoJSON class name(s) of lesions (default: all)")
    p.add_argument("--mpp-csv")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--balance", action="store_true", help="equal numbers of positives and negatives")
    return parser


def main(argv: list[str]) -> int:
    if argv and argv[0] == "doctor":
        from needlework.cli.doctor import main as doctor_main

        return doctor_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    return {
        "synth": _synth,
        "tile": _tile,
        "embed": _embed,
        "splits": _splits,
        "heatmap": _heatmap,
        "crops": _crops,
    }[args.verb](args)


def _synth(args: argparse.Namespace) -> int:
    from needlework.slides.synthetic import make_synthetic_cohort

    info = make_synthetic_cohort(
        args.out,
        args.n_slides,
        args.width,
        args.height,
        args.seed,
        args.positive_fraction,
        args.slides_per_patient,
        args.n_lesions,
        tuple(args.lesion_radius),
        args.no_mpp_slides,
    )
    print(
        f"wrote {len(info['slides'])} slides to {info['slides_dir']}\n  labels: {info['labels_csv']}\n"
        f"  MPP overrides: {info['mpp_csv']}\n  lesion annotations: {info['annotations_dir']}"
    )
    return 0


def _finish(summary: dict) -> int:
    from needlework.slides.status import format_summary

    print(format_summary(summary))
    return 1 if summary["counts"]["failed"] else 0


def _tile(args: argparse.Namespace) -> int:
    from needlework.slides.jobs import SlideJobError, TileJobConfig, run_tiling
    from needlework.slides.tiling import TilingConfig
    from needlework.slides.tissue import TissueParams

    tissue = TissueParams(
        seg_mpp=args.seg_mpp,
        threshold=args.seg_threshold,
        min_saturation=args.seg_min_saturation,
        median_um=args.seg_median_um,
        close_um=args.seg_close_um,
        open_um=args.seg_open_um,
        min_area_um2=args.seg_min_area_um2,
        max_hole_area_um2=args.seg_max_hole_area_um2,
        fill_holes=not args.seg_no_fill_holes,
    )
    tiling = TilingConfig(
        target_magnification=args.target_mag,
        target_mpp=args.target_mpp,
        patch_size=args.patch_size,
        overlap=args.overlap,
        min_tissue_fraction=args.min_tissue,
    )
    cfg = TileJobConfig(
        args.job_dir,
        tiling,
        tissue,
        args.reader,
        args.tissue_geojson,
        args.overwrite,
        progress=not args.no_progress,
    )
    try:
        summary = run_tiling(args.slides, cfg, args.mpp_csv, args.skip_errors, args.ray)
    except SlideJobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"tiles in {cfg.tiling_dir / 'patches'}")
    return _finish(summary)


def _embed(args: argparse.Namespace) -> int:
    from needlework.slides.embed_job import EmbedJobConfig, run_embedding
    from needlework.slides.jobs import SlideJobError, find_tiling_dir

    tiling = args.tiling or find_tiling_dir(args.job_dir)
    cfg = EmbedJobConfig(
        args.job_dir,
        tiling,
        args.encoder,
        args.weights,
        json.loads(args.encoder_kwargs),
        args.batch_size,
        args.num_workers,
        args.precision,
        args.device,
        args.tile_size,
        args.reader,
        args.num_threads,
        args.overwrite,
        progress=not args.no_progress,
    )
    try:
        summary = run_embedding(args.slides, cfg, args.skip_errors, args.ray)
    except SlideJobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"features in {cfg.features_dir}")
    return _finish(summary)


def _splits(args: argparse.Namespace) -> int:
    from needlework.data.splits import create_splits

    paths = create_splits(args.labels_csv, args.out, args.k, args.seed, not args.no_val, args.label_frac)
    print(f"wrote {len(paths)} folds to {args.out} (splits_<i>.csv, _bool.csv, _descriptor.csv)")
    return 0


def _heatmap(args: argparse.Namespace) -> int:
    from needlework.cli.heatmap import run_heatmaps

    return run_heatmaps(args)


def _crops(args: argparse.Namespace) -> int:
    from needlework.data.splits import read_label_csv
    from needlework.slides.crops import CropConfig, balance_crops, extract_slide_crops, write_crop_index
    from needlework.slides.jobs import make_tasks

    cfg = CropConfig(
        size=args.size,
        target_mpp=args.target_mpp,
        o2i=tuple(args.o2i),
        max_per_component=args.max_per_component,
        negatives_per_slide=args.negatives_per_slide,
        lesion_classes=tuple(args.lesion_class) if args.lesion_class else None,
        seed=args.seed,
    )
    labels = {r["slide_id"]: r for r in read_label_csv(args.labels)}
    tasks, _ = make_tasks(args.slides, args.mpp_csv)
    rows = []
    for task in tasks:
        if task.slide_id not in labels:
            print(f"warning: {task.slide_id} is not in {args.labels}; skipped", file=sys.stderr)
            continue
        negative = str(labels[task.slide_id]["label"]) in ("0", "negative")
        ann = Path(args.annotations) / f"{task.slide_id}.geojson"
        got = extract_slide_crops(
            task.slide_path, args.out, cfg, None if negative else ann, negative, task.mpp_override
        )
        rows += [{**r, "case_id": labels[task.slide_id]["case_id"]} for r in got]
        print(f"{task.slide_id}: {len(got)} {'negative' if negative else 'positive'} crops")
    if args.balance:
        rows = balance_crops(rows, args.seed, key=None)
    path = write_crop_index(rows, Path(args.out) / "crops.csv")
    print(f"{len(rows)} crops indexed in {path}")
    return 0
