"""The attention-sampling supplement's experiments (issue #18): entropy regulariser, number of patches,
ATS against attention-MIL, and the variance of the ATS gradient against the number of patches.

    python benchmarks/ats_ablations.py --study entropy  --minutes 2.3        # λ ∈ {0, 0.01, 0.1, 1}
    python benchmarks/ats_ablations.py --study patches  --minutes 10         # n ∈ {2, 5, 10, 25}
    python benchmarks/ats_ablations.py --study mil      --minutes 20         # ATS vs attention-MIL
    python benchmarks/ats_ablations.py --study variance                      # gradient variance vs n
    python benchmarks/ats_ablations.py --study entropy --canvas 256          # needle-MNIST, views ×4
    python benchmarks/ats_ablations.py --study mil --recipe needle --minutes 50  # the needle recipe
    python benchmarks/ats_ablations.py --study patches --tiny --out /tmp/a.json --figures /tmp/fig

Data: Megapixel MNIST, ATS variant, at the CPU size (500², ``x_low`` rendered at 0.12 → 60², 6 noise
strokes), or with ``--canvas`` needle-MNIST through the multi-resolution views (``x_low`` = ×4 area
downsample, attention over 64-px cells). Every run trains in-process with a plain loop (Adam, clip-norm 1,
cross-entropy plus the model's entropy term): an *epoch* is ``--epoch-images`` training images, cycling
through a fixed training set; after every epoch the run measures, on fixed test images ("probes"), the
entropy of the attention, the attention mass inside the digits' boxes and the attention maps (pooled to
the attention-MIL grid, 50- or 64-px cells, so maps of every run compare), and test accuracy on
``--test`` held-out images. ATS and attention-MIL share the feature network (the reference Megapixel MNIST
CNN, ``--channels`` wide). Runs stop after ``--epochs`` or when ``--minutes`` per run are used up.

Results go to ``benchmarks/results/ats_ablations.json`` (one entry per study, dataset and preset; each
finished run is written at once through an atomic rename, so an interrupted study resumes with the runs
it lacks); figures to ``docs/images/ats_*.png``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ats_ablation_plots import plot_study  # noqa: E402
from ats_variance import variance_study  # noqa: E402
from needlework.metrics.attention import (  # noqa: E402
    attention_entropy,
    js_distance,
    object_mass,
    pool_attention,
    total_variation,
)

RESULTS = ROOT / "benchmarks" / "results" / "ats_ablations.json"
FIGURES = ROOT / "docs" / "images"
STUDIES = ("entropy", "patches", "mil", "variance")
LAMBDAS = (0.0, 0.01, 0.1, 1.0)
PATCHES = (2, 5, 10, 25)
REFERENCE = {"entropy": "lambda=0.01", "patches": "n=25", "mil": "attention-MIL"}  # distances are to these


@dataclass
class Setup:
    """Everything a study's runs share (recorded in the JSON)."""

    dataset: str  # "megapixel_mnist" or "needle_mnist"
    canvas: int
    train: int  # fixed training set, cycled through
    epoch_images: int
    test: int
    probes: int
    channels: int
    batch: int
    epochs: int
    minutes: float  # per run; 0 = no limit
    lr: float = 1e-3
    n_patches: int = 10  # entropy and mil studies
    entropy_weight: float = 0.01  # patches and mil studies (the supplement's λ)
    seed: int = 0
    recipe: str = "reference"  # or "needle": configs/needle_mnist/ats.yaml's networks and schedule
    cell_size: int = 0  # needle-MNIST: attention cell side in x_high px (0: the patch size)

    @property
    def patch(self) -> int:
        return 50 if self.dataset == "megapixel_mnist" else 64

    @property
    def cell(self) -> int:
        """Side of one cell of the comparison grid in ``x_high`` px (the attention-MIL grid)."""
        return self.cell_size or self.patch

    @property
    def grid(self) -> int:
        """Side of the comparison grid (``cell``-px cells)."""
        return self.canvas // self.cell

    @property
    def num_classes(self) -> int:
        return 10 if self.dataset == "megapixel_mnist" else 2


