"""Training throughput of ``needlework fit`` on 1 and 2 processes (Lightning DDP): the scaling figure.

Each point is a real ``python -m needlework fit`` of the packaged dense needle-MNIST config (BagNet,
``--canvas`` px, fresh images every epoch) in a fresh process group, without validation or test. Its
``metrics.json`` gives the fit time; to leave out start-up (process launch, DDP set-up, the first
epoch's allocations) every setting runs ``--epochs`` and ``2 × --epochs`` epochs and the throughput is
the difference: ``images / s = train_size × epochs / (t(2 × epochs) − t(epochs))``. The per-process batch
stays ``--batch-size`` (the global batch grows with the processes, as with ``--trainer.devices``).

CPU (gloo) by default, each process with ``--threads`` torch threads; ``--accelerator gpu`` uses CUDA
(NCCL) where available.

    PYTHONPATH=src python benchmarks/scaling.py                  # CPU, 1 and 2 processes
    PYTHONPATH=src python benchmarks/scaling.py --quick          # seconds: checks the script
    PYTHONPATH=src python benchmarks/scaling.py --accelerator gpu --processes 1 2 4

Writes ``benchmarks/results/scaling.json`` (``--out``) and prints the ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"receptive_field": 33, "width": 0.25, "blocks": [1, 1, 1, 1], "pooling": "max"}


def fit_seconds(processes: int, epochs: int, args: argparse.Namespace, runs: Path) -> float:
    """Wall time of the fit loop (``metrics.json`` → ``fit.seconds``) of one ``needlework fit``."""
    strategy = ["--trainer.strategy", "ddp"] if processes > 1 else ["--trainer.strategy", "auto"]
    cmd = [
        sys.executable, "-m", "needlework", "fit", "--config", "needle_mnist/dense", "--runs_dir", str(runs),
        "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0", "--test_after_fit", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", args.accelerator, "--trainer.devices", str(processes), *strategy,
        "--model.init_args.model_kwargs", json.dumps(TINY_MODEL), "--model.init_args.scheduler", "null",
        "--data.init_args.dataset_kwargs", json.dumps({"canvas": args.canvas}),
        "--data.init_args.train_schedule", "null", "--data.init_args.batch_size", str(args.batch_size),
        "--data.init_args.train_kwargs", json.dumps({"size": args.train_size}),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"needlework fit failed ({processes} processes):\n{proc.stderr[-3000:]}")
    (metrics,) = runs.rglob("metrics.json")
    return float(json.loads(metrics.read_text())["fit"]["seconds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    p.add_argument("--canvas", type=int, default=128)
    p.add_argument("--train-size", type=int, default=256, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="64 px, 32 images, 1 epoch: checks the script")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    args = p.parse_args(argv)
    if args.quick:
        args.canvas, args.train_size, args.batch_size, args.epochs = 64, 32, 8, 1
    rows = []
    for n in args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            t1 = fit_seconds(n, args.epochs, args, Path(tmp) / "a")
            t2 = fit_seconds(n, 2 * args.epochs, args, Path(tmp) / "b")
        rate = args.train_size * args.epochs / max(t2 - t1, 1e-9)
        rows.append({"processes": n, "fit_s": [t1, t2], "images_per_s": rate})
        print(f"{n} process(es): {rate:8.1f} images/s  (fit {t1:.1f} s / {t2:.1f} s)", flush=True)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio"] = row["images_per_s"] / base
        print(f"{row['processes']} process(es): {row['ratio']:.2f}x of {rows[0]['processes']}")
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
