"""MIL zoo benchmark: every MIL model, side by side, on two (or more) bag datasets.

Settings:

* ``mnist_bags`` — MNIST-bags (Ilse et al.; DATASETS.md §6): a LeNet instance encoder trained end-to-end
  with each aggregator on padded pixel bags (``lenet_mil``), the ABMIL paper's setup;
* ``planted`` — planted feature bags (:mod:`needlework.data.planted_bags`): 32-d tile features of
  slide-like grids at three magnifications (4 children per parent) with a 4×4-tile lesion (at the highest
  magnification, signal 2σ) in positive slides. Single-level models see the highest magnification
  (about 350 tiles per slide); ZoomMIL starts from the lowest (about 22 tiles) and zooms into k = 4 tiles
  per level.

For each (setting, model, repeat) one fresh process trains with Adam on padded batches, then evaluates on
the test split: accuracy, balanced accuracy, AUROC, weighted F1, cross-entropy, and the AUROC of the
attention against the instance labels on positive bags ("inst AUROC", localisation). Also reported:
parameters, training throughput (bags per second of forward + backward + step, data excluded), the
training memory "train MB" (parameters, gradients and Adam moments, plus the activations autograd saves
for the largest training batch, counted with saved-tensor hooks — device-independent), and in the JSON the
measured peak memory ``peak_mb`` (CPU: growth of the peak RSS during training and evaluation, measured
by resetting the peak with Linux's ``/proc/self/clear_refs`` — dominated by allocator caching and one-off
start-up allocations, hence not in the table; ``--isolate`` runs each in a fresh process; CUDA: peak
allocated).
Results: a table on stdout and ``benchmarks/results/mil.json``.

Usage:
    python benchmarks/mil.py --preset small            # about 5–10 min on 2 CPU cores
    python benchmarks/mil.py --preset full --repeats 5  # the fuller run
    python benchmarks/mil.py --models abmil dsmil --settings planted
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
)

import needlework
from needlework.data.level_collate import pad_bag_levels
from needlework.models.mil import list_mil_models

RESULTS = Path(__file__).parent / "results" / "mil.json"

PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "mnist_bags": {"train": 160, "test": 160, "epochs": 5, "batch": 8, "lr": 1e-3},
        "planted": {"train": 200, "test": 160, "epochs": 12, "batch": 16, "lr": 1e-3},
        "repeats": 1,
    },
    "full": {
        "mnist_bags": {"train": 200, "test": 1000, "epochs": 20, "batch": 8, "lr": 5e-4},
        "planted": {"train": 1000, "test": 1000, "epochs": 30, "batch": 16, "lr": 1e-3},
        "repeats": 5,
    },
}

DATASETS = {
    "mnist_bags": ("mnist_bags", {"mean_bag_length": 10, "std_bag_length": 2}),
    "planted": ("planted_bags", {"grid": 6, "levels": 3, "dim": 32, "tissue_fraction": 0.6,
                                 "lesion_size": 4, "signal": 2.0}),
}

# aggregator settings per dataset (LeNet features are 500-d; planted features 32-d)
HEAD_KWARGS: dict[str, dict[str, dict[str, Any]]] = {
    "mnist_bags": {
        "abmil": {"embed_dim": None, "attention_dim": 128},
        "abmil.gated": {"embed_dim": None, "attention_dim": 128},
        "transmil": {"dim": 128, "heads": 4},
        "sparseconvmil": {"cell_size": 28},
    },
    "planted": {
        "abmil": {"embed_dim": 128, "attention_dim": 64},
        "abmil.gated": {"embed_dim": 128, "attention_dim": 64},
        "clam_sb": {"dropout": 0.0},
        "transmil": {"dim": 128, "heads": 4, "num_landmarks": 32, "ppeg_layout": "coords",
                     "coord_stride": 256},
        "sparseconvmil": {"cell_size": 256, "rotation": "right_angles", "scale": None},
        "dsmil": {"embed_dim": 128},
        "zoommil": {"num_levels": 3, "hidden_dim": 128, "attention_dim": 64, "dropout": 0.0, "k": 4,
                    "sigma": 0.05, "n_samples": 50},
    },
}
MULTI_LEVEL = {"zoommil"}  # models that take every magnification; the others get the highest one


def applicable(setting: str, name: str) -> bool:
    levels = DATASETS[setting][1].get("levels", 1)
    return name not in MULTI_LEVEL or levels > 1


def single_level(batch: dict, level: int) -> dict:
    """The entries of magnification ``level`` renamed to ``bag`` / ``coords`` / ``mask`` / ...."""
    if level == 0:
        return batch
    out = {k: v for k, v in batch.items() if not k.startswith(("bag", "coords", "mask", "instance_labels"))}
    for key in ("bag", "coords", "mask", "instance_labels"):
        out[key] = batch[f"{key}_{level}"]
    return out


def build_model(setting: str, name: str) -> torch.nn.Module:
    kwargs = HEAD_KWARGS[setting].get(name, {})
    if setting == "mnist_bags":
        return needlework.create_model("lenet_mil", num_classes=2, mil=name, mil_kwargs=kwargs)
    return needlework.create_model(name, in_dim=DATASETS[setting][1]["dim"], num_classes=2, **kwargs)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float | None:
    """Reset the process's peak RSS (Linux ``clear_refs``) and return the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def peak_rss_growth(base: float | None) -> float | None:
    peak = _status_mb("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0.0)


def batches(dataset, batch_size: int, generator: torch.Generator | None, device: str, level: int) -> list:
    """Padded batches (shuffled when ``generator`` is given), reduced to magnification ``level``
    unless ``level`` is 0."""
    order = torch.randperm(len(dataset), generator=generator) if generator else torch.arange(len(dataset))
    out = []
    for i in range(0, len(dataset), batch_size):
        batch = single_level(pad_bag_levels([dataset[int(j)] for j in order[i : i + batch_size]]), level)
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


def saved_activation_bytes(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Loss of ``batch`` and the bytes of the tensors autograd saves for backward (deduplicated by
    storage, parameters excluded): the activation memory of a training step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.compute_loss(model.forward_batch(batch), batch["label"])
    return loss, sum(seen.values())


def instance_auroc(outputs: list[tuple[dict, dict]]) -> float | None:
    scores, labels = [], []
    for out, batch in outputs:
        if "instance_labels" not in batch:
            return None
        att = out["attention"]
        att = att[:, 1] if att.dim() == 3 else att  # positive-class row of multi-branch attention
        positive = batch["label"] == 1
        mask = batch["mask"] & positive[:, None]
        scores.append(att[mask].float().cpu())
        labels.append(batch["instance_labels"][mask].cpu())
    labels_t = torch.cat(labels)
    if labels_t.min() == labels_t.max():
        return None
    return float(binary_auroc(torch.cat(scores), labels_t))


def run_one(setting: str, name: str, seed: int, cfg: dict, device: str, threads: int) -> dict:
    """Train and evaluate one model."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dataset_name, kwargs = DATASETS[setting]
    train = needlework.create_dataset(dataset_name, split="train", size=cfg["train"], seed=seed, **kwargs)
    test = needlework.create_dataset(dataset_name, split="test", size=cfg["test"], seed=seed, **kwargs)
    levels = kwargs.get("levels", 1)
    level = 0 if name in MULTI_LEVEL else levels - 1
    test_batches = batches(test, 32, None, device, level)
    model = build_model(setting, name).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = reset_peak_rss()
    step_time, bags, activations = 0.0, 0, 0
    for epoch in range(cfg["epochs"]):
        model.train()
        for batch in batches(train, cfg["batch"], g, device, level):
            if epoch == 0:  # untimed pass measuring the activation memory of this batch
                activations = max(activations, saved_activation_bytes(model, batch)[1])
            start = time.perf_counter()
            loss, _ = model.compute_loss(model.forward_batch(batch), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            step_time += time.perf_counter() - start
            bags += len(batch["label"])
    model.eval()
    with torch.no_grad():
        outputs = [(model.forward_batch(b), b) for b in test_batches]
    logits = torch.cat([o["logits"] for o, _ in outputs]).float().cpu()
    target = torch.cat([b["label"] for _, b in outputs]).cpu()
    probs = logits.softmax(-1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_growth(base)
    # parameters, gradients and two Adam moments (float32) + the largest batch's saved activations
    train_mb = (4 * 4 * params + activations) / 2**20
    return {
        "acc": float(multiclass_accuracy(probs, target, 2, average="micro")),
        "bacc": float(multiclass_accuracy(probs, target, 2, average="macro")),
        "auroc": float(multiclass_auroc(probs, target, 2)),
        "f1_weighted": float(multiclass_f1_score(probs, target, 2, average="weighted")),
        "ce": float(F.cross_entropy(logits, target)),
        "inst_auroc": instance_auroc(outputs),
        "params": params,
        "bags_per_s": bags / step_time,
        "train_mb": train_mb,
        "activation_mb": activations / 2**20,
        "peak_mb": peak,
    }


def _run_isolated(job: tuple) -> dict:
    return run_one(*job)


def warm_up(settings: list[str], device: str, threads: int) -> None:
    """One tiny untimed run per setting, so one-time allocations are not charged to the first model."""
    tiny = {"train": 8, "test": 8, "epochs": 1, "batch": 4, "lr": 1e-3}
    for setting in settings:
        run_one(setting, "abmil", 0, tiny, device, threads)


def summarise(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            out[key] = None
            continue
        out[key] = {"mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def fmt(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "—"
    if stat["std"] == 0.0:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"


def table(results: dict, settings: list[str], models: list[str]) -> str:
    cols = ["acc", "auroc", "inst_auroc", "params", "bags_per_s", "train_mb"]
    short = {"acc": "acc", "auroc": "AUROC", "inst_auroc": "inst AUROC", "params": "params",
             "bags_per_s": "bags/s", "train_mb": "train MB"}
    header = ["model"] + [f"{s}:{short[c]}" for s in settings for c in cols]
    rows = [header]
    for m in models:
        row = [m]
        for s in settings:
            r = results.get(s, {}).get(m)
            for c in cols:
                if r is None:
                    row.append("—")
                elif c == "params":
                    row.append(f"{int(r[c]['mean']):,}")
                elif c == "bags_per_s":
                    row.append(f"{r[c]['mean']:.0f}")
                elif c == "train_mb":
                    row.append(f"{r[c]['mean']:.1f}")
                else:
                    row.append(fmt(r[c]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--repeats", type=int, default=None, help="seeds per model (default: the preset's)")
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered MIL model")
    parser.add_argument("--settings", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU)")
    parser.add_argument("--isolate", action="store_true",
                        help="one fresh process per run (cleanest peak-memory numbers; slower start-up)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    repeats = args.repeats or preset["repeats"]
    models = args.models or list_mil_models()
    results: dict[str, dict[str, Any]] = {s: {} for s in args.settings}
    start = time.time()
    if not args.isolate:
        warm_up(args.settings, args.device, args.threads)
    for setting in args.settings:
        for name in models:
            if not applicable(setting, name):
                continue
            runs = []
            for seed in range(repeats):
                job = (setting, name, seed, preset[setting], args.device, args.threads)
                if args.isolate:
                    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
                        runs.append(pool.apply(_run_isolated, (job,)))
                else:
                    runs.append(run_one(*job))
            results[setting][name] = summarise(runs) | {"runs": runs}
            r = results[setting][name]
            print(f"[{time.time() - start:6.0f}s] {setting:10s} {name:15s} acc {fmt(r['acc'])} "
                  f"AUROC {fmt(r['auroc'])} {r['bags_per_s']['mean']:.0f} bags/s", flush=True)
    print()
    print(table(results, args.settings, models))
    payload = {
        "preset": args.preset,
        "repeats": repeats,
        "config": {s: preset[s] for s in args.settings},
        "datasets": {s: DATASETS[s] for s in args.settings},
        "head_kwargs": HEAD_KWARGS,
        "device": args.device,
        "threads": args.threads,
        "isolate": args.isolate,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "wall_s": time.time() - start,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