PRESETS = {
    "cpu": dict(train=2000, epoch_images=256, test=100, probes=8, channels=16, batch=16, epochs=200),
    "tiny": dict(train=8, epoch_images=8, test=4, probes=2, channels=4, batch=4, epochs=2),
}


def make_setup(args: argparse.Namespace) -> Setup:
    preset = dict(PRESETS["tiny" if args.tiny else "cpu"])
    for name in ("epoch_images", "test", "probes", "channels", "batch", "epochs"):
        if getattr(args, name) is not None:
            preset[name] = getattr(args, name)
    if args.minutes > 0 and args.epochs is None:
        preset["epochs"] = 10**9  # a time budget alone ends the run (the preset's 200 epochs cut one short)
    if args.canvas is None:
        dataset, canvas = "megapixel_mnist", 300 if args.tiny else 500
        if args.cell:
            raise SystemExit("error: --cell needs --canvas (needle-MNIST); Megapixel MNIST has 50-px cells")
    else:
        dataset, canvas = "needle_mnist", args.canvas
        if canvas % 64 or canvas < 128:
            raise SystemExit(f"error: --canvas {canvas}: needle-MNIST needs a multiple of 64, at least 128")
        if args.cell not in (0, 16, 32, 64):
            raise SystemExit(f"error: --cell {args.cell}: attention cells of 16, 32 or 64 px")
    if args.recipe == "needle":
        preset.update(lr=3e-3, train=max(preset["train"], 20000))  # lazily rendered: fresh images
    if args.lr is not None:
        preset["lr"] = args.lr
    return Setup(dataset=dataset, canvas=canvas, minutes=args.minutes, recipe=args.recipe,
                 cell_size=args.cell, **preset)  # fmt: skip


def study_key(study: str, setup: Setup, tiny: bool) -> str:
    """``study/dataset+canvas/preset``, plus the recipe and cell size where they are not the defaults."""
    extra = ("" if setup.recipe == "reference" else f"-{setup.recipe}") + (
        f"-cell{setup.cell_size}" if setup.cell_size else ""
    )
    return f"{study}/{setup.dataset}{setup.canvas}/{'tiny' if tiny else 'cpu'}{extra}"


#: the needle recipe's canvas curriculum: (fraction of the run's budget, canvas), capped at the target
CURRICULUM = ((0.08, 64), (0.30, 128), (0.65, 256))
#: the same on Megapixel MNIST: the five digits crowd a 200² canvas (digits keep their 28 px, so the
#: features learn the digits first, and the attention then has a signal to follow on the larger canvases)
CURRICULUM_MEGAPIXEL = ((0.15, 200), (0.40, 350))


def stage_canvas(setup: Setup, fraction: float) -> int:
    """The training canvas at ``fraction`` of the budget (the target canvas for the reference recipe)."""
    if setup.recipe == "needle":
        stages = CURRICULUM_MEGAPIXEL if setup.dataset == "megapixel_mnist" else CURRICULUM
        for until, canvas in stages:
            if fraction < until:
                return min(canvas, setup.canvas)
    return setup.canvas


# -- data ------------------------------------------------------------------------------------------------
def make_dataset(setup: Setup, split: str, size: int, canvas: int | None = None):
    """Items with ``x_low``, ``x_high``, ``label`` and ``boxes`` (xyxy pixels of ``x_high``)."""
    if setup.dataset == "megapixel_mnist":
        from needlework.data.megapixel_mnist import MegapixelMNIST

        canvas = canvas or setup.canvas
        return MegapixelMNIST(split, seed=setup.seed, size=size, canvas=canvas, preset="small")
    from needlework.data.needle_mnist import NeedleMNIST
    from needlework.data.views import MultiResolutionViews

    base = NeedleMNIST(canvas=canvas or setup.canvas, split=split, size=size, seed=setup.seed)
    views = MultiResolutionViews(factor=4)

    class _Views(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(base)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return views(base[i])

    return _Views()


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "x_low": torch.stack([it["x_low"] for it in items]),
        "x_high": torch.stack([it["x_high"] for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items]),
        "boxes": [it["boxes"] for it in items],
    }


