"""``needlework demo``: needle-MNIST end to end on a CPU in minutes.

``--method dense`` (default): generates needle-MNIST at canvas 128 (O2I 4.8 %), trains the BagNet baseline
(RF 33, max pooling) with a curriculum (canvas 64 first, fresh images every epoch), keeps the best
validation checkpoint, evaluates the held-out test images, measures saliency localisation AP, and writes
``<out>/metrics.json``, ``<out>/report.md`` and ``<out>/saliency.png``.

``--method ips``: the tiny regime. IPS (iterative patch selection) on canvas 512 (O2I 0.30 %), trained on a
64 → 128 → 256 px curriculum and tested at 512 px; the figure ``<out>/selection.png`` shows the four
patches it read on test images with the needle's box.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from needlework.training.run_info import environment_info, write_json

# A CPU-sized BagNet: the paper's stride-1 stem and RF-33 layout (3×3 blocks in every stage: output stride 8,
# 12×12 positions on a 128 canvas) at width 1/8, one block per stage. benchmarks/demo_recipes.py compared
# ~40 recipes by steps-to-accuracy; a stride-2 stem (4× cheaper) plateaued lower, wider nets cost more steps
# than a 2-core CPU has in the time.
MODEL_KWARGS = {
    "kernel3": [1, 1, 1, 1], "stem_stride": 1, "width": 0.125, "blocks": [1, 1, 1, 1], "pooling": "max",
}
# The IPS recipe of configs/needle_mnist/ips.yaml (benchmarks/o2i_sweep.py measured it): 64-px patches,
# 4 kept, scanned 16 at a time without gradients; a small stride-2 CNN per patch; no positional encoding.
IPS_KWARGS = {
    "patch_size": 64, "n_keep": 4, "chunk_size": 16, "dim": 64,
    "encoder": {"widths": [32, 32, 32], "strides": [1, 2, 2], "stem_stride": 2},
    "n_heads": 4, "d_k": 16, "d_inner": 128, "dropout": 0.0, "pos_encoding": "none",
}
# per method: defaults of the flags (None = the flag's own default)
METHOD_DEFAULTS = {
    "dense": {"canvas": 128, "epoch_size": 3200, "epochs": 34, "batch_size": 32, "lr": 3e-3, "val_every": 2,
              "stages": "64:24", "val_size": 320},
    # IPS: the O2I sweep's wall-clock protocol (benchmarks/o2i_sweep.py): stages in fractions of
    # --max-minutes, so the target canvas is reached on any machine; the LR reaches zero at the limit and
    # the final weights are tested (no validation: it would cost a large part of the budget at 512 px)
    "ips": {"canvas": 512, "epoch_size": 400, "epochs": 10_000, "batch_size": 16, "lr": 1e-3, "val_every": 0,
            "stages": "64:0.08,128:0.22,256:0.35", "val_size": 160},
}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="needlework demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--method", default="dense", choices=sorted(METHOD_DEFAULTS),
                   help="dense: the BagNet baseline at canvas 128; ips: patch selection at canvas 512")
    p.add_argument("--canvas", type=int, default=None, help="needle-MNIST canvas side in px (128 / 512)")
    p.add_argument("--epoch-size", type=int, default=None,
                   help="training images per epoch, freshly generated every epoch (50%% positive)")
    p.add_argument("--stages", default=None,
                   help="curriculum before the target canvas, CANVAS:EPOCHS,... or CANVAS:FRACTION,... "
                        "(fractions of --max-minutes; dense 64:24, ips 64:0.08,128:0.22,256:0.35; '' for "
                        "none); stages above --canvas are capped at it")
    p.add_argument("--warmup-canvas", type=int, default=None, help="(dense) one-stage curriculum: canvas")
    p.add_argument("--warmup-epochs", type=int, default=None, help="(dense) one-stage curriculum: epochs")
    p.add_argument("--epochs", type=int, default=None, help="epochs in all, curriculum included (34 / 24)")
    p.add_argument("--batch-size", type=int, default=None, help="32 / 16")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate, cosine decay per step")
    p.add_argument("--max-minutes", type=float, default=8.5, help="stop training after this long")
    p.add_argument("--val-size", type=int, default=None, help="validation images (checkpoint choice)")
    p.add_argument("--val-every", type=int, default=None,
                   help="validate every N epochs (dense 2); 0: no validation, test the final weights (ips)")
    p.add_argument("--test-size", type=int, default=None,
                   help="held-out test images (default: one positive and one negative per test 3, i.e. 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    defaults = METHOD_DEFAULTS[args.method]
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.warmup_canvas is not None or args.warmup_epochs is not None:  # the older one-stage flags
        epochs = args.warmup_epochs if args.warmup_epochs is not None else 24
        args.stages = f"{args.warmup_canvas or 64}:{epochs}"
    if args.val_every < 0:
        p.error("--val-every must be >= 0 (0: no validation, test the final weights)")
    for name in ("canvas", "epoch_size", "epochs", "batch_size", "val_size", "test_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    pairs = [st.split(":") for st in args.stages.split(",") if st]
    args.time_stages = any("." in st[-1] for st in pairs)  # CANVAS:FRACTION of the time budget
    try:
        kind = float if args.time_stages else int
        args.schedule = [(int(c), kind(e)) for c, e in pairs]
    except ValueError:
        p.error(f"--stages takes CANVAS:EPOCHS or CANVAS:FRACTION pairs separated by commas, got "
                f"{args.stages!r}")
    args.schedule = [(c, e) for c, e in args.schedule if e > 0]
    if any(c < 1 for c, _ in args.schedule):
        p.error("--stages: canvases must be positive")
    warm = sum(e for _, e in args.schedule)
    if args.time_stages:
        if not warm < 1:
            p.error(f"--stages: the fractions of the time budget add up to {warm:g}; they must stay below 1 "
                    "(the rest is trained on --canvas)")
    elif not warm < args.epochs:
        p.error(f"--warmup-epochs must lie in [0, --epochs): the curriculum has {warm} of {args.epochs} "
                "epochs")
    if args.max_minutes <= 0:
        p.error("--max-minutes must be positive")
    return args


def build_task(lr: float, method: str = "dense", scheduler: str = "cosine") -> Any:
    """The demo's :class:`~needlework.training.ClassificationTask`: BagNet ``MODEL_KWARGS`` in channels-last.

    Channels-last lets oneDNN pick its NHWC kernels (0.9–1.06× on an AMD EPYC with AVX-512, up to 1.5× on
    other CPUs). It is safe here because the BagNet's strided 1×1 shortcuts are :class:`Conv1x1` layers,
    which never reach oneDNN's strided 1×1 backward kernel that corrupts memory on AVX-512 CPUs
    (``needlework.models.layers`` has the reproducer; ``tests/test_demo_crash.py`` guards it).
    """
    from needlework.training import ClassificationTask

    if method == "ips":
        return ClassificationTask("ips", dict(IPS_KWARGS), num_classes=2, lr=lr, scheduler=scheduler)
    task = ClassificationTask("bagnet", dict(MODEL_KWARGS), num_classes=2, lr=lr, scheduler="cosine")
    task.model.to(memory_format=torch.channels_last)
    return task


def train(args: argparse.Namespace, out: Path) -> tuple[Any, Any, dict[str, float], float]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from needlework.training import ClassificationTask, DatasetDataModule

    L.seed_everything(args.seed, verbose=False)
    # cosine_time: the learning rate follows a cosine of the elapsed fraction of --max-minutes
    task = build_task(args.lr, args.method, "cosine_time" if args.time_stages else "cosine")
    # the curriculum: small canvases first (the needle is 19 % of a 64-px image), then the task's canvas
    unit = "time" if args.time_stages else "epochs"
    schedule = [{unit: e, "canvas": c} for c, e in args.schedule]
    warm = sum(e for _, e in args.schedule)
    rest = 1 - warm if args.time_stages else args.epochs - warm
    data = DatasetDataModule(
        "needle_mnist", {"canvas": args.canvas, "seed": args.seed},
        train_kwargs={"size": args.epoch_size}, val_kwargs={"size": args.val_size},
        test_kwargs={} if args.test_size is None else {"size": args.test_size},
        batch_size=args.batch_size, eval_batch_size=32 if args.method == "ips" else 64,
        train_schedule=[*schedule, {unit: rest}], resample_each_epoch=True,
        transforms=[{"name": "views", "factor": 4}] if args.method == "ips" else None,
    )
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/acc", mode="max", filename="best")
    trainer = L.Trainer(
        max_epochs=args.epochs, max_time={"minutes": args.max_minutes}, callbacks=[ckpt],
        logger=CSVLogger(out, name="", version="logs"), enable_progress_bar=not args.quiet,
        enable_model_summary=False, log_every_n_steps=20, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, check_val_every_n_epoch=args.val_every or 1,
        limit_val_batches=None if args.val_every else 0,
        gradient_clip_val=1.0 if args.method == "ips" else None,
    )
    start = time.perf_counter()
    trainer.fit(task, data)
    train_seconds = time.perf_counter() - start
    # the best validation checkpoint; the final weights when no validation ran within --max-minutes
    has_best = bool(ckpt.best_model_path)
    test = trainer.test(task, data, ckpt_path="best" if has_best else None, verbose=False)[0]
    best = task
    if has_best:
        best = ClassificationTask.load_from_checkpoint(ckpt.best_model_path, map_location="cpu")
    return best, data, {k: float(v) for k, v in test.items()}, train_seconds


def localise(model: Any, dataset: Any, n_figure: int = 8) -> tuple[float, dict[str, Any]]:
    """Saliency localisation AP on the whole test set, and half positives, half negatives for the figure."""
    from needlework.data.batching import collate_samples
    from needlework.metrics import localisation_ap
    from needlework.saliency import saliency_map, saliency_peaks

    model = model.model.eval()

    def run(indices: list[int]) -> dict[str, Any]:
        batch = collate_samples([dataset[i] for i in indices])
        sal = saliency_map(model, batch["image"])
        points, values = saliency_peaks(sal)
        with torch.no_grad():
            probs = model(image=batch["image"])["logits"].softmax(-1)[:, 1]
        return {**batch, "saliency": sal, "points": points, "scores": values, "probs": probs}

    scores, points, boxes = [], [], []
    for start in range(0, len(dataset), 64):
        out = run(list(range(start, min(start + 64, len(dataset)))))
        scores.append(out["scores"]), points.append(out["points"])
        boxes += out["boxes"]
    ap = localisation_ap(torch.cat(scores), torch.cat(points), boxes)
    labels = dataset.labels
    half = n_figure // 2
    pick = [int(i) for i in (*(labels == 1).nonzero()[0][:half], *(labels == 0).nonzero()[0][:half])]
    return ap, run(pick)


def localise_selection(model: Any, dataset: Any, n_figure: int = 8) -> tuple[float, dict[str, Any]]:
    """Localisation AP of the selection model's attention maximum (confidence P(needle)); a figure batch."""
    from needlework.data.batching import collate_samples
    from needlework.metrics import attention_peaks, localisation_ap

    model = model.model.eval()

    def run(indices: list[int]) -> dict[str, Any]:
        batch = collate_samples([dataset[i] for i in indices])
        with torch.no_grad():
            out = model(x_high=batch["x_high"])
        probs = out["logits"].softmax(-1)[:, 1]
        points = attention_peaks(out, batch["image"].shape[-2:], model.patch_size)
        weights = out["attention"].gather(1, out["selected_idx"])
        selected = out["selected_coords"]
        return {**batch, "probs": probs, "points": points, "selected": selected, "weights": weights}

    probs, points, boxes = [], [], []
    for start in range(0, len(dataset), 32):
        out = run(list(range(start, min(start + 32, len(dataset)))))
        probs.append(out["probs"]), points.append(out["points"])
        boxes += out["boxes"]
    ap = localisation_ap(torch.cat(probs), torch.cat(points), boxes)
    labels = dataset.labels
    half = n_figure // 2
    pick = [int(i) for i in (*(labels == 1).nonzero()[0][:half], *(labels == 0).nonzero()[0][:half])]
    return ap, run(pick)


