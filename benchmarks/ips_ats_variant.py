"""Why IPS stays at chance on the ATS variant of Megapixel MNIST (issue 13, item 6): one run per hypothesis.

``configs/megapixel_mnist/ips_ats.yaml`` (IPS, majority digit of the ATS variant, the paper's settings:
dropout 0.1, weight decay 0.1, 1-D positional encoding) stayed at ln 10 for 20 epochs on a GPU, while the
same model learns the IPS variant when trained on its four tasks together. Each variant below changes one
thing and trains under the same wall-clock budget through ``needlework fit`` (a subprocess each, so runs
are independent and a crash costs one row); the test split is evaluated at the best validation
checkpoint. Rows go to ``benchmarks/results/ips_ats_variant.json`` after every run (atomic rename;
finished variants are skipped on a rerun).

    python benchmarks/ips_ats_variant.py --minutes 8 --jobs 2
    python benchmarks/ips_ats_variant.py --variants reference multitask --minutes 20
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ips_ats_variant.json"
# the needle-MNIST IPS recipe (configs/needle_mnist/ips.yaml) on the 50-px patches of this dataset
NEEDLE_RECIPE = [
    "--model.init_args.model_kwargs.dropout", "0.0", "--model.init_args.model_kwargs.pos_encoding", "none",
    "--model.init_args.optimizer", "adam", "--model.init_args.weight_decay", "0.0",
]  # fmt: skip
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    # name: (config, what it tests, overrides)
    "reference": ("megapixel_mnist/ips_ats", "the config as committed (majority only)", []),
    "multitask": ("megapixel_mnist/ips_ats_multitask",
                  "the four IPS-variant tasks supervise the same selection", []),
    "recipe": ("megapixel_mnist/ips_ats", "majority only, the needle-MNIST recipe (no dropout, no weight "
               "decay, no positional encoding)", NEEDLE_RECIPE),
    "ips_variant": ("megapixel_mnist/ips_ats", "majority only on the IPS variant (noise under the digits)",
                    ["--data.init_args.dataset", "megapixel_mnist_ips"]),
}  # fmt: skip


def run(name: str, minutes: float, threads: int, runs_dir: Path, extra: list[str]) -> dict[str, Any] | None:
    config, purpose, overrides = VARIANTS[name]
    secs = int(round(minutes * 60))
    cmd = [sys.executable, "-m", "needlework", "fit", "--config", config,
           "--trainer.max_time", f"00:00:{secs // 60:02d}:{secs % 60:02d}", "--trainer.max_epochs", "-1",
           "--model.init_args.scheduler", "cosine_time", "--trainer.enable_progress_bar", "false",
           "--runs_dir", str(runs_dir), "--run_name", name, *overrides, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    log = runs_dir / f"{name}.log"
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        print(" ".join(cmd), file=f, flush=True)
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    versions = sorted(p for p in (runs_dir / name).glob("*") if (p / "metrics.json").exists())
    if proc.returncode != 0 or not versions:
        print(f"  FAILED {name} (exit {proc.returncode}); log: {log}", flush=True)
        return None
    version = versions[-1]
    metrics = json.loads((version / "metrics.json").read_text())
    test = metrics["test"]
    acc = test.get("test/majority/acc", test.get("test/acc"))
    # the training loss per epoch: did it ever leave ln 10?
    losses = []
    with open(version / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key in ("train/loss_majority_epoch", "train/loss_epoch"):
                if row.get(key):
                    losses.append(float(row[key]))
                    break
    return {"variant": name, "config": config, "tests": purpose, "overrides": overrides, "minutes": minutes,
            "test_majority_acc": round(float(acc), 4),
            "test": {k: round(float(v), 4) for k, v in test.items()},
            "epochs": metrics["fit"]["epochs"], "steps": metrics["fit"]["steps"],
            "train_loss_first_epoch": round(losses[0], 4) if losses else None,
            "train_loss_last_epoch": round(losses[-1], 4) if losses else None,
            "ln10": round(math.log(10), 4), "wall_seconds": round(time.perf_counter() - start, 1),
            "threads": threads}  # fmt: skip


def save(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(sorted(rows, key=lambda r: r["variant"]), f, indent=1)
    os.replace(tmp, out)  # a crash never leaves half a file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each gets cores / jobs threads)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "ips_ats_variant")
    p.add_argument("--out", type=Path, default=OUT, help="results JSON")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="overrides for every run")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.jobs < 1:
        p.error("--minutes must be positive and --jobs at least 1")
    try:
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {args.out} is not valid JSON ({err}); move it away") from None
    done = {(r["variant"], r["minutes"]) for r in rows}
    todo = [v for v in args.variants if (v, args.minutes) not in done]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(todo)} runs to go, {args.jobs} at once, {threads} threads each")
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, v, args.minutes, threads, args.runs_dir, args.extra) for v in todo]
        for fut in as_completed(futures):
            row = fut.result()
            if row is not None:
                rows = [r for r in rows if (r["variant"], r["minutes"]) != (row["variant"], row["minutes"])]
                save(rows := [*rows, row], args.out)
                print(f"  {row['variant']:<12} majority acc {row['test_majority_acc']:.3f}  train loss "
                      f"{row['train_loss_first_epoch']} → {row['train_loss_last_epoch']} (ln 10 = 2.303)  "
                      f"{row['epochs']} epochs", flush=True)
    print("| variant | tests | majority test acc | train loss first → last epoch | epochs |")
    print("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["variant"]):
        print(f"| {r['variant']} | {r['tests']} | {r['test_majority_acc']:.3f} | "
              f"{r['train_loss_first_epoch']} → {r['train_loss_last_epoch']} | {r['epochs']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