# -- models ----------------------------------------------------------------------------------------------
#: the feature network of configs/needle_mnist/ats.yaml (the recipe that learns at 128 px in 3 CPU minutes)
NEEDLE_ENCODER = {"widths": [32, 32, 32], "strides": [1, 2, 2], "stem_stride": 2}
NEEDLE_DIM = 64


class AllPatchesMIL(torch.nn.Module):
    """Gated attention-MIL (Ilse et al.) over every patch ATS could sample: one ``patch``-px patch of
    ``x_high`` centred on each ``cell``-px cell (the corners of :func:`needlework.ats.cells_to_offsets`).

    ``forward(x_high (B, C, H, W))`` → ``logits (B, K)``, ``attention (B, N)``, ``attention_map
    (B, H / cell, W / cell)``.
    """

    def __init__(self, features: torch.nn.Module, dim: int, num_classes: int, patch: int, cell: int) -> None:
        from needlework.models.pooling import AttentionPool

        super().__init__()
        self.features, self.patch, self.cell = features, patch, cell
        self.pool = AttentionPool(dim, hidden=64, gated=True)
        self.classifier = torch.nn.Linear(dim, num_classes)

    def forward(self, x_high: torch.Tensor) -> dict[str, Any]:
        from needlework.ats import extract_patches

        B, _, H, W = x_high.shape
        gh, gw = H // self.cell, W // self.cell
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        corners = torch.stack([xs, ys], -1).view(1, -1, 2) * self.cell + (self.cell - self.patch) // 2
        patches = extract_patches(x_high, corners.expand(B, -1, -1).to(x_high.device), self.patch)
        h = self.features(patches.flatten(0, 1)).view(B, gh * gw, -1)
        embedding, attention = self.pool(h)
        return {"logits": self.classifier(embedding), "attention": attention,
                "attention_map": attention.view(B, gh, gw)}  # fmt: skip