def dense_baseline(canvas: int) -> dict[str, Any] | None:
    """The dense BagNet's row of the committed O2I sweep at ``canvas`` (from a source checkout), if any."""
    import json

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "o2i_sweep.json"
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text()) if r.get("study") == "o2i" and r.get("method") == "dense"
            and r.get("canvas") == canvas]  # fmt: skip
    # the wall-clock protocol's row first (the curriculum fitted to the budget), then the longest budget
    return max(rows, key=lambda r: (r.get("schedule") == "time", r.get("minutes", 0))) if rows else None


def report(out: Path, args: argparse.Namespace, results: dict[str, Any]) -> str:
    rows = [
        ("test accuracy", f"{results['test/acc']:.3f}"),
        ("test balanced accuracy", f"{results['test/bacc']:.3f}"),
        ("test AUROC", f"{results['test/auroc']:.3f}"),
        ("test F1", f"{results['test/f1']:.3f}"),
        ("saliency localisation AP" if args.method == "dense" else "attention localisation AP",
         f"{results['localisation_ap']:.3f}"),
        ("training time", f"{results['train_seconds']:.0f} s ({results['epochs']} epochs)"),
    ]
    base = results.get("dense_baseline")
    if base:
        rows.append((f"dense BagNet at canvas {args.canvas} (sweep, {base['minutes']:g} min)",
                     f"{base['test_acc']:.3f} accuracy, AUROC {base['test_auroc']:.3f}"))  # fmt: skip
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if args.method == "ips":
        weights = "best validation checkpoint" if args.val_every else "final weights"
        decay = "cosine decay to zero at the time limit" if args.time_stages else "cosine decay"
        return (
            "# needlework demo: IPS in the tiny regime\n\n"
            f"Task: does a {args.canvas}×{args.canvas} image contain a 3? One 28×28 needle "
            f"(O2I {results['o2i']:.2%}) among {results['n_clutter']} clutter digits. IPS scans every "
            f"{IPS_KWARGS['patch_size']}-px patch without gradients and learns from the "
            f"{IPS_KWARGS['n_keep']} "
            f"it keeps. Training: {args.epoch_size} fresh images per epoch on a curriculum "
            f"{curriculum(args)}; Adam {args.lr:g}, {decay}. "
            f"{results['n_test']} held-out test images at {args.canvas} px.\n\n"
            f"Model: IPS {IPS_KWARGS}, {weights}.\n\n{table}\n\n"
            "![selection](selection.png)\n\n"
            "Localisation: the centre of the kept patch with the highest attention must lie in the needle's "
            "box (AP over images ranked by P(3), as in Oquab et al. 2015).\n"
        )
    return (
        "# needlework demo: dense baseline on needle-MNIST\n\n"
        f"Task: does a {args.canvas}×{args.canvas} image contain a 3? One 28×28 needle "
        f"(O2I {results['o2i']:.2%}) among {results['n_clutter']} clutter digits. "
        f"Training: {args.epoch_size} fresh images per epoch, curriculum "
        f"{', '.join(f'{c} px × {e}' for c, e in args.schedule) or 'none'} epochs, then {args.canvas} px "
        f"({args.epochs} epochs in all); Adam "
        f"{args.lr:g} with cosine decay. {results['n_test']} held-out test images "
        "(test digits never seen in training).\n\n"
        f"Model: BagNet encoder {MODEL_KWARGS}, best validation checkpoint.\n\n{table}\n\n"
        "![saliency](saliency.png)\n\n"
        "Saliency = |∂ logit(3) / ∂ image|; a needle counts as localised when the saliency maximum lies in "
        "its box (AP as in Oquab et al. 2015).\n"
    )


