"""``needlework summarize RUN_DIR ...``: mean ± std of the metrics of repeated runs.

Every ``metrics.json`` below the given folders (one per run version, written by ``needlework fit``)
contributes one value per metric of the chosen section (``test`` by default; ``validate`` or the ``fit``
section's ``val_last``). Prints one row per metric and optionally writes the summary as JSON.

Example:
    for s in 0 1 2; do needlework fit --config configs/mil/abmil.yaml --seed_everything $s; done
    needlework summarize runs/mil_abmil
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def collect(folders: list[str | Path], section: str = "test") -> list[dict[str, float]]:
    """The metric dicts of ``section`` from every ``metrics.json`` below ``folders``."""
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"run folder {folder} does not exist")
        for path in sorted(folder.rglob("metrics.json")):
            data = json.loads(path.read_text())
            values = data.get("fit", {}).get("val_last") if section == "val_last" else data.get(section)
            if values:
                runs.append({k: float(v) for k, v in values.items()})
    return runs


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "std", "n"}}`` with the sample standard deviation (0 for a single run)."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({k for run in runs for k in run}):
        values = [run[key] for run in runs if key in run]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": math.sqrt(var), "n": len(values)}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="needlework summarize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run folders (searched recursively for metrics.json)")
    parser.add_argument("--section", default="test", choices=["test", "validate", "val_last"])
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    runs = collect(args.folders, args.section)
    if not runs:
        print(f"no '{args.section}' metrics found under {args.folders}; did the runs finish?")
        return 1
    summary = summarize(runs)
    width = max(len(k) for k in summary)
    print(f"{len(runs)} run(s), section {args.section!r}")
    for key, s in summary.items():
        print(f"  {key:<{width}}  {s['mean']:.4f} ± {s['std']:.4f}  (n={s['n']})")
    if args.json:
        from needlework.training.run_info import write_json

        write_json(args.json, {"section": args.section, "runs": runs, "summary": summary})
    return 0