def build_model(setup: Setup, kind: str, n_patches: int, entropy_weight: float) -> torch.nn.Module:
    """ATS (``kind="ats"``) or gated attention-MIL over all grid patches (``"mil"``), same feature CNN."""
    from needlework.models.ats import ATSClassifier
    from needlework.models.ats_networks import CellAttention, MegapixelMNISTAttention, MegapixelMNISTFeatures
    from needlework.models.attention_mil import AttentionMILClassifier
    from needlework.models.patch_cnn import build_patch_encoder

    if setup.recipe == "needle":
        features, dim = build_patch_encoder(1, NEEDLE_DIM, NEEDLE_ENCODER), NEEDLE_DIM
    else:
        features = MegapixelMNISTFeatures(1, setup.channels)
        dim = features.out_dim
    if kind == "mil":
        if setup.recipe == "reference" and setup.cell == setup.patch:
            return AttentionMILClassifier(setup.num_classes, 1, setup.patch, setup.channels, attention_dim=64)
        return AllPatchesMIL(features, dim, setup.num_classes, setup.patch, setup.cell)
    if setup.dataset == "megapixel_mnist":
        attention, smoothing = MegapixelMNISTAttention(1, 8, "tanh"), 1e-5
    else:  # x_low is x_high / 4 and one 2×2 pool: cell_pool = cell / 8 (16-px x_low cells = 64-px cells)
        attention = CellAttention(1, (16, 16, 32, 32), pool_after=(1,), cell_pool=setup.cell // 8)
        smoothing = 1e-3
    return ATSClassifier(
        attention, features, dim, setup.num_classes, n_patches=n_patches,
        patch_size=setup.patch, smoothing=smoothing, entropy_weight=entropy_weight, clamp=True,
    )  # fmt: skip


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    if hasattr(model, "sampler"):
        return model(batch["x_low"], batch["x_high"])
    return model(batch["x_high"])


def study_runs(study: str, setup: Setup) -> list[dict[str, Any]]:
    """The runs of a training study: name, model kind, number of patches, entropy weight."""
    if study == "entropy":
        return [dict(name=f"lambda={lam:g}", kind="ats", n_patches=setup.n_patches, entropy_weight=lam)
                for lam in LAMBDAS]  # fmt: skip
    if study == "patches":
        return [dict(name=f"n={n}", kind="ats", n_patches=n, entropy_weight=setup.entropy_weight)
                for n in PATCHES]  # fmt: skip
    return [
        dict(name="ATS", kind="ats", n_patches=setup.n_patches, entropy_weight=setup.entropy_weight),
        dict(name="attention-MIL", kind="mil", n_patches=0, entropy_weight=0.0),
    ]


# -- measuring -------------------------------------------------------------------------------------------
@torch.no_grad()
def measure(model: torch.nn.Module, setup: Setup, probes: dict[str, Any], test: list[dict]) -> dict[str, Any]:
    """Attention summaries on the probes and accuracy on the test batches (sampling seeded: repeatable)."""
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = forward(model, probes)
        amap = out["attention_map"].double()
        grid = pool_attention(amap, (setup.grid, setup.grid))
        correct = sum(int((forward(model, b)["logits"].argmax(1) == b["label"]).sum()) for b in test)
    side = setup.canvas // 25  # figures: 25-px cells where the map is that fine (ATS on Megapixel MNIST)
    fig = pool_attention(amap[:3], (side, side)) if amap.shape[-1] % side == 0 else amap[:3]
    model.train()
    return {
        "test_acc": correct / sum(len(b["label"]) for b in test),
        "entropy": float(attention_entropy(amap).mean()),
        "entropy_norm": float(attention_entropy(amap, normalised=True).mean()),
        "entropy_grid": float(attention_entropy(grid).mean()),
        "object_mass": float(object_mass(amap, probes["boxes"], (setup.canvas, setup.canvas)).mean()),
        "maps": [[round(v, 6) for v in m.flatten().tolist()] for m in grid],
        "_figure_maps": [[round(v, 6) for v in m.flatten().tolist()] for m in fig],
        "_figure_side": int(fig.shape[-1]),
    }


def keep_figure_epoch(epoch: int) -> bool:
    """Epochs whose full-resolution maps are kept for the figures: 1, 2, 3, 5, 8, 13, … (Fibonacci)."""
    a, b = 1, 2
    while a < epoch:
        a, b = b, a + b
    return a == epoch


def progress(setup: Setup, epoch: int, elapsed: float) -> float:
    """Fraction of the run done: of the time budget when there is one, else of the epochs."""
    if setup.minutes > 0:
        return min(1.0, elapsed / (setup.minutes * 60))
    return (epoch - 1) / setup.epochs


def train_run(setup: Setup, run: dict[str, Any], train_set, probes, test) -> dict[str, Any]:
    """One run: train epoch by epoch, measure after each; returns the run's record.

    ``train_set(canvas)`` gives the fixed training set at a canvas (the needle recipe's curriculum starts
    on small canvases); the needle recipe also anneals the learning rate by a cosine over the run.
    """
    torch.manual_seed(setup.seed)
    model = build_model(setup, run["kind"], run["n_patches"], run["entropy_weight"])
    opt = torch.optim.Adam(model.parameters(), lr=setup.lr)
    order = torch.randperm(setup.train, generator=torch.Generator().manual_seed(setup.seed)).tolist()
    epochs: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    start, cursor, seen = time.perf_counter(), 0, 0
    budget = setup.minutes * 60 if setup.minutes > 0 else float("inf")
    for epoch in range(1, setup.epochs + 1):
        losses = []
        done = progress(setup, epoch, time.perf_counter() - start)
        canvas = stage_canvas(setup, done)
        train_ds = train_set(canvas)
        for _ in range(max(1, setup.epoch_images // setup.batch)):
            if setup.recipe == "needle":
                done = progress(setup, epoch, time.perf_counter() - start)
                for group in opt.param_groups:
                    group["lr"] = setup.lr * 0.5 * (1 + math.cos(math.pi * done))
            idx = [order[(cursor + k) % len(order)] for k in range(setup.batch)]
            cursor += setup.batch
            batch = collate([train_ds[i] for i in idx])
            out = forward(model, batch)
            loss = F.cross_entropy(out["logits"], batch["label"])
            total = loss + sum(out.get("aux_loss", {}).values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            seen += setup.batch
        row = measure(model, setup, probes, test)
        elapsed = time.perf_counter() - start
        row.update(epoch=epoch, images_seen=seen, seconds=round(elapsed, 2), canvas=canvas,
                   train_loss=sum(losses) / len(losses))  # fmt: skip
        last = epoch == setup.epochs or elapsed >= budget
        if keep_figure_epoch(epoch) or last:
            figures[str(epoch)] = row["_figure_maps"]
        figure_side = row.pop("_figure_side")
        row.pop("_figure_maps")
        epochs.append(row)
        print(f"  {run['name']}: epoch {epoch} acc {row['test_acc']:.3f} H/logN {row['entropy_norm']:.3f} "
              f"mass {row['object_mass']:.3f} ({elapsed:.0f} s)", flush=True)  # fmt: skip
        if last:
            break
    return {**run, "epochs": epochs, "figure_maps": figures, "figure_side": figure_side,
            "train_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def distances(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean TV and JS distance (over the probes) between every pair of runs, at every common epoch."""
    rows = []
    names = sorted(runs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ea = {e["epoch"]: e for e in runs[a]["epochs"]}
            eb = {e["epoch"]: e for e in runs[b]["epochs"]}
            for epoch in sorted(set(ea) & set(eb)):
                p, q = torch.tensor(ea[epoch]["maps"]), torch.tensor(eb[epoch]["maps"])
                p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)  # undo the rounding
                rows.append({"a": a, "b": b, "epoch": epoch, "tv": float(total_variation(p, q).mean()),
                             "js": float(js_distance(p, q).mean())})  # fmt: skip
    return rows


# -- results file ----------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"studies": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path} is not valid JSON ({err}); move it away to start afresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("studies"), dict):
        raise SystemExit(f"error: {path} is not an ats_ablations results file (no 'studies'); move it away")
    return data


def save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)  # a crash never leaves half a file


def update(path: Path, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Write one study's entry into the results file; returns the whole file as written.

    Re-reads the file under a lock first, so studies run at the same time (two processes, one per core)
    never drop each other's entries, and runs of one study split over processes (``--runs``) never drop
    each other's runs: the runs already in the file are kept and the distances recomputed over all.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        data = load(path)
        if "runs" in entry:
            entry["runs"] = {**data["studies"].get(key, {}).get("runs", {}), **entry["runs"]}
            entry["distances"] = distances(entry["runs"])
        data["studies"][key] = entry
        save(path, data)
    return data


def versions() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, choices=STUDIES)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long grid for tests")
    ap.add_argument("--canvas", type=int, help="needle-MNIST at this canvas instead of Megapixel MNIST")
    ap.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget per run (0: --epochs only)")
    for name in ("epochs", "epoch-images", "test", "probes", "channels", "batch"):
        ap.add_argument(f"--{name}", type=int, help="override the preset")
    ap.add_argument("--recipe", choices=("reference", "needle"), default="reference",
                    help="needle: configs/needle_mnist/ats.yaml's feature network, lr 3e-3 annealed by "
                         "a cosine, canvas curriculum (from 64 px; Megapixel MNIST from 200)")  # fmt: skip
    ap.add_argument("--runs", nargs="+", help="only these runs of the study (split a study over processes)")
    ap.add_argument("--cell", type=int, default=0, help="needle-MNIST attention cell in px (16, 32, 64)")
    ap.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    ap.add_argument("--draws", type=int, help="variance study: draws per number of patches")
    ap.add_argument("--attention-std", type=float, default=10.0, help="variance study: last-layer init std")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--figures", type=Path, default=FIGURES)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = make_setup(args)
    key = study_key(args.study, setup, args.tiny)
    data = load(args.out)
    if args.study == "variance":
        if key not in data["studies"]:
            torch.manual_seed(setup.seed)
            model = build_model(setup, "ats", 10, 0.0)
            # a random, non-uniform attention (the zero-initialised last layer would give uniform)
            last = [m for m in model.sampler.attention_net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            torch.nn.init.normal_(last.weight, std=args.attention_std)
            ds = make_dataset(setup, "test", 2 if args.tiny else 4)
            batch = collate([ds[i] for i in range(len(ds))])
            draws = args.draws or (20 if args.tiny else 1000)
            ns = (2, 5) if args.tiny else (2, 5, 10, 25, 50)
            record = variance_study(model, batch["x_low"], batch["x_high"], batch["label"], ns, draws)
            data["studies"][key] = {
                "study": "variance",
                "setup": asdict(setup),
                "versions": versions(),
                "attention_std": args.attention_std,
                **record,
            }
            data = update(args.out, key, data["studies"][key])
        plot_study(data["studies"][key], None, args.figures, tiny=args.tiny)
        print(f"wrote {args.out} [{key}]")
        return
    train_sets: dict[int, Any] = {}

    def train_set(canvas: int):
        if canvas not in train_sets:
            train_sets[canvas] = make_dataset(setup, "train", setup.train, canvas)
        return train_sets[canvas]

    test_ds = make_dataset(setup, "test", setup.probes + setup.test)
    probes = collate([test_ds[i] for i in range(setup.probes)])
    test_items = [test_ds[i] for i in range(setup.probes, setup.probes + setup.test)]
    test = [collate(test_items[i : i + 32]) for i in range(0, len(test_items), 32)]
    entry = data["studies"].setdefault(key, {"study": args.study, "runs": {}})
    entry.update(setup=asdict(setup), reference=REFERENCE[args.study],
                 probe_boxes=[b.tolist() for b in probes["boxes"][:3]])  # fmt: skip
    runs = study_runs(args.study, setup)
    if args.runs:
        unknown = set(args.runs) - {r["name"] for r in runs}
        if unknown:
            raise SystemExit(f"error: --runs {sorted(unknown)}: the {args.study} study has "
                             f"{[r['name'] for r in runs]}")  # fmt: skip
        runs = [r for r in runs if r["name"] in args.runs]
    for run in runs:
        if run["name"] in entry["runs"]:
            print(f"skip {run['name']} (done)")
            continue
        print(f"{key}: {run['name']}", flush=True)
        record = train_run(setup, run, train_set, probes, test)
        entry["runs"][run["name"]] = {**record, "versions": versions()}
        data = update(args.out, key, entry)
        entry = data["studies"][key]  # with the runs other processes wrote meanwhile
    same = "/" + key.split("/", 1)[1]  # the curves figure: every training study of this data and setup
    curves = [e for k, e in sorted(data["studies"].items()) if e["study"] != "variance" and k.endswith(same)]
    plot_study(entry, probes["x_high"][:3], args.figures, tiny=args.tiny, curves=curves)
    print(f"wrote {args.out} [{key}]")


if __name__ == "__main__":
    main()