def curriculum(args: argparse.Namespace) -> str:
    """The training curriculum in words, e.g. ``64 px for 8 % of the time, ..., then 512 px``."""
    if args.time_stages:
        stages = ", ".join(f"{c} px for {f:.0%} of the time" for c, f in args.schedule)
        return f"{stages}, then {args.canvas} px until --max-minutes ({args.max_minutes:g} min)"
    stages = ", ".join(f"{c} px × {e}" for c, e in args.schedule)
    return f"{stages} epochs, then the rest at {args.canvas} px (capped by --max-minutes)"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data, test, train_seconds = train(args, out)
    test_set = data.dataset("test")
    ap, fig = (localise_selection if args.method == "ips" else localise)(model, test_set)
    results = {
        **test,
        "localisation_ap": ap,
        "train_seconds": train_seconds,
        "epochs": _epochs_run(out),
        "o2i": test_set.o2i,
        "n_clutter": test_set.n_clutter,
        "n_test": len(test_set),
        "dense_baseline": dense_baseline(args.canvas) if args.method != "dense" else None,
        "args": vars(args),
        "environment": environment_info(),
    }
    from needlework.viz.saliency import saliency_grid, selection_grid

    titles = [f"label {int(y)}  P(3)={float(p):.2f}" for y, p in zip(fig["label"], fig["probs"])]
    if args.method == "ips":
        figure = out / "selection.png"
        selection_grid(fig["image"], fig["boxes"], fig["selected"], IPS_KWARGS["patch_size"], titles, figure,
                       weights=fig["weights"])  # fmt: skip
    else:
        figure = out / "saliency.png"
        saliency_grid(fig["image"], fig["saliency"], fig["boxes"], fig["points"], titles, figure)
    write_json(out / "metrics.json", results)
    text = report(out, args, results)
    (out / "report.md").write_text(text)
    print("\n" + text.split("\n\n")[3] + "\n")
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {figure}")
    return 0


def _epochs_run(out: Path) -> int:
    """Epochs completed, read back from the CSV log (robust to a max-time stop)."""
    import csv

    path = out / "logs" / "metrics.csv"
    if not path.exists():
        return 0
    with open(path) as f:
        # only rows of finished training epochs: the test row carries the epoch index after the last one
        epochs = {int(row["epoch"]) for row in csv.DictReader(f) if row.get("train/loss_epoch")}
    return max(epochs) + 1 if epochs else 0
