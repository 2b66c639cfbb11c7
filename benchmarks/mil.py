"""MIL zoo benchmark: every MIL model, side by side, on three bag datasets.

Settings:

* ``mnist_bags`` — MNIST-bags (Ilse et al.; DATASETS.md §6): a LeNet instance encoder trained end-to-end
  with each aggregator on padded pixel bags (``lenet_mil``), the ABMIL paper's setup;
* ``slides`` — bags of the synthetic-slide cohort of the slide pipeline (``benchmarks/mil_slides.py``:
  pyramidal TIFFs with small planted lesions → 64-px tiles at 40× → ``color_stats`` features → patient-level
  folds, trained on a fold's train + validation slides and tested on its test slides; repeat ``i`` uses
  fold ``i mod 4``). ZoomMIL gets the same slides tiled at 10×, 20× and 40× (``slide_bags_multimag``:
  it starts from the 10× tiles and zooms into k = 4 per level). Skipped when ``needlework.slides`` is not
  installed.
* ``planted`` — planted feature bags (:mod:`needlework.data.planted_bags`): 32-d tile features of
  slide-like grids at three magnifications (4 children per parent) with a 4×4-tile lesion (at the highest
  magnification, signal 2σ) in positive slides. Single-level models see the highest magnification
  (about 350 tiles per slide); ZoomMIL starts from the lowest (about 22 tiles) and zooms into k = 4 tiles
  per level.

For each (setting, model, repeat) a fresh model trains with Adam on padded batches, then is evaluated on
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
    python benchmarks/mil.py --preset small   # about 5–10 min on one CPU thread
    python benchmarks/mil.py --preset full    # the fuller run (4 repeats each: mean ± std)
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
from torch.utils.data import ConcatDataset
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
)

import mil_slides  # benchmarks/mil_slides.py, next to this script
import needlework
from mil_settings import DATASETS, HEAD_KWARGS, MULTI_LEVEL, MULTI_LEVEL_DATASETS, PRESETS
from needlework.data.level_collate import pad_bag_levels
from needlework.models.mil import list_mil_models

RESULTS = Path(__file__).parent / "results" / "mil.json"



def applicable(setting: str, name: str) -> bool:
    levels = DATASETS[setting][1].get("levels", 1)
    return name not in MULTI_LEVEL or levels > 1 or setting in MULTI_LEVEL_DATASETS


def single_level(batch: dict, level: int) -> dict:
    """The entries of magnification ``level`` renamed to ``bag`` / ``coords`` / ``mask`` / ...."""
    if level == 0:
        return batch
    out = {k: v for k, v in batch.items() if not k.startswith(("bag", "coords", "mask", "instance_labels"))}
    for key in ("bag", "coords", "mask", "instance_labels"):
        out[key] = batch[f"{key}_{level}"]
    return out


def build_model(setting: str, name: str, in_dim: int) -> torch.nn.Module:
    kwargs = HEAD_KWARGS[setting].get(name, {})
    if setting == "mnist_bags":
        return needlework.create_model("lenet_mil", num_classes=2, mil=name, mil_kwargs=kwargs)
    return needlework.create_model(name, in_dim=in_dim, num_classes=2, **kwargs)


def make_splits(setting: str, cfg: dict, seed: int, name: str = "") -> tuple[Any, Any]:
    """Train and test datasets of ``setting`` for repeat ``seed`` (and model ``name``: multi-level models
    get multi-magnification slide bags)."""
    dataset_name, kwargs = DATASETS[setting]
    if setting == "slides":
        multi = name in MULTI_LEVEL
        paths = (mil_slides.prepare_multimag if multi else mil_slides.prepare)(cfg["slides"])
        split_file = Path(paths["splits_dir"]) / f"splits_{seed % paths['folds']}.csv"
        common = {"labels_csv": paths["labels_csv"], "split_file": str(split_file), "cache": True}
        if multi:
            dataset_name = MULTI_LEVEL_DATASETS[setting]
            common["features_dirs"] = paths["features_dirs"]
        else:
            common["features_dir"] = paths["features_dir"]
        train = [needlework.create_dataset(dataset_name, split=part, **common) for part in ("train", "val")]
        return ConcatDataset(train), needlework.create_dataset(dataset_name, split="test", **common)
    return (needlework.create_dataset(dataset_name, split="train", size=cfg["train"], seed=seed, **kwargs),
            needlework.create_dataset(dataset_name, split="test", size=cfg["test"], seed=seed, **kwargs))


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
    train, test = make_splits(setting, cfg, seed, name)
    levels = DATASETS[setting][1].get("levels", 1)
    level = 0 if name in MULTI_LEVEL else levels - 1
    test_batches = batches(test, 32, None, device, level)
    model = build_model(setting, name, int(train[0]["bag"].shape[-1])).to(device)
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
        if setting != "slides":  # slide bags come from files; the other warm-ups cover the allocations
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
    parser.add_argument("--settings", nargs="*", default=None, choices=list(DATASETS),
                        help="default: all (slides only when needlework.slides is installed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU)")
    parser.add_argument("--isolate", action="store_true",
                        help="one fresh process per run (cleanest peak-memory numbers; slower start-up)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    repeats = args.repeats or preset["repeats"]
    models = args.models or list_mil_models()
    if args.settings is None:
        args.settings = [s for s in DATASETS if s != "slides" or mil_slides.available()]
        if "slides" not in args.settings:
            print("note: needlework.slides is not installed: the slides setting is skipped")
    elif "slides" in args.settings and not mil_slides.available():
        parser.error("--settings slides needs the slide pipeline (needlework.slides)")
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
