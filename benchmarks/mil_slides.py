"""Synthetic-slide bags for ``benchmarks/mil.py``: a cohort made by the slide pipeline, cached.

``needlework slides synth`` writes pyramidal BigTIFFs with small planted lesions (DATASETS.md §10), two
slides per patient; ``slides tile`` cuts 64-px tiles at 40× (0.25 µm/px; a lesion of radius 30–60 px
covers a few) from the tissue; ``slides embed`` embeds them with the ``color_stats`` encoder (colour
statistics: cheap on CPU, and the lesions differ in colour); ``slides splits`` writes patient-grouped
stratified folds (the benchmark trains on the train and validation parts of a fold and tests on its test
part). For multi-magnification models (ZoomMIL) :func:`prepare_multimag` also tiles and embeds the same
slides at 10× and 20× with the same patch size (footprints 256 and 128 level-0 px, 4 children per parent
per level), read by the ``slide_bags_multimag`` dataset. The cohort is cached under
``$NEEDLEWORK_CACHE/bench_mil_slides/`` in a folder named by a hash of
the specification.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

SPEC: dict[str, Any] = {
    "width": 2048,
    "height": 1536,
    "slides_per_patient": 2,
    "n_lesions": 3,
    "lesion_radius": [30, 60],
    "target_mag": 40,
    "patch_size": 64,
    "encoder": "color_stats",
    "folds": 4,
    "seed": 0,
}
MULTIMAG = (10, 20, 40)  # magnifications of the multi-level bags, lowest first (the last is target_mag)


def available() -> bool:
    """Whether the slide pipeline (``needlework.slides``) is installed in this checkout."""
    return importlib.util.find_spec("needlework.slides") is not None


def _run(argv: list[str]) -> None:
    from needlework.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise RuntimeError(f"needlework {' '.join(map(str, argv))} failed with exit code {code}")


def prepare(n_slides: int, cache: Path | None = None) -> dict[str, Any]:
    """Build (or reuse) the cohort; returns ``features_dir``, ``labels_csv``, ``splits_dir``, ``folds``,
    ``coord_stride`` (level-0 pixels between tiles)."""
    from needlework.data.mnist import cache_dir

    spec = {**SPEC, "n_slides": n_slides}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = (cache or cache_dir() / "bench_mil_slides") / f"n{n_slides}-{key}"
    done = root / "DONE.json"
    if done.exists() and json.loads(done.read_text()).get("spec") == spec:
        return json.loads(done.read_text())["paths"]
    cohort, job = root / "cohort", root / "job"
    _run(["slides", "synth", "--out_dir", cohort, "--n_slides", n_slides, "--width", spec["width"],
          "--height", spec["height"], "--slides_per_patient", spec["slides_per_patient"],
          "--n_lesions", spec["n_lesions"], "--lesion_radius", json.dumps(list(spec["lesion_radius"])),
          "--seed", spec["seed"]])
    _run(["slides", "tile", "--slides", cohort / "slides", "--job_dir", job,
          "--tiling.target_magnification", spec["target_mag"], "--tiling.patch_size", spec["patch_size"],
          "--mpp_csv", cohort / "mpp_overrides.csv", "--progress", "false"])
    tiling = job / f"{spec['target_mag']}x_{spec['patch_size']}px_0px_overlap"
    _run(["slides", "embed", "--slides", cohort / "slides", "--job_dir", job,
          "--tiling_dir_name", tiling.name, "--encoder", spec["encoder"], "--num_workers", 0,
          "--progress", "false"])
    _run(["slides", "splits", "--labels_csv", cohort / "labels.csv", "--out_dir", root / "splits",
          "--k", spec["folds"], "--seed", spec["seed"]])
    paths = {
        "features_dir": str(tiling / f"features_{spec['encoder']}"),
        "labels_csv": str(cohort / "labels.csv"),
        "splits_dir": str(root / "splits"),
        "folds": spec["folds"],
        "coord_stride": spec["patch_size"],  # 40× tiles: level-0 pixels between neighbours
    }
    done.write_text(json.dumps({"spec": spec, "paths": paths}, indent=2))
    return paths


def prepare_multimag(n_slides: int, cache: Path | None = None) -> dict[str, Any]:
    """:func:`prepare`, plus tilings and ``color_stats`` features at every magnification of
    :data:`MULTIMAG`; adds ``features_dirs`` (lowest magnification first) to the returned paths."""
    paths = prepare(n_slides, cache)
    tiling_40 = Path(paths["features_dir"]).parent
    job, root = tiling_40.parent, tiling_40.parent.parent
    cohort = root / "cohort"
    done = root / "DONE_multimag.json"
    if done.exists() and json.loads(done.read_text()).get("mags") == list(MULTIMAG):
        return {**paths, "features_dirs": json.loads(done.read_text())["features_dirs"]}
    dirs = []
    for mag in MULTIMAG:
        tiling = job / f"{mag}x_{SPEC['patch_size']}px_0px_overlap"
        if mag != SPEC["target_mag"]:
            _run(["slides", "tile", "--slides", cohort / "slides", "--job_dir", job,
                  "--tiling.target_magnification", mag, "--tiling.patch_size", SPEC["patch_size"],
                  "--mpp_csv", cohort / "mpp_overrides.csv", "--progress", "false"])
            _run(["slides", "embed", "--slides", cohort / "slides", "--job_dir", job,
                  "--tiling_dir_name", tiling.name, "--encoder", SPEC["encoder"], "--num_workers", 0,
                  "--progress", "false"])
        dirs.append(str(tiling / f"features_{SPEC['encoder']}"))
    done.write_text(json.dumps({"mags": list(MULTIMAG), "features_dirs": dirs}, indent=2))
    return {**paths, "features_dirs": dirs}
