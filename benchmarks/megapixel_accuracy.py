"""Accuracy of ATS, the dense CNN, DPS and IPS on CPU-sized Megapixel MNIST under one wall-clock budget.

Each method trains through ``needlework fit --config configs/megapixel_mnist/<name>.yaml`` with the same
``trainer.max_time`` (DPS and IPS also stop at their configs' ``max_epochs``: their sigma schedule and
step counts are tied to it); the test split is evaluated at the best validation checkpoint. The script
then reads every run's ``metrics.json`` and writes one table (stdout) and
``benchmarks/results/megapixel_accuracy.json``.

Usage:
    python benchmarks/megapixel_accuracy.py --budget 00:01:00:00            # one after another
    python benchmarks/megapixel_accuracy.py --budget 00:00:06:30 --concurrent --workers 2   # one GPU
    python benchmarks/megapixel_accuracy.py --collect runs                   # table of finished runs

``--concurrent`` starts all runs at once (they share the device; each still gets the same wall-clock
budget); without it the runs go one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: config name -> (dataset variant, task) for the table
CONFIGS = {
    "ats": ("ATS variant", "majority (10 classes)"),
    "dense": ("ATS variant", "majority (10 classes)"),
    "dps_ats": ("ATS variant", "majority (10 classes)"),
    "ips_ats": ("ATS variant", "majority (10 classes)"),
    "dps": ("IPS variant", "majority (10 classes)"),
    "ips": ("IPS variant", "4 tasks (mean accuracy)"),
}


def run_all(names: list[str], budget: str, concurrent: bool, workers: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    logs = ROOT / "runs" / "megapixel_accuracy_logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in names:
        cmd = [
            sys.executable, "-m", "needlework", "fit", "--config", f"configs/megapixel_mnist/{name}.yaml",
            "--trainer.max_time", budget, "--data.init_args.num_workers", str(workers),
            "--trainer.enable_progress_bar", "false",
        ]  # fmt: skip
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed after the process ends
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((name, proc, log))
        if not concurrent:
            proc.wait()
    for name, proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            print(f"{name}: exit code {proc.returncode}, see {logs / (name + '.log')}", file=sys.stderr)


def latest_metrics(runs: Path, name: str) -> tuple[Path, dict[str, Any]] | None:
    folders = sorted((runs / f"megapixel_mnist_{name}").glob("*/metrics.json"))
    if not folders:
        return None
    return folders[-1].parent, json.loads(folders[-1].read_text())


def collect(runs: Path, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        found = latest_metrics(runs, name)
        if found is None:
            print(f"{name}: no finished run under {runs}", file=sys.stderr)
            continue
        folder, metrics = found
        test, fit = metrics.get("test", {}), metrics.get("fit", {})
        versions_file = folder / "versions.json"
        versions = json.loads(versions_file.read_text()) if versions_file.exists() else {}
        per_task = {k.split("/")[1]: v for k, v in test.items() if k.count("/") == 2 and k.endswith("/acc")}
        rows.append({
            "config": f"configs/megapixel_mnist/{name}.yaml",
            "variant": CONFIGS[name][0],
            "task": CONFIGS[name][1],
            "test_acc": test.get("test/acc"),
            "test_error": None if test.get("test/acc") is None else 1 - test["test/acc"],
            "test_auroc": test.get("test/auroc"),
            "test_acc_per_task": per_task or None,
            "best_val_acc": fit.get("best_score"),
            "epochs": fit.get("epochs"),
            "versions": versions,
            "run": str(folder.relative_to(runs.parent)),
        })  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--budget", default="00:01:00:00", help="trainer.max_time of every run (DD:HH:MM:SS)")
    p.add_argument("--concurrent", action="store_true", help="start all runs at once (one GPU)")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per run")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    p.add_argument("--collect", type=Path, help="only tabulate the finished runs under this folder")
    p.add_argument("--note", default="", help="free text stored with the results (machine, setting)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "megapixel_accuracy.json")
    args = p.parse_args()
    if args.collect is None:
        run_all(args.configs, args.budget, args.concurrent, args.workers, args.threads)
    runs = args.collect or ROOT / "runs"
    rows = collect(runs, args.configs)
    if not rows:
        print(f"no finished runs under {runs}", file=sys.stderr)
        return 1
    print("\n| config | data | task | test acc | test error | epochs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{Path(r['config']).name}` | {r['variant']} | {r['task']} | {r['test_acc']:.3f} | "
              f"{r['test_error']:.3f} | {r['epochs']} |")  # fmt: skip
    result = {"budget": args.budget, "concurrent": args.concurrent, "note": args.note, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
