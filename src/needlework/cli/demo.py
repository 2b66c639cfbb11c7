"""``needlework demo``: the dense baseline on needle-MNIST, end to end on a CPU in minutes.

Generates needle-MNIST at canvas 128 (O2I 4.8 %), trains the BagNet baseline (RF 33, max pooling) with
a curriculum (canvas 64 first, fresh images every epoch), keeps the best validation checkpoint,
evaluates the held-out test images, measures saliency localisation AP, and writes ``<out>/metrics.json``,
``<out>/report.md`` and ``<out>/saliency.png``.
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="needlework demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--canvas", type=int, default=128, help="needle-MNIST canvas side in px")
    p.add_argument("--epoch-size", type=int, default=3200,
                   help="training images per epoch, freshly generated every epoch (50%% positive)")
    p.add_argument("--warmup-canvas", type=int, default=64,
                   help="canvas of the curriculum's first stage (O2I 19%% at 64 px, a quarter of the cost)")
    p.add_argument("--warmup-epochs", type=int, default=24, help="epochs on --warmup-canvas (0: none)")
    p.add_argument("--epochs", type=int, default=34, help="epochs in all, warm-up included")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay per step)")
    p.add_argument("--max-minutes", type=float, default=8.5, help="stop training after this long")
    p.add_argument("--val-size", type=int, default=320, help="validation images (checkpoint choice)")
    p.add_argument("--test-size", type=int, default=None,
                   help="held-out test images (default: one positive and one negative per test 3, i.e. 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("canvas", "epoch_size", "epochs", "batch_size", "val_size", "test_size", "warmup_canvas"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.warmup_epochs < args.epochs:
        p.error("--warmup-epochs must lie in [0, --epochs)")
    if args.max_minutes <= 0:
        p.error("--max-minutes must be positive")
    return args


def build_task(lr: float) -> Any:
    """The demo's :class:`~needlework.training.ClassificationTask`: BagNet ``MODEL_KWARGS`` in channels-last.

    Channels-last lets oneDNN pick its NHWC kernels (0.9–1.06× on an AMD EPYC with AVX-512, up to 1.5× on
    other CPUs). It is safe here because the BagNet's strided 1×1 shortcuts are :class:`Conv1x1` layers,
    which never reach oneDNN's strided 1×1 backward kernel that corrupts memory on AVX-512 CPUs
    (``needlework.models.layers`` has the reproducer; ``tests/test_demo_crash.py`` guards it).
    """
    from needlework.training import ClassificationTask

    task = ClassificationTask("bagnet", dict(MODEL_KWARGS), num_classes=2, lr=lr, scheduler="cosine")
    task.model.to(memory_format=torch.channels_last)
    return task


def train(args: argparse.Namespace, out: Path) -> tuple[Any, Any, dict[str, float], float]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from needlework.training import ClassificationTask, DatasetDataModule

    L.seed_everything(args.seed, verbose=False)
    task = build_task(args.lr)
    # the curriculum: small canvases first (the needle is 19 % of the image), then the task's canvas
    schedule = [{"epochs": args.warmup_epochs, "canvas": args.warmup_canvas}] if args.warmup_epochs else []
    data = DatasetDataModule(
        "needle_mnist", {"canvas": args.canvas, "seed": args.seed},
        train_kwargs={"size": args.epoch_size}, val_kwargs={"size": args.val_size},
        test_kwargs={} if args.test_size is None else {"size": args.test_size},
        batch_size=args.batch_size, eval_batch_size=64,
        train_schedule=[*schedule, {"epochs": args.epochs - args.warmup_epochs}], resample_each_epoch=True,
    )
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/acc", mode="max", filename="best")
    trainer = L.Trainer(
        max_epochs=args.epochs, max_time={"minutes": args.max_minutes}, callbacks=[ckpt],
        logger=CSVLogger(out, name="", version="logs"), enable_progress_bar=not args.quiet,
        enable_model_summary=False, log_every_n_steps=20, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, check_val_every_n_epoch=2,
    )
    start = time.perf_counter()
    trainer.fit(task, data)
    train_seconds = time.perf_counter() - start
    test = trainer.test(task, data, ckpt_path="best", verbose=False)[0]
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


def report(out: Path, args: argparse.Namespace, results: dict[str, Any]) -> str:
    rows = [
        ("test accuracy", f"{results['test/acc']:.3f}"),
        ("test balanced accuracy", f"{results['test/bacc']:.3f}"),
        ("test AUROC", f"{results['test/auroc']:.3f}"),
        ("test F1", f"{results['test/f1']:.3f}"),
        ("saliency localisation AP", f"{results['localisation_ap']:.3f}"),
        ("training time", f"{results['train_seconds']:.0f} s ({results['epochs']} epochs)"),
    ]
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        "# needlework demo: dense baseline on needle-MNIST\n\n"
        f"Task: does a {args.canvas}×{args.canvas} image contain a 3? One 28×28 needle "
        f"(O2I {results['o2i']:.2%}) among {results['n_clutter']} clutter digits. "
        f"Training: {args.epoch_size} fresh images per epoch, {args.warmup_epochs} epochs on a "
        f"{args.warmup_canvas}-px canvas, then {args.canvas} px ({args.epochs} epochs in all); Adam "
        f"{args.lr:g} with cosine decay. {results['n_test']} held-out test images "
        "(test digits never seen in training).\n\n"
        f"Model: BagNet encoder {MODEL_KWARGS}, best validation checkpoint.\n\n{table}\n\n"
        "![saliency](saliency.png)\n\n"
        "Saliency = |∂ logit(3) / ∂ image|; a needle counts as localised when the saliency maximum lies in "
        "its box (AP as in Oquab et al. 2015).\n"
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data, test, train_seconds = train(args, out)
    test_set = data.dataset("test")
    ap, fig = localise(model, test_set)
    results = {
        **test,
        "localisation_ap": ap,
        "train_seconds": train_seconds,
        "epochs": _epochs_run(out),
        "o2i": test_set.o2i,
        "n_clutter": test_set.n_clutter,
        "n_test": len(test_set),
        "args": vars(args),
        "environment": environment_info(),
    }
    from needlework.viz.saliency import saliency_grid

    titles = [f"label {int(y)}  P(3)={float(p):.2f}" for y, p in zip(fig["label"], fig["probs"])]
    saliency_grid(fig["image"], fig["saliency"], fig["boxes"], fig["points"], titles, out / "saliency.png")
    write_json(out / "metrics.json", results)
    text = report(out, args, results)
    (out / "report.md").write_text(text)
    print("\n" + text.split("\n\n")[3] + "\n")
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'saliency.png'}")
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
