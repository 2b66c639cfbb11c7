"""Accuracy against object-to-image ratio (O2I): every method on needle-MNIST, each under a wall-clock budget.

Each (method, canvas, seed) trains with ``needlework fit --config needle_mnist/<method>`` at that canvas
under a wall-clock budget. The default protocol (``--schedule time``) fits the curriculum to the budget:
``--trainer.max_time`` with stages in fractions of it (``TIME_CURRICULUM``: canvas 64, 128, 256, then the
target, each capped at the target) and ``--model.init_args.scheduler cosine_time`` (the learning rate
reaches zero when the time is up), epochs of 400 fresh images, no validation; the final weights are
tested. (``--schedule epochs`` keeps the config's epoch curriculum and validation, cut off by
``max_time``: on a slow machine the run then never reaches the target canvas.) The checkpoint is tested
on the 400 held-out test images, measuring accuracy, AUROC and localisation AP (the
needle counts as found when the attention maximum, or for the dense CNN the saliency maximum, falls in its
box; confidence = P(needle)). Rows go to ``benchmarks/results/o2i_sweep.json`` after every run (atomic
rename), so an interrupted sweep resumes where it stopped; ``docs/images/o2i_sweep.png`` plots test
accuracy against O2I.

    python benchmarks/o2i_sweep.py --minutes 3 --minutes-at 512=15,1024=15 --jobs 2
    python benchmarks/o2i_sweep.py --preset gpu --device cuda          # adds canvases 2048 and 4096
    python benchmarks/o2i_sweep.py --study pooling --canvas 64 128 256  # dense pooling × O2I
    python benchmarks/o2i_sweep.py --study rf --canvas 64 128 256       # dense receptive field × O2I

Every run is a worker subprocess (``--worker``): peak memory is that process's own maximum RSS (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA), and a crash costs one row, not the sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "images"
METHODS = ("dense", "ats", "dps", "ips", "patch_mil")
PRESETS = {"cpu": (64, 128, 256, 512, 1024), "gpu": (64, 128, 256, 512, 1024, 2048, 4096)}
POOLINGS = ("max", "mean", "logsumexp", "attention")
# receptive field -> (kernel3, blocks) of the stride-1 BagNet (METHODS.md §3.1)
RFS = {9: ([1, 1, 0, 0], [1, 1, 1, 1]), 17: ([1, 1, 1, 0], [1, 1, 1, 1]), 33: ([1, 1, 1, 1], [1, 1, 1, 1]),
       77: ([2, 2, 2, 2], [2, 2, 2, 2])}  # fmt: skip
DIGIT = 28
# fractions of the budget per curriculum stage (the recipe of IPS at canvas 512, 0.96 in 15 CPU minutes)
TIME_CURRICULUM = [{"time": 0.08, "canvas": 64}, {"time": 0.22, "canvas": 128}, {"time": 0.35, "canvas": 256},
                   {"time": 0.35}]  # fmt: skip
TIME_EPOCH_SIZE = 400  # fresh images per epoch: the granularity of stage switches
SCHEMA = ("study", "method", "config", "canvas", "o2i", "seed", "minutes", "schedule", "test_acc",
          "test_auroc", "loc_ap", "train_seconds", "steps", "images_seen", "peak_mem_mb", "device",
          "checkpoint", "epochs")  # fmt: skip


def runs_for(study: str, methods: list[str], canvases: list[int], seeds: list[int]) -> list[dict[str, Any]]:
    """The (method, config, overrides) grid of a study."""
    jobs = []
    for canvas in canvases:
        for seed in seeds:
            if study == "o2i":
                for m in methods:
                    jobs.append({"method": m, "config": f"needle_mnist/{m}", "overrides": []})
            elif study == "pooling":
                for p in POOLINGS:
                    ov = ["--model.init_args.model_kwargs.pooling", p]
                    jobs.append({"method": f"dense.{p}", "config": "needle_mnist/dense", "overrides": ov})
            elif study == "rf":
                for rf, (k3, blocks) in RFS.items():
                    ov = ["--model.init_args.model_kwargs.kernel3", json.dumps(k3),
                          "--model.init_args.model_kwargs.blocks", json.dumps(blocks)]  # fmt: skip
                    jobs.append({"method": f"dense.rf{rf}", "config": "needle_mnist/dense", "overrides": ov})
            else:
                raise SystemExit(f"error: unknown --study {study!r}; use o2i, pooling or rf")
            for j in jobs[-(len(methods) if study == "o2i" else 4) :]:
                j.update(study=study, canvas=canvas, seed=seed)
    return jobs


def key(row: dict[str, Any]) -> tuple:
    return (row["study"], row["method"], row["canvas"], row["seed"], row["minutes"],
            row.get("schedule", "epochs"))  # fmt: skip


def schedule_overrides(schedule: str, config: str) -> list[str]:
    """CLI overrides of the ``time`` protocol (none for ``epochs``)."""
    if schedule == "epochs":
        return []
    import yaml

    from needlework.configs import resolve_config

    cfg = yaml.safe_load(resolve_config(config).read_text())
    train_kwargs = {**cfg["data"]["init_args"].get("train_kwargs", {}), "size": TIME_EPOCH_SIZE}
    sched = cfg["model"]["init_args"].get("scheduler")
    return ["--data.init_args.train_schedule", json.dumps(TIME_CURRICULUM),
            "--data.init_args.train_kwargs", json.dumps(train_kwargs),
            "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
            "--checkpoint.monitor", "null", "--checkpoint.save_on_train_epoch_end", "true",
            *(["--model.init_args.scheduler", "cosine_time"] if sched == "cosine" else [])]  # fmt: skip


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path} is not valid JSON ({err}); move it away to start afresh") from None


def save_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["study"], r["method"], r["canvas"], r["seed"], r["minutes"]))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)  # a crash never leaves half a file


# --------------------------------------------------------------------------------------------- the worker
def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Train one job through the library's CLI, then test its checkpoint; returns the row."""
    import resource

    import torch

    torch.set_num_threads(job["threads"])
    from needlework.cli.train import main as fit_main

    run_dir = Path(job["runs_dir"]) / f"{job['study']}_{job['method']}_c{job['canvas']}_s{job['seed']}"
    secs = int(round(job["minutes"] * 60))
    args = ["fit", "--config", job["config"], "--data.init_args.dataset_kwargs.canvas", str(job["canvas"]),
            "--seed_everything", str(job["seed"]),
            "--trainer.max_time", f"00:00:{secs // 60:02d}:{secs % 60:02d}",
            "--trainer.accelerator", job["device"], "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--test_after_fit", "false", "--runs_dir", str(run_dir.parent), "--run_name", run_dir.name,
            *schedule_overrides(job["schedule"], job["config"]), *job["overrides"]]  # fmt: skip
    print("needlework " + " ".join(args), file=sys.stderr, flush=True)
    fit_main(args)
    version = sorted(p for p in run_dir.iterdir() if (p / "metrics.json").exists())[-1]
    fit = json.loads((version / "metrics.json").read_text())["fit"]
    ckpt, which = fit.get("best_checkpoint"), "best"
    if job["schedule"] == "time" or not ckpt or not Path(ckpt).exists():
        ckpt, which = str(version / "checkpoints" / "last.ckpt"), "last"
    row = evaluate(version / "config.yaml", ckpt, job)
    batch = int(row.pop("batch_size"))
    row.update(checkpoint=which, train_seconds=round(fit["seconds"], 1), steps=fit["steps"],
               images_seen=fit["steps"] * batch, epochs=fit["epochs"])  # fmt: skip
    if job["device"] == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        row["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def evaluate(config_path: Path, ckpt: str, job: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy, AUROC and localisation AP of ``ckpt`` on the config's test split."""
    import torch
    import yaml
    from sklearn.metrics import roc_auc_score

    from needlework import load_model
    from needlework.metrics import attention_peaks, localisation_ap
    from needlework.models.base import route_batch
    from needlework.saliency import saliency_map, saliency_peaks
    from needlework.training import DatasetDataModule

    cfg = yaml.safe_load(config_path.read_text())
    data = DatasetDataModule(**cfg["data"]["init_args"])
    device = torch.device(job["device"])
    model = load_model(ckpt).to(device).eval()
    probs, points, boxes, labels = [], [], [], []
    for batch in data.test_dataloader():
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            out = model(**route_batch(model.forward, batch))
        p = out["logits"].softmax(-1)[:, 1]
        if "attention_map" in out or "selected_coords" in out:
            pts = attention_peaks(out, batch["image"].shape[-2:], getattr(model, "patch_size", None))
        else:  # the dense CNN: where |∂ logit / ∂ image| peaks, as in Needles in Haystacks
            pts, _ = saliency_peaks(saliency_map(model, batch["image"]))
        probs.append(p.cpu()), points.append(pts.float().cpu()), labels.append(batch["label"].cpu())
        boxes += [b.cpu() for b in batch["boxes"]]
    probs, labels = torch.cat(probs), torch.cat(labels)
    return {
        "test_acc": round(float(((probs > 0.5).long() == labels).float().mean()), 4),
        "test_auroc": round(float(roc_auc_score(labels.numpy(), probs.numpy())), 4),
        "loc_ap": round(localisation_ap(probs, torch.cat(points), boxes), 4),
        "n_test": len(labels),
        "batch_size": cfg["data"]["init_args"]["batch_size"],
    }


# --------------------------------------------------------------------------------------------- the sweep
def run_job(job: dict[str, Any], log_dir: Path) -> dict[str, Any] | None:
    log = log_dir / f"{job['study']}_{job['method']}_c{job['canvas']}_s{job['seed']}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], stdout=subprocess.PIPE,
                              stderr=f, text=True, cwd=ROOT)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        print(f"  FAILED {job['method']} canvas {job['canvas']} (exit {proc.returncode}); log: {log}",
              flush=True)
        return None
    row = json.loads(lines[-1][4:])
    o2i = DIGIT**2 / job["canvas"] ** 2
    row = {**{k: job[k] for k in ("study", "method", "config", "canvas", "seed", "minutes", "schedule",
                                  "device")},
           "o2i": round(o2i, 6), **row, "wall_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    print(f"  {row['method']:<14} canvas {row['canvas']:>5}  O2I {o2i:.3%}  acc {row['test_acc']:.3f}  "
          f"AUROC {row['test_auroc']:.3f}  locAP {row['loc_ap']:.3f}  {row['steps']} steps  "
          f"{row['peak_mem_mb']:.0f} MB", flush=True)  # fmt: skip
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of ``rows`` (the README quotes it), by canvas then method."""
    lines = ["| method | canvas | O2I | budget | test acc | AUROC | loc AP | steps | images seen | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["canvas"], r["method"])):
        lines.append(f"| {r['method']} | {r['canvas']} | {r['o2i']:.3%} | {r['minutes']:g} min | "
                     f"{r['test_acc']:.3f} | {r['test_auroc']:.3f} | {r['loc_ap']:.3f} | {r['steps']} | "
                     f"{r['images_seen']} | {r['peak_mem_mb']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], study: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["study"] == study]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["o2i"], r["test_acc"]) for r in rows if r["method"] == method)
        by_o2i: dict[float, list[float]] = {}
        for o, a in pts:
            by_o2i.setdefault(o, []).append(a)
        xs = sorted(by_o2i)
        ax.plot([x * 100 for x in xs], [sum(by_o2i[x]) / len(by_o2i[x]) for x in xs], "o-", label=method)
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.invert_xaxis()  # tinier objects to the right
    ticks = [100 * DIGIT**2 / c**2 for c in sorted({r["canvas"] for r in rows})]
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])  # the O2I of each canvas, not 6×10⁰
    ax.set_xticks([], minor=True)
    ax.set_xlabel("object-to-image ratio (%, log scale)")
    canvases = sorted({r["canvas"] for r in rows})
    top = ax.secondary_xaxis("top")  # the canvas side of each O2I, with its training budget
    top.set_xticks([100 * DIGIT**2 / c**2 for c in canvases], minor=False)
    top.set_xticks([], minor=True)
    budget = {c: "/".join(f"{m:g}" for m in sorted({r["minutes"] for r in rows if r["canvas"] == c}))
              for c in canvases}  # fmt: skip
    top.set_xticklabels([f"{c} px\n{budget[c]} min" for c in canvases], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.4, 1.0)
    minutes = sorted({r["minutes"] for r in rows})
    ax.set_title(f"needle-MNIST, {study}: test accuracy under a CPU budget "
                 f"({', '.join(f'{m:g}' for m in minutes)} min)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="o2i", choices=["o2i", "pooling", "rf"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--canvas", nargs="+", type=int, default=None, help="canvases (default: the preset's)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per run (wall clock)")
    p.add_argument("--minutes-at", default="", help="per-canvas budgets, e.g. 512=15,1024=15")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--schedule", default="time", choices=["time", "epochs"],
                   help="curriculum in fractions of the budget (default) or the config's epochs")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    p.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / jobs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    p.add_argument("--figure", type=Path, default=None, help="figure PNG (default docs/images/...)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "o2i_sweep")
    p.add_argument("--test-size", type=int, default=None, help="test images (default: the config's, 400)")
    p.add_argument("--val-size", type=int, default=None, help="validation images (default: the config's)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        pairs = (kv.split("=") for kv in args.minutes_at.split(",") if kv)
        args.budgets = {int(c): float(m) for c, m in pairs}
    except ValueError:
        p.error(f"--minutes-at takes CANVAS=MINUTES pairs separated by commas, got {args.minutes_at!r}")
    if args.minutes <= 0 or args.jobs < 1:
        p.error("--minutes must be positive and --jobs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    name = "o2i_sweep" if args.study == "o2i" else f"o2i_{args.study}"
    out = args.out or RESULTS / f"{name}.json"
    figure = args.figure or FIGURES / f"{name}.png"
    canvases = args.canvas or list(PRESETS[args.preset])
    rows = load_rows(out)
    done = {key(r) for r in rows}
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = []
    for job in runs_for(args.study, args.methods, canvases, args.seeds):
        job.update(minutes=args.budgets.get(job["canvas"], args.minutes), device=args.device,
                   threads=threads, runs_dir=str(args.runs_dir), schedule=args.schedule)  # fmt: skip
        for split, size in (("test", args.test_size), ("val", args.val_size)):
            if size is not None:
                flag = f"--data.init_args.{split}_kwargs"
                job["overrides"] = [*job["overrides"], flag, json.dumps({"size": size})]
        if key(job) not in done:
            jobs.append(job)
    print(f"{len(done)} rows in {out}; {len(jobs)} runs to go ({args.jobs} at once, {threads} threads each)")
    log_dir = args.runs_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # longest first, so two workers finish together
    jobs.sort(key=lambda j: -j["minutes"])
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(run_job, j, log_dir) for j in jobs]):
            row = future.result()
            if row is not None:
                rows = [r for r in load_rows(out) if key(r) != key(row)] + [row]
                save_rows(out, rows)
    rows = load_rows(out)
    print(table([r for r in rows if r["study"] == args.study]))
    if any(r["study"] == args.study for r in rows):
        plot(rows, args.study, figure)
        print(f"wrote {out} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
