"""``needlework slides <verb>``: synth, tile, embed, splits, heatmap, crops, doctor.

Every verb's options are generated from the Python API it wraps (the job dataclasses and function
signatures, with their defaults and docstrings), in LightningCLI's style::

    needlework slides synth --out_dir runs/cohort --n_slides 8
    needlework slides tile --slides runs/cohort/slides --job_dir runs/job \\
        --tiling.target_magnification 20 --tiling.patch_size 256 \\
        --mpp_csv runs/cohort/mpp_overrides.csv --skip_errors true
    needlework slides embed --slides runs/cohort/slides --job_dir runs/job --encoder resnet50_trunc \\
        --weights r50_trunc.pth   # a pretrained name without weights is refused unless --random_weights true
    needlework slides splits --labels_csv runs/cohort/labels.csv --out_dir runs/splits --k 4
    needlework slides tile --print_config > tile.yaml   # then: needlework slides tile --config tile.yaml

Each verb builds only its own parser and imports only its own modules: ``tile`` loads neither torch nor
scipy, ``embed`` loads torch when it embeds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from jsonargparse import ArgumentParser, Namespace

from needlework.cli._parsing import add_group, build, instantiate, new_parser, parse, run_reporting_errors

VERBS = {
    "synth": "write a synthetic cohort (pyramidal BigTIFFs, lesion GeoJSON, labels.csv)",
    "tile": "segment tissue and write tile coordinates (TRIDENT layout)",
    "embed": "embed tiles with an encoder into features_<encoder>/<slide_id>.h5",
    "splits": "patient-grouped stratified k-fold split files from a label CSV",
    "heatmap": "per-tile scores → PNG overlay, raw h5, top-k tiles, QuPath GeoJSON",
    "crops": "needle crops (nCAMELYON-style) from annotated slides",
    "doctor": "check readers, slides' MPP, extras and disk space (= needlework doctor)",
}


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: needlework slides <verb> [options]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, help_ in VERBS.items()]
    lines += ["", "Run 'needlework slides <verb> --help' for a verb's options (with their defaults)."]
    return "\n".join(lines)


# ---- parsers: one per verb, built from the API it calls --------------------------------------------


def _parser(verb: str) -> ArgumentParser:
    return new_parser(f"needlework slides {verb}", VERBS[verb][0].upper() + VERBS[verb][1:] + ".")


def synth_parser() -> ArgumentParser:
    from needlework.slides.synthetic import make_synthetic_cohort

    p = _parser("synth")
    add_group("cohort (make_synthetic_cohort)", p.add_function_arguments, make_synthetic_cohort, None)
    return p


def tile_parser() -> ArgumentParser:
    from needlework.slides.jobs import TileJobConfig, run_tiling

    p = _parser("tile")
    add_group("run (run_tiling)", p.add_function_arguments, run_tiling, None, skip={"cfg"})
    add_group("job (TileJobConfig)", p.add_class_arguments, TileJobConfig, None)
    return p


def embed_parser() -> ArgumentParser:
    from needlework.slides.embed_job import EmbedJobConfig, run_embedding

    p = _parser("embed")
    add_group("run (run_embedding)", p.add_function_arguments, run_embedding, None, skip={"cfg"})
    add_group("job (EmbedJobConfig)", p.add_class_arguments, EmbedJobConfig, None)
    return p


def splits_parser() -> ArgumentParser:
    from needlework.data.splits import create_splits

    p = _parser("splits")
    add_group("splits (create_splits)", p.add_function_arguments, create_splits, None)
    return p


def heatmap_parser() -> ArgumentParser:
    from needlework.cli.heatmap import run_heatmaps

    p = _parser("heatmap")
    add_group("heatmaps (run_heatmaps)", p.add_function_arguments, run_heatmaps, None)
    return p


def crops_parser() -> ArgumentParser:
    from needlework.slides.crops import CropConfig, extract_crops

    p = _parser("crops")
    add_group("run (extract_crops)", p.add_function_arguments, extract_crops, None, skip={"cfg"})
    add_group("crops (CropConfig)", p.add_class_arguments, CropConfig, None)
    return p


# ---- runners ---------------------------------------------------------------------------------------


def _options(cfg: Namespace, skip: tuple[str, ...] = ("config",)) -> dict:
    return {k: v for k, v in vars(cfg).items() if k not in skip and not k.startswith("__")}


def _finish(summary: dict) -> int:
    from needlework.slides.status import format_summary

    print(format_summary(summary))
    # Busy slides were not processed by this run: the job is not finished, so do not report success.
    return 1 if summary["counts"]["failed"] or summary["counts"]["busy"] else 0


def _synth(parser: ArgumentParser, cfg: Namespace) -> int:
    from needlework.slides.synthetic import make_synthetic_cohort

    cfg = instantiate(parser, cfg)
    info = make_synthetic_cohort(**_options(cfg))
    print(
        f"wrote {len(info['slides'])} slides to {info['slides_dir']}\n  labels: {info['labels_csv']}\n"
        f"  MPP overrides: {info['mpp_csv']}\n  lesion annotations: {info['annotations_dir']}"
    )
    return 0


def _tile(parser: ArgumentParser, cfg: Namespace) -> int:
    from needlework.slides.jobs import TileJobConfig, run_tiling

    cfg = instantiate(parser, cfg)
    job = build(parser, TileJobConfig, cfg)
    summary = run_tiling(cfg.slides, job, cfg.mpp_csv, cfg.skip_errors, cfg.ray_address, cfg.wait_busy_s)
    print(f"tiles in {job.tiling_dir / 'patches'}")
    return _finish(summary)


def _embed(parser: ArgumentParser, cfg: Namespace) -> int:
    from needlework.slides.embed_job import EmbedJobConfig, run_embedding

    cfg = instantiate(parser, cfg)
    job = build(parser, EmbedJobConfig, cfg)
    summary = run_embedding(cfg.slides, job, cfg.skip_errors, cfg.ray_address, cfg.wait_busy_s)
    print(f"features in {job.features_dir}")
    return _finish(summary)


def _splits(parser: ArgumentParser, cfg: Namespace) -> int:
    from needlework.data.splits import create_splits

    cfg = instantiate(parser, cfg)
    paths = create_splits(**_options(cfg))
    print(f"wrote {len(paths)} folds to {cfg.out_dir} (splits_<i>.csv, _bool.csv, _descriptor.csv)")
    return 0


def _heatmap(parser: ArgumentParser, cfg: Namespace) -> int:
    from needlework.cli.heatmap import run_heatmaps

    cfg = instantiate(parser, cfg)
    return 0 if run_heatmaps(**_options(cfg)) else 1


def _crops(parser: ArgumentParser, cfg: Namespace) -> int:
    from collections import Counter

    from needlework.slides.crops import CropConfig, extract_crops

    cfg = instantiate(parser, cfg)
    crop = build(parser, CropConfig, cfg)
    rows = extract_crops(
        cfg.slides,
        cfg.annotations_dir,
        cfg.labels_csv,
        cfg.out_dir,
        crop,
        mpp_csv=cfg.mpp_csv,
        balance=cfg.balance,
        reader=cfg.reader,
    )
    for (slide_id, label), n in sorted(Counter((r["slide_id"], r["label"]) for r in rows).items()):
        print(f"{slide_id}: {n} {'positive' if label else 'negative'} crops")
    print(f"{len(rows)} crops indexed in {cfg.out_dir}/crops.csv")
    return 0


COMMANDS: dict[str, tuple[Callable[[], ArgumentParser], Callable[[ArgumentParser, Namespace], int]]] = {
    "synth": (synth_parser, _synth),
    "tile": (tile_parser, _tile),
    "embed": (embed_parser, _embed),
    "splits": (splits_parser, _splits),
    "heatmap": (heatmap_parser, _heatmap),
    "crops": (crops_parser, _crops),
}


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Bad input the user fixes (status 2): wrong paths, bad CSVs, a slide named that cannot be read."""
    from needlework.slides.mpp import MissingMPPError
    from needlework.slides.reader import SlideOpenError

    return (MissingMPPError, SlideOpenError, FileNotFoundError, ValueError, KeyError)


def _failures() -> tuple[type[BaseException], ...]:
    """Work that failed (status 1): a slide of the run failed and --skip_errors was off."""
    from needlework.slides.stage_runner import SlideJobError

    return (SlideJobError,)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "doctor":
        from needlework.cli.doctor import main as doctor_main

        return doctor_main(argv[1:], prog="needlework slides doctor")
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"needlework slides: unknown verb {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    build_parser, run = COMMANDS[argv[0]]
    parser = build_parser()
    cfg = parse(parser, argv[1:])
    return run_reporting_errors(lambda: run(parser, cfg), _expected_errors(), _failures())
